"""Settings are TRL's DPOConfig and ModelConfig plus RunArguments: one name each, one precedence rule, every value
checked before anything is loaded, and the value given is the value TRL trains with and the evaluation reads."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from dpo_pipeline import args, cli
from dpo_pipeline.errors import command
from dpo_pipeline.pipeline import training_args
from dpo_pipeline.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", ["full", "cpu", "pretrained-cpu", "smoke"])
def test_every_recipe_is_flat_settings_of_the_three_classes(profile):
    recipe = args.load_recipe(args.RECIPES / f"{profile}.yaml")  # ${DPO_SHARED_DATA} expanded
    owners = args.field_names()
    assert recipe and all(key in owners for key in recipe), [k for k in recipe if k not in owners]
    settings, name, _ = args.resolve(profile)
    assert name == profile
    for key in recipe:  # each value lands in the object that owns its name
        value = settings.get(key)
        assert value == recipe[key] or [recipe[key]] == value or str(recipe[key]) in str(value), key


def test_one_name_per_setting_and_the_old_names_say_what_replaced_them():
    fields = [f.name for cls in args._classes() for f in dataclasses.fields(cls) if f.init]
    assert len(fields) == len(set(fields))  # no name is in two classes
    for old, new in args.RENAMED.items():
        with pytest.raises(args.ConfigError, match=f"unknown setting '{old}' .did you mean '{new}'"):
            args.resolve("smoke", {old: 1})
    with pytest.raises(args.ConfigError, match="unknown setting 'learning_rte' .did you mean 'learning_rate'"):
        args.resolve("smoke", {"learning_rte": 1e-4})
    with pytest.raises(args.ConfigError, match="Unknown profile 'fast'"):
        args.resolve("fast")


def test_layers_win_in_order_and_none_keeps_what_is_there():
    recipe = yaml.safe_load((args.RECIPES / "cpu.yaml").read_text())
    settings, _, _ = args.resolve("cpu", {"learning_rate": 1e-4, "max_pairs": 50, "beta": None})
    assert (settings.dpo.learning_rate, settings.run.max_pairs, settings.dpo.beta) == (1e-4, 50, recipe["beta"])
    # recipe < sweep base < notebook parameter / flag
    settings, _, _ = args.resolve("cpu", {"max_steps": 8, "beta": 0.5}, {"max_steps": 20, "beta": None})
    assert (settings.dpo.max_steps, settings.dpo.beta) == (20, 0.5)
    assert settings.replace(beta=0.3).dpo.beta == 0.3 and settings.dpo.beta == 0.5


def test_yaml_text_values_are_typed_by_the_field_and_to_dict_round_trips():
    # PyYAML reads YAML 1.1, where `5e-5` (no dot) is the string '5e-5'
    settings = args.parse({"model_name_or_path": "offline:gpt2-tiny", "learning_rate": "5e-5", "max_steps": "3",
                           "loss_type": "ipo", "load_in_4bit": "true"})
    assert (settings.dpo.learning_rate, settings.dpo.max_steps, settings.dpo.loss_type) == (5e-5, 3, ["ipo"])
    assert settings.model.load_in_4bit is True
    again = args.parse(settings.to_dict())
    assert again.to_dict() == settings.to_dict() and again.dpo.learning_rate == 5e-5


BAD_VALUES = {
    "max_length": (-5, "max_length must be a positive number"),
    "beta": (-1, "beta must be > 0"),
    "loss_type": ("sigmod", "unknown loss_type 'sigmod'"),
    "max_steps": ("many", "invalid int value: 'many'"),
    "optim": ("no_such_optimizer", "'no_such_optimizer'"),
    "test_fraction": (1.5, "test_fraction must be in"),
    "trainer": ("fast", "trainer must be 'tuned' or 'trl'"),
    "judge": ("proxy", "judge 'proxy' is gone"),  # removed: at chance on held-out pairs
    "report_to": ("tensorbord", "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
}


@pytest.mark.parametrize("name", BAD_VALUES)
def test_a_bad_value_is_one_line_before_anything_loads(name, capsys):
    value, message = BAD_VALUES[name]
    assert command(cli.main, ["--profile", "smoke", f"--{name}", str(value)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert "Traceback" not in err


def test_a_list_or_mapping_for_a_one_value_setting_is_refused_where_the_setting_takes_one():
    for name, value in (("learning_rate", [1e-4, 1e-3]), ("beta", {"low": 1}), ("seed", [1])):
        with pytest.raises(args.ConfigError, match=f"{name} takes one value"):
            args.parse({"model_name_or_path": "x", name: value})
    settings = args.parse({"model_name_or_path": "x", "report_to": ["tensorboard"], "lora_target_modules": ["c_attn"],
                           "lr_scheduler_kwargs": {"min_lr": 0.0}, "loss_type": ["sigmoid", "sft"]})
    assert settings.dpo.lr_scheduler_kwargs == {"min_lr": 0.0} and settings.dpo.loss_type == ["sigmoid", "sft"]


def test_a_stored_config_from_an_older_version_still_parses():
    stored = {"model_name_or_path": "x", "beta": 0.2, "judge": "proxy", "trl_args": {}, "prompt_format": "text"}
    settings = args.parse_stored(stored, "record.json", max_pairs=8)
    assert (settings.dpo.beta, settings.run.judge, settings.run.max_pairs) == (0.2, None, 8)
    with pytest.raises(args.ConfigError, match="judge 'proxy' is gone"):  # as a new setting it is still refused
        args.parse(stored | {"trl_args": None})


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(args.ConfigError, match="notes.txt is a file; name a folder"):
        args.parse({"model_name_or_path": "x", "output_dir": str(tmp_path / "notes.txt")})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_loads():
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    missing = [n for n in INTEGRATION_TO_CALLBACK if n not in get_available_reporting_integrations() + ["flyte"]]
    with pytest.raises(args.ConfigError, match=f"report_to '{missing[0]}': its package is not installed"):
        args.parse({"model_name_or_path": "x", "report_to": f"tensorboard,{missing[0]}"})
    assert args.parse({"model_name_or_path": "x", "report_to": "tensorboard"}).dpo.report_to == ["tensorboard"]


def test_trl_knows_the_loss_types_we_check_against():
    assert {"sigmoid", "ipo", "hinge", "robust"} <= args.loss_types()


def test_a_flag_reaches_trl_and_the_evaluation_through_one_object():
    settings, _, _, _ = cli.parse_command_line(["--profile", "smoke", "--beta", "0.5", "--max_length", "16",
                                                "--lora_r", "4", "--warmup_steps", "2"])
    trained = training_args(settings)
    assert (trained.beta, trained.max_length, trained.warmup_steps) == (0.5, 16, 2)
    assert settings.model.lora_r == 4 and settings.dpo is not trained  # the trainer gets a copy
    # the data is cleaned for the length TRL trains at: some synthetic prompts no longer fit in 16 tokens
    short, default = prepare_data(settings), prepare_data(settings.replace(max_length=64))
    assert short.report.dropped["prompt_too_long"] > default.report.dropped["prompt_too_long"] == 0


def test_config_file_is_a_recipe_of_ones_own(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_RESULTS_DIR", str(tmp_path))
    recipe = tmp_path / "my_run.yaml"
    recipe.write_text("model_name_or_path: offline:gpt2-tiny\ndataset_name: synthetic\nbeta: 0.2\nmax_steps: 3\n")
    settings, name, _, _ = cli.parse_command_line(["--config", str(recipe), "--max_steps", "5"])
    assert (settings.dpo.beta, settings.dpo.max_steps, name) == (0.2, 5, "custom")
    assert settings.dpo.output_dir == str(tmp_path / "run-my_run")
    assert settings.run.judge is None  # no profile underneath: only the project's defaults
    recipe.write_text("model_name_or_path: offline:gpt2-tiny\nbatch_size: 4\n")
    with pytest.raises(args.ConfigError, match="my_run.yaml: unknown setting 'batch_size' .did you mean "
                                               "'per_device_train_batch_size'"):
        cli.parse_command_line(["--config", str(recipe)])
