"""The commands as a user meets them: every user mistake is one line on stderr and exit code 2 (in-process, and once
through a real process); a sweep file's `base:` reaches the tokenizer and the data; every run folder (sweep runs and
best/) is complete; the app shows base metrics."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_double import make_tiny_adapter

import chat_session  # app/chat_session.py
from dpo_pipeline import chat, cli, evaluate, sweep
from dpo_pipeline.args import parse
from dpo_pipeline.data import load_preferences
from dpo_pipeline.errors import command as run_command
from dpo_pipeline.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / "data"
TINY = {"model_name_or_path": "offline:gpt2-tiny", "load_in_4bit": False, "dataset_name": "synthetic", "max_pairs": 60,
        "max_length": 48, "per_device_train_batch_size": 4, "max_steps": 2, "eval_steps": 2, "logging_steps": 1}


def command(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "DPO_RESULTS_DIR": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600, **kw)


def assert_one_line_error(proc, *needles: str) -> None:
    progress = re.compile(r"\d+/\d+ \[\d")  # a progress bar (TRL tokenizing the pairs) is not an error line
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "kernels" not in line
             and not progress.search(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and all(n in lines[0] for n in needles), lines


def _done(argv, code, capsys):
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


CLI_MISTAKES = {
    "missing data file": (["--dataset_name", "no_such_file.jsonl"], ["no_such_file.jsonl", "not found"]),
    "bad data file": (["--dataset_name", str(TEST_DATA / "non_string.jsonl")], ["non_string.jsonl", "row", "field"]),
    "unknown field": (["--learning-rte", "1e-3"], ["learning_rte", "did you mean 'learning_rate'"]),
    "old name": (["--grad_accum=4"], ["grad_accum", "did you mean 'gradient_accumulation_steps'"]),
    "no abbreviations": (["--lr", "1e-3"], ["unknown setting 'lr'"]),
    "the command's own flag": (["--confg", "my.yaml"], ["did you mean 'config'"]),
    "stray argument": (["smoke"], ["unrecognized arguments: smoke"]),
    "bad value": (["--max_steps", "many"], ["max_steps", "many"]),
    "unknown model": (["--model_name_or_path", "nobody/no-such-model"],  # the hint names settings as they are now
                      ["nobody/no-such-model", "set model_name_or_path to 'offline:"]),
    "unknown offline model": (["--model_name_or_path", "offline:gpt5"], ["gpt5"]),
    "bad setting": (["--optim", "no_such_optimizer", "--max_steps", "1"], ["no_such_optimizer"]),
    "validation too big": (["--validation_pairs", "500"], ["validation_pairs 500", "synthetic"]),
    # a split that cleaning leaves empty: one line that says why, not StopIteration from inside TRL
    "every pair too long": (["--max_length", "8"], ["none of the", "max_length 8"]),
    "no held-out pair": (["--max_pairs", "1"], ["no test pairs", "test_fraction"]),
    "no test split": (["--test_fraction", "0"], ["test_fraction must be in (0, 1)"]),
}


@pytest.mark.parametrize("case", CLI_MISTAKES)
def test_cli_user_mistakes_are_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_RESULTS_DIR", str(tmp_path / "results"))
    flags, needles = CLI_MISTAKES[case]
    assert_one_line_error(_run(cli.main, ["--profile", "smoke", "--max_pairs", "40", *flags], capsys), *needles)


def test_the_summary_compares_the_adapter_with_baselines_the_base_really_has():
    from dpo_pipeline.runs import RunRecord

    adapter = {"pairs": 8, "reward_accuracy": 0.625, "reward_accuracy_ci": [0.31, 0.86], "logp_accuracy": 0.5,
               "shorter_accuracy": 0.375}
    record = RunRecord(config={}, status="finished", evaluation=adapter, base_evaluation={"pairs": 8,
                                                                                          "logp_accuracy": 0.75})
    line = next(line for line in cli.summary(record).splitlines() if line.startswith("held-out"))
    assert line == ("held-out reward accuracy 0.625 [0.31, 0.86] over 8 pairs (pick the shorter 0.375); log-prob "
                    "accuracy 0.500, base 0.750")


def _run(main, argv, capsys):
    return _done(argv, run_command(main, argv), capsys)


@pytest.mark.slow
def test_a_real_process_exits_2_with_one_line_and_0_when_it_trains(tmp_path):
    assert_one_line_error(command(["dpo_pipeline", "train", "--profile", "smoke", "--beta", "-1"], tmp_path), "beta")
    assert_one_line_error(command(["dpo_pipeline", "nonsense"], tmp_path), "train")
    proc = command(["dpo_pipeline", "train", "--profile", "smoke", "--max_steps", "1", "--max_pairs", "40",
                    "--validation_pairs", "8", "--judge", "none", "--log_completions", "0"], tmp_path)
    assert proc.returncode == 0 and "status finished: 1 steps" in proc.stdout, proc.stderr[-2000:]


def test_sweep_user_mistakes_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_RESULTS_DIR", str(tmp_path / "results"))
    cases = {
        "unknown field": (dict(profile="smoke", grid={"learning_rte": [1e-3]}), ["learning_rte", "learning_rate"]),
        "not a list": (dict(profile="smoke", grid={"learning_rate": 1e-3}), ["learning_rate", "list"]),
        "unknown key": (dict(profile="smoke", grdi={"learning_rate": [1e-3]}), ["grdi"]),
        "old name": (dict(profile="smoke", grid={"optimizer": ["adamw"]}), ["optimizer", "did you mean 'optim'"]),
        "bad grid value": (dict(profile="smoke", grid={"beta": [0.1, -2]}), ["beta must be > 0"]),
        "bad data file": (dict(profile="smoke", base={"dataset_name": str(TEST_DATA / "missing_column.jsonl")},
                               grid={"beta": [0.1]}), ["missing_column.jsonl"]),
        "unreachable model": (dict(profile="smoke", base={"model_name_or_path": "nobody/no-such-model"},
                                   grid={"beta": [0.1]}), ["nobody/no-such-model"]),
    }
    for name, (spec, needles) in cases.items():
        proc = _run(sweep.main, [str(write_sweep(tmp_path / f"{name}.yaml", **spec))], capsys)
        assert_one_line_error(proc, *needles)
    assert_one_line_error(_run(sweep.main, ["no_such_sweep.yaml"], capsys), "no_such_sweep.yaml")
    (tmp_path / "broken.yaml").write_text("grid: [unclosed\n")
    assert_one_line_error(_run(sweep.main, [str(tmp_path / "broken.yaml")], capsys), "broken.yaml")


def test_a_folder_that_is_not_what_was_named_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_RESULTS_DIR", str(tmp_path / "results"))
    (tmp_path / "a_file").write_text("mine")
    smoke_sweep = ROOT / "configs" / "sweeps" / "smoke.yaml"
    assert_one_line_error(_run(sweep.main, [str(smoke_sweep), "--results-dir", str(tmp_path / "a_file")], capsys),
                          "a_file is a file")
    (tmp_path / "empty").mkdir()  # neither a model nor a tokenizer
    assert_one_line_error(_run(cli.main, ["--profile", "smoke", "--max_pairs", "40", "--model_name_or_path",
                                          str(tmp_path / "empty")], capsys), "without config.json")
    assert (tmp_path / "a_file").read_text() == "mine"


@pytest.mark.slow
def test_sweep_base_reaches_tokenizer_and_data_and_every_run_folder_is_complete(tmp_path, monkeypatch, capsys):
    # Profile `full` names a Hub model and dataset; the sweep's base replaces both, so nothing is fetched, and its
    # max_length (16: some synthetic prompts no longer fit) is the length the data is cleaned for and trained at.
    base = {**TINY, "max_length": 16, "max_eval_pairs": 16, "validation_pairs": 8,  # full's 2,000 are too many here
            "judge": "none"}  # full's judge is on the Hub
    spec = write_sweep(tmp_path / "sweep.yaml", profile="full", base=base, grid={"learning_rate": [1e-3, 2e-4]},
                       control="random")
    monkeypatch.setenv("DPO_RESULTS_DIR", str(tmp_path / "results"))
    proc = _run(sweep.main, [str(spec)], capsys)  # the command in this process
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each finished run says where its time went, and what the runs left would take at that pace
    assert re.search(r"\] 1/2 finished in \d+ s: build \d+ s, training \d+ s, evaluating \d+ s; at this pace about "
                     r"\d+ min for the 1 left\n", proc.stdout), proc.stdout[-3000:]
    assert re.search(r"\] 2/2 finished in \d+ s: build \d+ s, training \d+ s, evaluating \d+ s\n", proc.stdout)
    results = tmp_path / "results"
    expected = prepare_data(parse(base)).report.as_dict()
    assert expected["dropped"]["prompt_too_long"] > 0  # the length matters for this data
    folders = [d for d in (results / "runs").iterdir() if d.is_dir()] + [results / "best"]
    assert len(folders) == 4  # two runs, the control (the best settings on a random-weight twin), best/
    best = json.loads((results / "best" / "record.json").read_text())
    control = json.loads((results / "runs" / f"{best['run_id']}-control" / "record.json").read_text())
    assert control["config"] == {**best["config"], "model_name_or_path": "random-twin:offline:gpt2-tiny",
                                 "output_dir": best["config"]["output_dir"] + "-control"}
    sheet = __import__("openpyxl").load_workbook(results / "sweep_results.xlsx")["Runs"]
    rows = [dict(zip(next(sheet.iter_rows(values_only=True)), row)) for row in sheet.iter_rows(values_only=True)]
    assert any(row["run_id"] == control["run_id"] and row["base model"] == "random-twin:offline:gpt2-tiny"
               and row["search"] == "control" for row in rows)
    for folder in folders:
        for name in ("adapter_model.safetensors", "adapter_config.json", "run_config.json", "record.json",
                     "cleaning_report.json"):
            assert (folder / name).exists(), (folder, name)
        assert json.loads((folder / "cleaning_report.json").read_text()) == expected
        record = json.loads((folder / "record.json").read_text())
        assert record["config"]["model_name_or_path"].endswith("offline:gpt2-tiny")
        assert record["config"]["max_length"] == 16
    # The card pushed for the best adapter names its dataset (it reads cleaning_report.json).
    from dpo_pipeline.card import build_model_card

    assert "Training data: `synthetic`" in build_model_card(results / "best", "me/best").content


def test_app_shows_the_base_model_metrics(tmp_path):
    folder = make_tiny_adapter(tmp_path / "adapter")
    record = json.loads((folder / "record.json").read_text())
    record["base_evaluation"] = {"pairs": 8, "reward_accuracy": 0.0, "logp_accuracy": 0.625}
    (folder / "record.json").write_text(json.dumps(record))
    info = chat_session.describe(chat.load_adapter(str(folder)))
    assert info["metrics"]["base model"] == record["base_evaluation"]


@pytest.mark.slow  # builds a trainer, scores files or runs pip: kept out of the one-minute set
def test_evaluate_command_reports_intervals_and_baselines_and_one_line_errors(tmp_path, capsys):
    adapter = make_tiny_adapter(tmp_path / "adapter")
    pairs = TEST_DATA / "plain_good.jsonl"

    def evaluated() -> dict:
        proc = _run(evaluate.main, [str(adapter), "--pairs", str(pairs), "--split", "all", "--json"], capsys)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    plain = evaluated()
    # a control run's folder trained before "proxy" went: the file is scored as it is, with no validation slice
    # taken off its few pairs and no label swapped
    run_config = json.loads((adapter / "run_config.json").read_text())
    (adapter / "run_config.json").write_text(json.dumps({**run_config, "judge": "proxy", "validation_pairs": 8,
                                                         "shuffled_labels": True}))
    report = evaluated()
    assert report["policy"] == plain["policy"]
    policy, base = report["policy"], report["base"]
    n = load_preferences(str(pairs)).report.kept  # every pair the cleaning keeps (--split all)
    assert policy["pairs"] == base["pairs"] == n and report["prompt_format"] == "text"
    for metrics, keys in ((policy, ("reward_accuracy", "logp_accuracy")), (base, ("logp_accuracy",))):
        for key in (*keys, "shorter_accuracy", "longer_accuracy"):
            lo, hi = metrics[f"{key}_ci"]
            assert 0 <= lo <= metrics[key] <= hi <= 1
    assert policy["reward_ties"] < 1.0 and "reward_accuracy" not in base  # the base is the reference
    assert policy["shorter_accuracy"] == base["shorter_accuracy"]  # the baselines are the pairs', not the model's

    assert_one_line_error(_run(evaluate.main, [str(tmp_path / "nothing"), "--pairs", str(pairs)], capsys), "nothing")
    assert_one_line_error(_run(evaluate.main, [str(adapter), "--pairs", "missing.jsonl"], capsys), "missing.jsonl")
    assert_one_line_error(_run(evaluate.main, [str(adapter), "--pairs", str(pairs), "--prompts", "2",
                                               "--judge", str(tmp_path / "no_judge")], capsys), "no_judge")
    assert_one_line_error(_run(evaluate.main, [str(adapter), "--pairs", str(pairs), "--prompts", "2"], capsys),
                          "--judge")  # no judge by default
    assert_one_line_error(_run(evaluate.main, [str(adapter), "--pairs", str(pairs), "--behaviour", "-3"], capsys),
                          "--behaviour must be >= 0")



@pytest.mark.slow  # three models answer
def test_evaluate_command_reports_behaviour_against_a_control(tmp_path, capsys):
    adapter, pairs = make_tiny_adapter(tmp_path / "adapter"), TEST_DATA / "plain_good.jsonl"
    control = make_tiny_adapter(tmp_path / "control", seed=1)
    proc = _run(evaluate.main, [str(adapter), "--pairs", str(pairs), "--split", "all", "--behaviour", "1",
                                "--control", str(control), "--json"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    found = report["behaviour"]
    assert set(found["models"]) == {"base", "policy", "control"} and set(found["tests"]) == {
        "policy vs base", "policy vs control"}
    # the control ranks the same pairs, compared with the policy pair by pair
    assert report["control"]["pairs"] == report["policy"]["pairs"] == len(report["control"]["reward_won"])
    test = report["policy_vs_control"]
    policy, control = report["policy"], report["control"]
    assert test["difference"] == pytest.approx(policy["reward_accuracy"] - control["reward_accuracy"])
    assert test["only_first"] - test["only_second"] == policy["reward_wins"] - control["reward_wins"]
