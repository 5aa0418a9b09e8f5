"""The sweep's Optuna study: TPE's space, the storage, pruning a lagging run, a TPE sweep's records and tracking."""

import json

import openpyxl
import optuna
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_pipeline import sweep
from dpo_pipeline.args import ConfigError, parse
from dpo_pipeline.errors import command
from dpo_pipeline.search import PruneLaggingRun, open_study, suggest
from dpo_pipeline.synthetic import get_synthetic

TINY = dict(max_steps=4, eval_steps=2, logging_steps=2, per_device_train_batch_size=4, max_length=48, load_in_4bit=False,
            max_pairs=100, max_eval_pairs=16, judge="none", log_completions=1)
SPACE = {"learning_rate": {"low": 1e-4, "high": 3e-3, "log": True}, "beta": {"low": 0.05, "high": 0.5},
         "lora_r": {"low": 2, "high": 8}, "loss_type": ["sigmoid", "ipo"]}


def test_space_draws_ranges_and_choices_and_bad_specs_are_one_line(tmp_path):
    trial = optuna.create_study().ask()
    values = suggest(trial, SPACE)
    assert 1e-4 <= values["learning_rate"] <= 3e-3 and 0.05 <= values["beta"] <= 0.5
    assert isinstance(values["lora_r"], int) and values["loss_type"] in ("sigmoid", "ipo")
    for bad, expected in [({"search": "tpe", "space": SPACE}, "needs 'trials'"),
                          ({"search": "tpe", "trials": 3, "space": {"learning_rte": [1e-3]}}, "learning_rte"),
                          ({"search": "tpe", "trials": 3, "space": {"beta": {"low": 0.1}}}, "space field 'beta'"),
                          ({"search": "bayes", "grid": {"beta": [0.1]}}, "search must be"),
                          # found here, not by Optuna's first trial
                          ({"search": "tpe", "trials": 3, "space": {"beta": {"low": 0.5, "high": 0.1}}},
                           "needs low <= high"),
                          ({"search": "tpe", "trials": 3, "space": {"learning_rate": {"low": 0, "high": 1e-3,
                                                                                      "log": True}}}, "low > 0"),
                          ({"search": "tpe", "trials": 3, "space": {"loss_type": {"low": "sigmoid", "high": "ipo"}}},
                           "must be numbers"),
                          ({"best_by": "win_rate", "grid": {"beta": [0.1]}}, "no run has a judge"),
                          ({"search": "tpe", "trials": "three", "space": SPACE}, "trials must be a whole number"),
                          ({"random_samples": True, "grid": {"beta": [0.1]}}, "random_samples must be a whole"),
                          ({"heartbeat_seconds": 0, "grid": {"beta": [0.1]}}, "heartbeat_seconds must be >= 1"),
                          ({"search": "tpe", "trials": 3, "space": [1, 2]}, "space must be a mapping")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"profile": "smoke", **bad}))
        with pytest.raises(ConfigError, match=expected) as err:
            sweep.SweepSpec.from_file(path)
        assert "bad.yaml" in str(err.value) and "\n" not in str(err.value)


def test_a_study_storage_that_cannot_open_is_one_line_without_its_password(tmp_path):
    for url, why in [("postgresql://me:s3cret@localhost/db", "DB access module"),
                     (f"sqlite:///{tmp_path}/no/such/dir/study.db", "unable to open")]:
        spec = sweep.SweepSpec(search="tpe", trials=2, space={"beta": [0.1]}, storage=url, study="s")
        with pytest.raises(ConfigError, match=why) as err:
            open_study(spec, tmp_path)
        assert "s3cret" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_run_lagging_the_study_is_pruned_at_an_evaluation(tiny_gpt2, tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for _ in range(2):  # two earlier trials that were perfect (2.0: above any reward accuracy) at every evaluation
        study.add_trial(optuna.create_trial(value=2.0, intermediate_values={2: 2.0, 4: 2.0}))
    trial, search = study.ask(), {"method": "tpe", "trial": 2}
    config = parse(dict(model_name_or_path=tiny_gpt2, **TINY, output_dir=str(tmp_path / "run")))
    sweep.run_one(config, get_synthetic(n_pairs=100, seed=0), search=search,
                  setup=lambda t: t.add_callback(PruneLaggingRun(trial, search)))
    # the record as the run wrote it, before the sweep saves it again: what another worker, or a restart after a
    # SIGKILL right then, reads
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "pruned" and record["search"]["pruned_at_step"] == 2
    assert record["train_steps"] == 2 < TINY["max_steps"]  # stopped at the first evaluation, not trained on
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_tpe_study_makes_its_trials_with_records_tracking_and_a_trials_sheet(tmp_path, capsys):
    # SIGKILL, resume and several workers are the one runner's, tested on a grid in test_sweep.py (in processes)
    spec = tmp_path / "tpe.yaml"
    spec.write_text(yaml.safe_dump({"profile": "smoke", "search": "tpe", "trials": 3, "base": TINY, "space": SPACE}))
    results = tmp_path / "results"
    assert command(sweep.main, [str(spec), "--results-dir", str(results)]) == 0, capsys.readouterr().err[-3000:]
    proc = capsys.readouterr()  # the command's printed lines

    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{results / 'optuna.db'}")
    states = optuna.trial.TrialState
    counted = study.get_trials(states=(states.COMPLETE, states.PRUNED))
    assert len(counted) == 3  # two random startup trials, then one TPE proposes
    folders = [d for d in (results / "runs").iterdir() if d.is_dir()]
    records = [json.loads((d / "record.json").read_text()) for d in folders]
    assert not any((d / ".lock").exists() for d in folders)
    assert {t.user_attrs["run_id"] for t in counted} <= {r["run_id"] for r in records}  # every trial has its run
    assert proc.out.count("training:") == len(folders)  # each run trained once
    assert all(r["search"]["method"] == "tpe" and r["status"] in ("finished", "pruned") for r in records)
    for record in records:  # the tracker logs every trial, with its settings and answers while training
        tags = set()
        for logdir in (results / "runs" / record["run_id"] / "runs").iterdir():
            events = EventAccumulator(str(logdir))
            events.Reload()
            tags |= {*events.Tags()["scalars"], *events.Tags()["tensors"]}
        assert {"train/loss", "eval/rewards/accuracies", "run_config/text_summary"} <= tags, tags
        assert record["completions"] and record["completions"][0]["step"] == 2

    book = openpyxl.load_workbook(results / "sweep_results.xlsx")
    rows = [row for row in book["Runs"].iter_rows(min_row=2, values_only=True) if row[0] in
            {r["run_id"] for r in records}]
    assert sorted(r[0] for r in rows) == sorted(r["run_id"] for r in records)  # one row a run, none twice
    assert all(str(r[2]).startswith("tpe #") for r in rows)
    trial_rows = list(book["Trials"].iter_rows(min_row=2, values_only=True))
    assert len(trial_rows) == len(records) and book["Trials"]._charts
    assert "Completions" in book.sheetnames and (results / "plots" / "trials.png").exists()
