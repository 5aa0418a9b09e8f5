"""Sweep stage: durable per-run records that survive SIGKILL, failed runs recorded, shared results folders."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openpyxl
import optuna
import pytest
import torch
import yaml

from dpo_pipeline import args as settings_lib, runs, sweep
from dpo_pipeline.synthetic import get_synthetic
from dpo_pipeline.args import ConfigError, parse
from dpo_pipeline.prepare import prepare_data

TINY_RUN = dict(max_steps=3, eval_steps=3, logging_steps=1, per_device_train_batch_size=4, max_length=48,
                load_in_4bit=False)


def write_spec(path: Path, grid: dict, steps: int = 3, **extra) -> Path:
    # no judge, no answers while training: what these sweeps test is the runner, not what a run measures
    spec = {"profile": "smoke", "base": {**TINY_RUN, "max_pairs": 100, "max_steps": steps, "eval_steps": steps,
                                         "judge": "none", "log_completions": 0},
            "grid": grid, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_cmd(spec: Path, results: Path) -> list[str]:
    return [sys.executable, "-m", "dpo_pipeline", "sweep", str(spec), "--results-dir", str(results)]


def run_dirs(results: Path) -> list[Path]:
    return sorted(p for p in (results / "runs").iterdir() if p.is_dir())


def kill_while_a_run_trains(cmd: list[str], results: Path, after_one_finished: bool = False,
                            after_a_checkpoint: bool = False):
    """Start a sweep command and SIGKILL it while a run trains (a run folder with a lock and no record; with
    `after_a_checkpoint`, one that has saved a checkpoint); returns the run folders (finished, in progress) then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        dirs = run_dirs(results) if (results / "runs").exists() else []
        done = [d for d in dirs if (d / "record.json").exists()]
        running = [d for d in dirs if (d / ".lock").exists() and not (d / "record.json").exists()
                   and (not after_a_checkpoint or list(d.glob("checkpoint-*/trainer_state.json")))]
        if running and (done or not after_one_finished):
            break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    else:
        pytest.fail("no run in progress seen")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return done, running


def test_grid_and_random_draws_and_stable_ids(tmp_path):
    spec = sweep.SweepSpec(grid={"learning_rate": [1e-3, 1e-4], "beta": [0.1, 0.5]}, base={"max_steps": 5},
                           profile="smoke")
    configs = spec.configs(tmp_path)
    assert len(configs) == 4 and len({c.dpo.output_dir for c in configs}) == 4
    assert {(c.dpo.learning_rate, c.dpo.beta) for c in configs} == {(1e-3, 0.1), (1e-3, 0.5), (1e-4, 0.1), (1e-4, 0.5)}
    assert all(c.dpo.max_steps == 5 for c in configs)
    again = spec.configs(tmp_path / "elsewhere")
    assert [Path(c.dpo.output_dir).name for c in again] == [Path(c.dpo.output_dir).name for c in configs]  # not path
    drawn = sweep.SweepSpec(grid=spec.grid, base={"max_steps": 5}, random_samples=3, sample_seed=1,
                            profile="smoke").configs(tmp_path)
    names = lambda cs: {Path(c.dpo.output_dir).name for c in cs}
    assert len(drawn) == 3 and names(drawn) < names(configs)  # random draws come from the grid


def test_every_profile_has_a_sweep_file_that_starts_from_it(tmp_path):
    # the notebook's default sweep (run_sweep with no sweep_spec): a profile without one stopped the notebook
    for profile in settings_lib.profiles():
        spec = sweep.SweepSpec.from_file(settings_lib.sweep_file(profile))
        assert spec.profile == profile and spec.configs(tmp_path), profile


def test_bad_sweep_file_is_one_line_naming_file_and_field(tmp_path):
    bad = write_spec(tmp_path / "bad.yaml", {"learning_rte": [1e-3]})
    with pytest.raises(ValueError) as err:
        sweep.SweepSpec.from_file(bad)
    assert "bad.yaml" in str(err.value) and "learning_rte" in str(err.value) and "\n" not in str(err.value)


def test_sweep_controls_are_named_kinds_and_a_wrong_one_is_one_line(tmp_path):
    assert sweep.SweepSpec(control=True).control == ["shuffled", "random"]
    assert sweep.SweepSpec(control="shuffled").control == ["shuffled"] and sweep.SweepSpec().control == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: smoke\ngrid: {learning_rate: [1.0e-3]}\ncontrol: shufled\n")
    with pytest.raises(ValueError) as err:
        sweep.SweepSpec.from_file(bad)
    assert "bad.yaml" in str(err.value) and "shufled" in str(err.value) and "\n" not in str(err.value)
    settings = settings_lib.resolve("smoke")[0]
    label = runs.control_of(settings, "shuffled")
    assert label.run.shuffled_labels and label.model.model_name_or_path == settings.model.model_name_or_path
    assert runs.control_of(settings, "random").model.model_name_or_path.startswith(runs.CONTROL_PREFIX)


