"""The notebook runs top to bottom headless with papermill (smoke profile), the way CI and users run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import openpyxl
import pytest

from dpo_pipeline import args as settings_lib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "dpo_gpt2.ipynb"


def test_notebook_is_committed_clean_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'profile = "auto"' in tagged[0].source


def test_auto_profile_without_gpu_or_hub_is_smoke_and_says_why():
    settings, name, why = settings_lib.resolve("auto")
    if name == "smoke":  # no GPU or no Hub (CI, or a GPU machine without the Hub)
        assert "no CUDA GPU" in why or "no Hub access" in why
        assert settings.run.dataset_name == "synthetic" and settings.model.model_name_or_path == "offline:gpt2-tiny"


def test_every_notebook_parameter_is_a_setting_or_a_notebook_switch():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line.split("#")[0]]
    switches = {"profile", "control_run", "behaviour_prompts", "run_sweep", "sweep_spec", "hub_repo_id", "hub_private"}
    assert [n for n in names if n not in switches and n not in settings_lib.field_names()] == []


def test_a_mistyped_or_old_parameter_name_is_one_line_not_silently_ignored():
    switches = ["profile", "control_run", "behaviour_prompts", "run_sweep", "sweep_spec", "hub_repo_id", "hub_private"]
    settings_lib.check_notebook_names([*settings_lib.field_names(), *switches, "In", "Out", "get_ipython", "pipeline"])
    for name, meant in (("learning_rte", "learning_rate"), ("max_step", "max_steps"), ("model", "model_name_or_path")):
        with pytest.raises(settings_lib.ConfigError, match=f"unknown setting '{name}' \\(did you mean '{meant}'"):
            settings_lib.check_notebook_names([*switches, name])


@pytest.mark.slow
def test_notebook_smoke_profile_end_to_end(tmp_path):
    executed = tmp_path / "executed.ipynb"
    env = {**os.environ, "DPO_RESULTS_DIR": str(tmp_path / "results")}
    subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOK), str(executed), "-k", "python3",
         "-p", "profile", "smoke", "-p", "max_steps", "8", "-p", "eval_steps", "4", "-p", "behaviour_prompts", "8",
         "--log-output"],
        check=True, cwd=ROOT / "notebooks", env=env, timeout=900,
    )
    nb = nbformat.read(executed, as_version=4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Profile: smoke (asked for)" in text
    assert "rows read" in text and "history_mismatch" in text  # the cleaning report is shown
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert any(o.get("data", {}).get("image/png") for c in nb.cells for o in c.get("outputs", []))  # the plot

    run = tmp_path / "results" / "run-smoke"
    record = json.loads((run / "record.json").read_text())
    assert record["train_steps"] == 8 and record["status"] == "finished"
    assert set(record["final_eval"]) >= {"loss", "rewards/accuracies", "rewards/margins"}
    assert (run / "adapter_model.safetensors").exists()
    report = json.loads((run / "cleaning_report.json").read_text())
    assert report["source"] == "synthetic" and report["kept"] == sum(report["splits"].values())
    assert "doctor:" in text  # the run's findings, or that it has none
    # both controls trained beside it, and base, DPO and the shuffled control compared on held-out prompts
    shuffled = json.loads((tmp_path / "results" / "run-smoke-shuffled" / "record.json").read_text())
    assert shuffled["config"]["shuffled_labels"] is True and (tmp_path / "results" / "run-smoke-control").is_dir()
    behaviour = json.loads((run / "behaviour.json").read_text())
    assert set(behaviour["tests"]) == {"policy vs base", "policy vs control"} and "Holm" in text
    assert set(behaviour["findings"]) <= set(record["findings"])  # the doctor on the answers, kept in the record

    # The sweep: the profile's own (configs/sweeps/smoke.yaml, 3 runs drawn from a grid; a TPE study is
    # test_search's); each run has a record, the best is published, the workbook made, the best run's answers while
    # training shown.
    runs = [d for d in (tmp_path / "results" / "runs").iterdir() if (d / "record.json").exists()]
    assert len(runs) == 3 and (tmp_path / "results" / "optuna.db").exists()
    best = json.loads((tmp_path / "results" / "best" / "record.json").read_text())
    assert best["run_id"] in {d.name for d in runs} and f"Best run: {best['run_id']}" in text
    assert (tmp_path / "results" / "best" / "adapter_model.safetensors").exists()
    sheets = openpyxl.load_workbook(tmp_path / "results" / "sweep_results.xlsx").sheetnames
    assert {"Runs", "History", "Summary", "Samples", "Charts", "Completions"} <= set(sheets)
    assert (tmp_path / "results" / "plots" / "sweep.png").stat().st_size > 10_000
    assert "Not pushing: no Hub repo id given" in text  # the push cell is skipped cleanly without a repo id
    assert (tmp_path / "results" / "best-merged" / "config.json").exists()  # the export step


@pytest.mark.slow  # starts a kernel
def test_a_mistake_in_the_notebook_is_one_line_and_any_other_error_keeps_its_traceback():
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in (
        "from dpo_pipeline.errors import one_line_in_notebook\none_line_in_notebook()",
        "from dpo_pipeline.args import parse\nparse({'model_name_or_path': 'x', 'beta': -1})",  # a user's mistake
        "def divide():\n    return 1 / 0\ndivide()",  # a bug
        "raise Exception('plain')",
    )])
    NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=120).execute()
    mistake, bug, plain = ([o for o in cell.outputs if o.output_type == "error"] for cell in nb.cells[1:])
    assert len(mistake) == 1 and mistake[0].ename == "ConfigError"
    assert len(mistake[0].traceback) == 1 and "beta must be > 0" in mistake[0].traceback[0]
    assert bug[0].ename == "ZeroDivisionError" and "divide()" in "".join(bug[0].traceback)  # the frames are shown
    assert plain[0].ename == "Exception" and len(plain[0].traceback) > 1