def test_sweep_file_values_take_their_settings_types(tmp_path):
    # PyYAML reads YAML 1.1: `5e-5` without a dot is text there, the commonest way to write a learning rate
    path = tmp_path / "plain.yaml"
    path.write_text("profile: smoke\nbase: {max_steps: 2, learning_rate: 5e-5}\ngrid: {beta: [1e-1, 0.5]}\n")
    assert yaml.safe_load(path.read_text())["base"]["learning_rate"] == "5e-5"
    configs = sweep.SweepSpec.from_file(path).configs(tmp_path / "runs")
    assert {(c.dpo.learning_rate, c.dpo.beta, c.dpo.max_steps) for c in configs} == {(5e-5, 0.1, 2), (5e-5, 0.5, 2)}
    assert all(type(c.dpo.max_steps) is int and type(c.dpo.learning_rate) is float for c in configs)
    for text, wanted in [("base: {max_steps: ten}", "--max_steps/--max-steps: invalid int value: 'ten'"),
                         ("base: {max_steps: 2.5}", "invalid int value: '2.5'"),
                         ("base: {packing: 'maybe'}", "--packing: Truthy value expected"),
                         ("grid: {learning_rate: [1e-3, fast]}", "invalid float value: 'fast'"),
                         ("search: tpe\ntrials: 2\nspace: {beta: {low: 1e-2, high: big}}", "invalid float value")]:
        path.write_text(f"profile: smoke\n{text}\n")
        with pytest.raises(ConfigError) as err:
            sweep.SweepSpec.from_file(path)
        assert str(err.value).startswith(f"{path}: ") and wanted in str(err.value), str(err.value)


def fake_training(monkeypatch, interrupt_at: int = 0) -> list[str]:
    """sweep.run_one without training: a finished record whose reward accuracy is the run's beta. Returns the ids
    of the runs it was asked for, in order; the `interrupt_at`-th is stopped by Ctrl-C."""
    asked = []

    def run_one(settings, data=None, search=None, **run_kwargs):
        asked.append(Path(settings.dpo.output_dir).name)
        if len(asked) == interrupt_at:
            raise KeyboardInterrupt
        return runs.RunRecord(config=settings.to_dict(), status="finished", run_id=asked[-1], search=dict(search or {}),
                              final_eval={"rewards/accuracies": settings.dpo.beta, "loss": 0.5})
    monkeypatch.setattr(sweep, "run_one", run_one)
    return asked


def trials(results: Path, study: str = "sweep") -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{results / 'optuna.db'}").trials


def test_grid_and_random_are_one_study_that_makes_each_run_once(tmp_path, monkeypatch, capsys):
    asked = fake_training(monkeypatch)
    spec = sweep.SweepSpec(grid={"learning_rate": [1e-3, 1e-4], "beta": [0.1, 0.5]}, base={"max_steps": 5},
                           profile="smoke", control=True)
    assert spec.prune is False and sweep.SweepSpec(search="tpe").prune is True  # pruning would change grid results
    ids = sorted(Path(c.dpo.output_dir).name for c in spec.configs(tmp_path))
    records = sweep.run_spec(spec, tmp_path / "grid")
    out = capsys.readouterr().out
    assert sorted(asked[:4]) == ids and sorted(re.findall(r"\] (\d)/4 training: ", out)) == ["1", "2", "3", "4"]
    assert [t.params["run"] for t in trials(tmp_path / "grid")] == asked[:4]  # a trial a run
    best = max(records[:4], key=lambda r: r["final_eval"]["rewards/accuracies"])
    assert [r["run_id"] for r in records[4:]] == [best["run_id"] + "-shuffled", best["run_id"] + "-control"]
    assert all(r["search"] == {"method": "control"} for r in records[4:])  # both controls, never the best
    assert {r["search"]["method"] for r in records[:4]} == {"grid"}

    assert len(sweep.run_spec(spec, tmp_path / "grid")) == 6  # run again: nothing trained, the study left as it was
    assert len(asked) == 6 and len(trials(tmp_path / "grid")) == 4
    assert "4 of the sweep's 4 runs are made already (they are not trained again)" in capsys.readouterr().out

    drawn = sweep.SweepSpec(grid=spec.grid, base=spec.base, random_samples=3, sample_seed=1, profile="smoke")
    asked.clear()
    records = sweep.run_spec(drawn, tmp_path / "random")
    assert sorted(asked) == sorted(Path(c.dpo.output_dir).name for c in drawn.configs(tmp_path))  # today's draws
    assert len(records) == 3 and {r["search"]["method"] for r in records} == {"random"}


def test_a_run_stopped_by_ctrl_c_is_redone_and_only_it(tmp_path, monkeypatch):
    spec = sweep.SweepSpec(grid={"learning_rate": [1e-3, 5e-4, 2e-4]}, profile="smoke")
    asked = fake_training(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_spec(spec, tmp_path)
    first, stopped = asked
    assert not list((tmp_path / "runs").glob("*/.lock"))  # the lock is given back
    asked = fake_training(monkeypatch)
    records = sweep.run_spec(spec, tmp_path)  # the study has counted the stopped trial as done: it is made anyway
    assert stopped in asked and first not in asked and len(asked) == 2 and len(records) == 3


@pytest.mark.slow
def test_sweep_records_failures_and_goes_on_then_skips_on_restart(tiny_gpt2, random_reward_model, tmp_path, capsys):
    # a learning rate of 1e30 is a valid setting that fails while training (a non-finite loss). The finished runs are
    # judged (a reward model in fp32) between DPO runs that autocast to bf16 where the CPU has it natively.
    spec = sweep.SweepSpec(grid={"learning_rate": [1e-3, 1e30], "beta": [0.1, 0.2]}, profile="smoke",
                           base={**TINY_RUN, "model_name_or_path": tiny_gpt2, "max_pairs": 100,
                                 "judge": random_reward_model, "judge_prompts": 2})
    records = sweep.run_spec(spec, tmp_path)
    assert len(records) == 4
    by_status = {s: [r for r in records if r["status"] == s] for s in ("finished", "failed")}
    assert len(by_status["finished"]) == 2 and len(by_status["failed"]) == 2
    for failed in by_status["failed"]:
        assert "non-finite" in failed["error"] and "\n" not in failed["error"]
    test_pairs = len(prepare_data(spec.base_config()[0]).test)
    for done in by_status["finished"]:
        assert done["train_steps"] == 3 and done["evaluation"]["pairs"] == test_pairs
        assert 0 <= done["evaluation"]["reward_accuracy"] + done["evaluation"]["reward_ties"] <= 1
        assert "reward_accuracy" not in done["base_evaluation"]  # the base is the reference: no reward of its own
        assert 0 <= done["base_evaluation"]["logp_accuracy"] <= 1
        judged = done["judged"]  # its answers and the base's to 2 validation prompts, judged; the judge checked
        assert judged["n"] == 2 and judged["judge_pairs"] == test_pairs and 0 <= judged["judge_accuracy"] <= 1
        assert (Path(done["adapter_path"]) / "judged.json").exists()

    mtimes = {d: (d / "record.json").stat().st_mtime_ns for d in run_dirs(tmp_path)}
    capsys.readouterr()
    sweep.run_spec(spec, tmp_path)  # a restart: everything has a record, nothing is trained again
    assert "training" not in capsys.readouterr().out and len(trials(tmp_path)) == 4  # no trial added either
    assert {d: (d / "record.json").stat().st_mtime_ns for d in run_dirs(tmp_path)} == mtimes

    best = runs.pick_best(records)
    assert best["status"] == "finished"
    key = lambda r: (r["final_eval"]["rewards/accuracies"], -r["final_eval"]["loss"])
    assert key(best) == max(key(r) for r in by_status["finished"])
    published = runs.publish_best(best, tmp_path / "best")
    assert (published / "adapter_model.safetensors").read_bytes() == \
        (Path(best["config"]["output_dir"]) / "adapter_model.safetensors").read_bytes()
    assert json.loads((published / "record.json").read_text())["run_id"] == best["run_id"]


@pytest.mark.slow
def test_nan_loss_fails_the_run_with_one_line(tiny_gpt2, tmp_path):
    config = parse(dict(model_name_or_path=tiny_gpt2, **{**TINY_RUN, "learning_rate": 1e30, "max_steps": 4},
                        output_dir=str(tmp_path / "nan")))
    record = sweep.run_one(config, get_synthetic(n_pairs=60, seed=0))
    assert record.status == "failed" and "non-finite" in record.error, record.error


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_failed_run_hands_its_gpu_memory_back_before_the_next(tiny_gpt2, tmp_path):
    data = get_synthetic(n_pairs=60, seed=0)
    free, _ = torch.cuda.mem_get_info()
    start = torch.cuda.memory_allocated()

    def hog_then_oom(trainer):  # a run holding most of the GPU that then runs out of memory (a real CUDA OOM)
        trainer.hog = torch.empty(int(free * 0.7), dtype=torch.uint8, device="cuda")
        torch.empty(int(free * 2), dtype=torch.uint8, device="cuda")

    def hog(trainer):  # the next run needs most of the GPU too
        trainer.hog = torch.empty(int(free * 0.7), dtype=torch.uint8, device="cuda")

    config = parse(dict(model_name_or_path=tiny_gpt2, **TINY_RUN, output_dir=str(tmp_path / "a")))
    failed = sweep.run_one(config, data, setup=hog_then_oom)
    assert failed.status == "failed" and "OutOfMemoryError" in failed.error, failed.error
    assert torch.cuda.memory_allocated() - start < 0.05 * free  # handed back, not held by the failed run
    done = sweep.run_one(config.replace(output_dir=str(tmp_path / "b")), data, setup=hog)
    assert done.status == "finished", done.error


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_gives_exactly_one_row_per_config(tmp_path):
    steps = 300 if torch.cuda.is_available() else 8  # a run on a GPU must last long enough to be killed mid-way
    spec = write_spec(tmp_path / "sweep.yaml", {"learning_rate": [1e-3, 5e-4, 2e-4]}, steps=steps, heartbeat_seconds=1)
    spec.write_text(spec.read_text().replace("base:", f"base:\n  save_steps: {steps // 4}", 1))
    results = tmp_path / "results"
    # Kill it while a run is in progress after at least one finished and after the run saved a checkpoint.
    done, running = kill_while_a_run_trains(sweep_cmd(spec, results), results, after_one_finished=True,
                                            after_a_checkpoint=True)
    killed_run = running[0]
    assert (killed_run / ".lock").exists() and not (killed_run / "record.json").exists()
    first_done = {d: (d / "record.json").read_bytes() for d in done}

    assert sweep.main([str(spec), "--results-dir", str(results)]) == 0  # the restart, in this process
    dirs = run_dirs(results)
    assert len(dirs) == 3 and all((d / "record.json").exists() and not (d / ".lock").exists() for d in dirs)
    records = [json.loads((d / "record.json").read_text()) for d in dirs]
    assert sorted(r["config"]["learning_rate"] for r in records) == [2e-4, 5e-4, 1e-3]
    assert all(r["status"] == "finished" and r["train_steps"] == steps for r in records)
    assert {d: (d / "record.json").read_bytes() for d in done} == first_done  # finished runs were not redone
    # the killed run went on from its checkpoint, not from step 0; the others trained through
    resumed = {d.name: json.loads((d / "record.json").read_text())["resumed_from_step"] for d in dirs}
    assert resumed.pop(killed_run.name) >= steps // 4 and set(resumed.values()) == {None}, resumed
    # the study's heartbeat failed the dead worker's trial and queued its run again (the same folder)
    assert any(t.state == optuna.trial.TrialState.FAIL and t.params["run"] == killed_run.name for t in trials(results))

    sheet = openpyxl.load_workbook(results / "sweep_results.xlsx")["Runs"]
    ids = [row[0] for row in sheet.iter_rows(min_row=2, values_only=True) if row[0] in {r["run_id"] for r in records}]
    assert sorted(ids) == sorted(r["run_id"] for r in records)  # exactly one row per config
    assert (results / "best" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_share_one_results_folder(tmp_path):
    spec = write_spec(tmp_path / "sweep.yaml", {"learning_rate": [1e-3, 5e-4, 2e-4]}, steps=2)
    results = tmp_path / "results"
    procs = [subprocess.Popen(sweep_cmd(spec, results), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert sum(o.count("training:") for o in outputs) == 3  # each run trained once, by one of the processes
    dirs = run_dirs(results)
    assert len(dirs) == 3 and all(json.loads((d / "record.json").read_text())["status"] == "finished" for d in dirs)
    assert openpyxl.load_workbook(results / "sweep_results.xlsx")["Runs"].max_row >= 4


def test_best_run_rule_by_win_rate_and_never_a_control():
    def record(run_id, accuracy, win_rate, model="offline:gpt2-tiny"):
        return {"run_id": run_id, "status": "finished", "config": {"model_name_or_path": model},
                "final_eval": {"rewards/accuracies": accuracy, "loss": 0.6}, "judged": {"win_rate": win_rate}}

    shuffled = {**record("shuffled", 1.0, 0.99), "config": {"model_name_or_path": "x", "shuffled_labels": True}}
    records = [record("a", 0.9, 0.40), record("b", 0.6, 0.70), record("c", 0.7, 0.70),
               record("control", 1.0, 0.99, model="random-twin:offline:gpt2-tiny"), shuffled]
    assert runs.pick_best(records)["run_id"] == "a"  # reward accuracy, the control left out
    assert runs.pick_best(records, "win_rate")["run_id"] == "c"  # win rate, then reward accuracy
    with pytest.raises(ValueError, match="best_by"):
        runs.pick_best(records, "loss")
