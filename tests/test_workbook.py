"""Sweep workbook and plots, built from checked-in records of real tiny runs and read back the way a spreadsheet
user sees them. tests/data/make_workbook_records.py made tests/data/workbook_records.json (and checks it still
matches what a run writes, in the one slow test below)."""

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib import image as mpimg
from openpyxl import load_workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.chart import ScatterChart

from dpo_pipeline.report import plot_history, save_plots
from dpo_pipeline.workbook import (BASELINE_LABEL, COST_COLUMNS, EVAL_COLUMNS, JUDGED_COLUMNS, RUN_COLUMNS,
                                   build_workbook, runs_frame)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "data" / "workbook_records.json"
GREEN, RED, GREY = "C6EFCE", "C00000", "808080"
SHEETS = ["Runs", "Summary", "Charts", "History", "Samples", "Completions", "ChartData"]


def load_records() -> tuple[list[dict], dict]:
    """The records and build_workbook's keyword arguments, as the sweep passes them."""
    made = json.loads(RECORDS.read_text())
    return made.pop("records"), made


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three real tiny runs (learning rate and beta varied, the first with a held-out evaluation, the base model's
    too), one failed run as the sweep records it, and the workbook built from them."""
    records, kwargs = load_records()
    finished = [r for r in records if r["status"] == "finished"]
    ranking = sorted(finished, key=lambda r: (-r["final_eval"]["rewards/accuracies"], r["final_eval"]["loss"]))
    assert ranking[0]["run_id"] == kwargs["best_run_id"] and len(finished) == 3 and records[3]["status"] == "failed"
    path = build_workbook(records, tmp_path_factory.mktemp("sweep") / "out" / "sweep.xlsx", **kwargs)
    return {"records": records, "ranking": ranking, "kwargs": kwargs, "path": path, "wb": load_workbook(path)}


def columns(ws, row: int = 1) -> dict[str, int]:
    return {cell.value: cell.column for cell in ws[row] if cell.value is not None}


def test_sheets_and_runs_rows_match_the_records(sweep):
    wb, records = sweep["wb"], sweep["records"]
    assert wb.sheetnames == SHEETS
    answers = [row for row in wb["Completions"].iter_rows(min_row=2, values_only=True)]  # answers while training
    assert answers == [(r["run_id"], c["step"], c["prompt"], c["completion"]) for r in records
                       for c in r["completions"]] and answers
    ws, col = wb["Runs"], columns(wb["Runs"])
    assert list(col) == [c[0] for c in RUN_COLUMNS + EVAL_COLUMNS + COST_COLUMNS]  # no run was judged
    for header in ("run_id", "status", "search", "base model", "learning_rate", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "beta", "optim", "loss_type", "lora_r", "lora_alpha",
                   "lora_dropout", "num_train_epochs", "max_steps", "max_length", "seed", "final train loss",
                   "eval loss", "eval reward accuracy", "eval reward margin", "eval chosen reward",
                   "eval rejected reward", "held-out pairs", "held-out reward accuracy", "reward accuracy 95% CI",
                   "reward ties", "held-out reward margin", "logp accuracy", "chosen logp shift",
                   "rejected logp shift", "logp accuracy 95% CI", "pick-the-shorter baseline", "train steps",
                   "wall time (s)", "run time (s)", "evaluating (s)", "pairs/s", "error"):
        assert header in col, header
    ids = [ws.cell(r, 1).value for r in range(2, ws.max_row + 1)]
    assert ids[:len(records) + 1] == [BASELINE_LABEL] + [r["run_id"] for r in records]
    assert ws.cell(len(records) + 4, 1).value.startswith("Best run")  # header, base, runs, a blank row, the note
    baseline = sweep["kwargs"]["baseline"]
    # the base is the reference: no implicit reward of its own, so blank there rather than a misleading 0
    assert [ws.cell(2, col[h]).value for h in ("held-out reward accuracy", "reward ties", "held-out reward margin",
                                               "reward accuracy 95% CI")] == [None] * 4
    assert ws.cell(2, col["logp accuracy"]).value == pytest.approx(baseline["logp_accuracy"])
    lo, hi = baseline["logp_accuracy_ci"]
    assert ws.cell(2, col["logp accuracy 95% CI"]).value == f"{lo:.2f}-{hi:.2f}"
    assert ws.cell(2, col["status"]).value == "reference" and ws.cell(2, col["eval loss"]).value is None
    assert ws.cell(2, 1).font.i and ws.cell(2, 1).font.color.rgb.endswith(GREY)
    for row, rec in enumerate(records, start=3):
        cell = lambda name: ws.cell(row, col[name]).value
        assert cell("status") == rec["status"] and cell("seed") == rec["config"]["seed"]
        assert cell("search") == "grid" and cell("base model") == rec["config"]["model_name_or_path"]
        assert cell("learning_rate") == pytest.approx(rec["config"]["learning_rate"])
        assert cell("beta") == pytest.approx(rec["config"]["beta"])
        assert cell("wall time (s)") == pytest.approx(rec["wall_time_s"])
        t = rec["timings_s"]  # the run's total, and its evaluations, held-out scoring, answers, judging summed
        if rec["status"] == "failed":
            assert t == {} and cell("run time (s)") is None and cell("evaluating (s)") is None
        else:
            assert cell("run time (s)") == pytest.approx(t["total"]) and t["total"] > rec["wall_time_s"]
            assert cell("evaluating (s)") == pytest.approx(t["evaluations"] + t["answers"] + t["held_out"]
                                                           + t["judged"])
        for name, key in (("eval loss", "loss"), ("eval reward accuracy", "rewards/accuracies"),
                          ("eval reward margin", "rewards/margins"), ("eval rejected reward", "rewards/rejected")):
            expected = rec["final_eval"].get(key)
            assert cell(name) == (pytest.approx(expected) if expected is not None else None), (name, row)
        extra = rec["evaluation"].get("chosen_logp_shift")
        assert cell("chosen logp shift") == (pytest.approx(extra) if extra is not None else None)


def test_best_row_alone_is_highlighted_and_failed_row_is_red(sweep):
    ws, records, col = sweep["wb"]["Runs"], sweep["records"], columns(sweep["wb"]["Runs"])
    best_row = 3 + [r["run_id"] for r in records].index(sweep["ranking"][0]["run_id"])
    for row in range(2, len(records) + 3):
        cells = [ws.cell(row, c) for c in range(1, len(col) + 1)]
        green = [c.fill.fgColor.rgb.endswith(GREEN) for c in cells if c.fill.fill_type == "solid"]
        if row == best_row:
            assert len(green) == len(cells) and all(green) and all(c.font.b for c in cells)
        else:
            assert not any(green), row
    failed_row = len(records) + 2
    assert ws.cell(failed_row, col["status"]).value == "failed"
    assert ws.cell(failed_row, col["error"]).value == "ValueError: learning_rate must be positive"
    assert ws.cell(failed_row, 1).font.color.rgb.endswith(RED)
    assert ws.cell(failed_row, col["eval loss"]).value is None
    plain = ws.cell(3, col["status"]).font  # a finished run that is not the best
    assert not plain.b and not plain.i and not str(plain.color.rgb).endswith(RED)


def test_runs_layout_frozen_filtered_formatted(sweep):
    ws, n = sweep["wb"]["Runs"], len(sweep["records"])
    col = columns(ws)
    assert ws.freeze_panes == "B2"
    last = max(col.values())
    assert ws.auto_filter.ref == f"A1:{ws.cell(1, last).column_letter}{n + 2}"  # header, base model, runs
    assert ws.cell(3, col["learning_rate"]).number_format == "0.0E+00"
    assert ws.cell(3, col["eval loss"]).number_format == "0.000"
    assert ws.cell(3, col["wall time (s)"]).number_format == "0.0"
    assert ws.cell(3, col["seed"]).number_format == "0"
    assert ws.cell(3, col["status"]).alignment.horizontal == "center"
    assert ws.cell(n + 2, col["error"]).alignment.indent == 1
    header = ws.cell(1, col["eval loss"])
    assert header.font.b and header.fill.fgColor.rgb.endswith("DDEBF7") and header.alignment.wrap_text
    width = lambda name: ws.column_dimensions[ws.cell(1, col[name]).column_letter].width
    assert width("run_id") >= max(len(BASELINE_LABEL), *(len(r["run_id"]) for r in sweep["records"]))
    assert width("error") >= len("ValueError: learning_rate must be positive")
    note = ws.cell(n + 4, 1)
    assert note.font.i and sweep["ranking"][0]["run_id"] in note.value and "Red: a failed run" in ws.cell(n + 5, 1).value
    assert ws.print_title_cols == "$A:$A" and ws.print_title_rows == "$1:$1"
    assert ws.page_setup.orientation == "landscape" and ws.page_setup.fitToWidth == 2


def test_charts_have_one_series_per_finished_run(sweep):
    wb, finished = sweep["wb"], sweep["records"][:3]
    charts = wb["Charts"]._charts
    assert len(charts) == 4 and all(isinstance(c, ScatterChart) for c in charts)
    assert all(len(c.series) == len(finished) for c in charts)
    assert [c.title.tx.rich.p[0].r[0].t for c in charts] == ["train loss", "eval loss", "train reward margin",
                                                              "eval reward margin"]
    # The first chart (train loss) draws ChartData numbers that are the runs' logged train losses.
    data = wb["ChartData"]
    assert data.cell(1, 1).value == "train loss" and data.cell(2, 1).value == "step"
    assert [data.cell(2, j).value for j in range(2, 5)] == [r["run_id"] for r in finished]
    steps = [data.cell(i, 1).value for i in range(3, data.max_row + 1) if data.cell(i, 1).value is not None]
    first = {e["step"]: e["loss"] for e in finished[0]["log_history"] if "loss" in e}
    assert steps == sorted(first) and [data.cell(3 + k, 2).value for k in range(len(steps))] == [
        pytest.approx(first[s]) for s in steps]
    evals = {e["step"]: e["eval_loss"] for e in finished[0]["log_history"] if "eval_loss" in e}
    assert data.cell(1, 6).value == "eval loss" and [data.cell(3 + k, 6).value for k in range(len(evals))] == sorted(
        evals)  # the next block, after a blank column
    assert [data.cell(3 + k, 7).value for k in range(len(evals))] == [pytest.approx(evals[s]) for s in sorted(evals)]
    for chart in charts:  # every line reads ChartData, its name from the run id in the header row
        for series in chart.series:
            assert all(ref.startswith("'ChartData'!") for ref in (series.yVal.numRef.f, series.xVal.numRef.f))
            assert re.fullmatch(r"'ChartData'!\$?[A-Z]+\$?2", series.tx.strRef.f)
    best = [r["run_id"] for r in finished].index(sweep["ranking"][0]["run_id"])
    assert [s.graphicalProperties.line.width for s in charts[0].series] == [
        38100 if j == best else 19050 for j in range(len(finished))]  # the best run drawn thicker


def test_history_has_every_logged_step(sweep):
    ws, records = sweep["wb"]["History"], sweep["records"]
    logged = [(r["run_id"], e) for r in records for e in r["log_history"] if "loss" in e or "eval_loss" in e]
    assert ws.max_row - 1 == len(logged) and ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == f"A1:M{len(logged) + 1}"
    col = columns(ws)
    assert list(col) == ["run_id", "step", "split", "loss", "reward accuracy", "reward margin", "chosen reward",
                         "rejected reward", "chosen logp", "rejected logp", "learning rate", "grad norm", "epoch"]
    for row, (run_id, entry) in enumerate(logged, start=2):
        split = "eval" if "eval_loss" in entry else "train"
        assert (ws.cell(row, 1).value, ws.cell(row, col["step"]).value, ws.cell(row, col["split"]).value) == (
            run_id, entry["step"], split)
        assert ws.cell(row, col["loss"]).value == pytest.approx(entry["eval_loss" if split == "eval" else "loss"])
        if split == "eval":  # no learning rate or grad norm is logged with an evaluation: blank, not zero or NaN
            assert ws.cell(row, col["learning rate"]).value is None and ws.cell(row, col["grad norm"]).value is None
        else:
            assert ws.cell(row, col["learning rate"]).value == pytest.approx(entry["learning_rate"])
    assert ws.cell(2, col["learning rate"]).number_format == "0.0E+00" and ws.cell(2, col["loss"]).number_format == "0.000"


def test_summary_names_best_runner_up_data_and_model(sweep):
    ws, ranking, kwargs = sweep["wb"]["Summary"], sweep["ranking"], sweep["kwargs"]
    rows = {ws.cell(r, 1).value: ws.cell(r, 2).value for r in range(1, ws.max_row + 1)}
    assert ws.cell(1, 1).value == "DPO sweep summary" and rows["runs"] == "4 (3 finished, 1 failed)"
    assert rows["best run"] == ranking[0]["run_id"] and rows["runner-up"] == ranking[1]["run_id"]
    assert rows["rule"] == kwargs["best_rule"] and f"{ranking[0]['final_eval']['loss']:.3f}" in rows["why"]
    report = kwargs["summary"]["data"]
    assert rows["rows_read"] == report["rows_read"] and rows["kept"] == report["kept"]
    assert rows["  duplicate_pair"] == report["dropped"]["duplicate_pair"]
    assert rows["trainable_params"] == ranking[0]["model_info"]["trainable_params"]
    assert rows["grid"] is None and rows["  learning_rate"] == "[0.001, 0.0002]"  # a nested dict: a small table
    assert rows["generated at"].endswith("UTC")
    assert rows["eval loss"] == pytest.approx(ranking[0]["final_eval"]["loss"])  # the transposed comparison
    titles = [ws.cell(r, 1).value for r in range(1, ws.max_row + 1) if ws.cell(r, 1).font.sz == 12]
    assert titles == ["Best configuration and why", "Data (cleaning report)", "Model", "Sweep"]
    top = next(r for r in range(1, ws.max_row + 1) if ws.cell(r, 1).value == "quantity")
    assert [ws.cell(top, c).value for c in range(1, 5)] == [
        "quantity", f"best: {ranking[0]['run_id']}", f"runner-up: {ranking[1]['run_id']}", BASELINE_LABEL]
    by_name = {ws.cell(r, 1).value: r for r in range(top, ws.max_row + 1)}
    accuracy = by_name["held-out reward accuracy"]
    assert ws.cell(accuracy, 4).value is None  # the base has no implicit reward: it is the reference
    assert ws.cell(by_name["logp accuracy"], 4).value == pytest.approx(kwargs["baseline"]["logp_accuracy"])
    assert ws.cell(accuracy, 2).fill.fgColor.rgb.endswith(GREEN) and ws.cell(accuracy, 2).number_format == "0.000"
    why = next(r for r in range(1, ws.max_row + 1) if ws.cell(r, 1).value == "why")
    assert ws.row_dimensions[why].height >= 30 and ws.cell(why, 2).alignment.wrap_text  # best and runner-up lines


def test_samples_keep_every_text_safely(sweep):
    ws, samples = sweep["wb"]["Samples"], sweep["kwargs"]["samples"]
    col = columns(ws)
    assert list(col) == ["prompt", "base (greedy)", "adapter (greedy)", "base (sampled)", "adapter (sampled)"]
    for row, sample in enumerate(samples[:2], start=2):  # real generations, control characters made visible
        assert all(ws.cell(row, col[k]).value == ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", v)
                   for k, v in sample.items() if v)
    edge = ws.cell(4, col["adapter (greedy)"])
    assert edge.data_type == "s" and edge.value.startswith("=1+1") and "\x07" not in edge.value  # text, not formula
    assert ws.cell(4, col["base (greedy)"]).value is None  # a key the edge case lacks: blank
    assert ws.cell(2, 1).alignment.wrap_text and ws.column_dimensions["B"].width >= 40
    assert ws.freeze_panes == "B2" and ws.row_dimensions[2].height >= 45  # the prompt's blank lines


def test_rebuild_is_deterministic_and_atomic(sweep, tmp_path):
    target = tmp_path / "sweep.xlsx"
    target.write_text("an older workbook")
    build_workbook(sweep["records"], target, **sweep["kwargs"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.xlsx"]  # replaced, no temp file left
    again = load_workbook(target)
    for ws in sweep["wb"].worksheets:
        values = lambda sheet: [[c.value for c in row] for row in sheet.iter_rows()
                                if sheet.title != "Summary" or row[0].value != "generated at"]
        assert values(ws) == values(again[ws.title]), ws.title


def test_tpe_search_adds_a_trials_sheet(sweep, tmp_path):
    records = copy.deepcopy(sweep["records"])
    for trial, (rec, accuracy) in enumerate(zip(records[::-1], [None, 0.5, 0.75, 0.25])):  # the failed run first
        rec["search"] = {"method": "tpe", "study": "tpe", "trial": trial}
        if accuracy is not None:
            rec["final_eval"]["rewards/accuracies"] = accuracy
    records[0]["status"] = "pruned"  # trial 3: stopped by the pruner, neither finished nor failed
    wb = load_workbook(build_workbook(records, tmp_path / "tpe.xlsx", **sweep["kwargs"]))
    assert wb.sheetnames == SHEETS[:-1] + ["Trials", "ChartData"]
    assert wb["Summary"].cell(3, 2).value == "4 (2 finished, 1 pruned, 1 failed)"
    runs = wb["Runs"]
    assert [runs.cell(r, 3).value for r in range(3, 7)] == ["tpe #3", "tpe #2", "tpe #1", "tpe #0"]
    ws = wb["Trials"]
    assert [[c.value for c in row] for row in ws.iter_rows()] == [
        ["trial", "run_id", "status", "reward accuracy", "best so far"],
        [0, "run3-failed", "failed", None, None], [1, records[2]["run_id"], "finished", 0.5, 0.5],
        [2, records[1]["run_id"], "finished", 0.75, 0.75], [3, records[0]["run_id"], "pruned", 0.25, 0.75]]
    assert ws.cell(3, 4).number_format == "0.000" and ws.cell(1, 1).fill.fgColor.rgb.endswith("DDEBF7")
    (chart,) = ws._charts
    assert isinstance(chart, ScatterChart) and [s.yVal.numRef.f for s in chart.series] == [
        "'Trials'!$D$2:$D$5", "'Trials'!$E$2:$E$5"] and chart.series[0].xVal.numRef.f == "'Trials'!$A$2:$A$5"


def test_judged_runs_and_values_excel_cannot_hold(sweep, tmp_path):
    records = copy.deepcopy(sweep["records"])
    records[0]["judged"] = {"n": 8, "win_rate": 0.625, "win_rate_ci": [0.3, 0.9], "wins": 5, "ties": 0, "losses": 3,
                            "length_matched": {"win_rate": 0.5}, "mean_length_policy": 41.2,
                            "mean_length_base": 38.9, "judge_accuracy": 0.7}
    records[1]["final_train_loss"] = math.nan
    records[2]["final_train_loss"] = math.inf
    records[3]["error"] = "E" * 40_000 + "\x00"
    wb = load_workbook(build_workbook(records, tmp_path / "judged.xlsx", **sweep["kwargs"]))
    ws = wb["Runs"]
    col = columns(ws)
    assert list(col) == [c[0] for c in RUN_COLUMNS + EVAL_COLUMNS + JUDGED_COLUMNS + COST_COLUMNS]
    cell = lambda row, name: ws.cell(row, col[name]).value
    assert (cell(3, "judged prompts"), cell(3, "win rate vs base"), cell(3, "win rate 95% CI")) == (8, 0.625,
                                                                                                    "0.30-0.90")
    assert cell(3, "wins / ties / losses") == "5/0/3" and cell(3, "answer length policy / base") == "41 / 39"
    assert cell(4, "judged prompts") is None and cell(4, "wins / ties / losses") is None  # not judged: blank
    assert cell(4, "final train loss") is None and cell(5, "final train loss") == "inf"  # NaN would corrupt the file
    assert cell(6, "error") == "E" * 32_000  # Excel's cell limit
    assert wb["Summary"].cell(1, 1).value == "DPO sweep summary"


def test_a_behaviour_report_gets_its_own_sheet(sweep, tmp_path):
    measures = lambda p: {"refusal_rate": {"difference": 0.1, "test": "McNemar (exact)", "p": p, "p_holm": 2 * p},
                          "tokens": {"difference": -3.0, "test": "Wilcoxon signed-rank", "p": 0.5, "p_holm": 1.0}}
    model = {"prompts": 8, "refusal_rate": 0.25, "refusal_rate_ci": [0.07, 0.59], "lexical_score": 0.1, "tokens": 30.0,
             "kl": 1.5, "kl_ci": [1.0, 2.0]}
    report = {"prompts": 8, "decoding": "sampled", "tests": {"policy vs base": measures(0.01),
                                                             "policy vs control": measures(0.2)},
              "models": {"base": model, "policy": model}, "lexical_judge": {"accuracy": 0.6, "shorter_accuracy": 0.55}}
    wb = load_workbook(build_workbook(sweep["records"], tmp_path / "b.xlsx", **sweep["kwargs"], behaviour=report))
    rows = list(wb["Behaviour"].iter_rows(values_only=True))
    assert rows[2][:6] == ("comparison", "measure", "difference", "test", "p", "Holm p")
    assert rows[3][:6] == ("policy vs base", "refusal_rate", 0.1, "McNemar (exact)", 0.01, 0.02)
    assert any(row[0] == "policy" and row[3] == "[0.07, 0.59]" for row in rows)
    assert "Behaviour" not in load_workbook(sweep["path"]).sheetnames  # none without a report


def test_runs_frame_is_the_runs_sheet(sweep):
    frame = runs_frame(sweep["records"], sweep["kwargs"]["baseline"])
    assert list(frame.index) == [BASELINE_LABEL] + [r["run_id"] for r in sweep["records"]]
    assert list(frame.columns) == [c[0] for c in RUN_COLUMNS + EVAL_COLUMNS + JUDGED_COLUMNS + COST_COLUMNS][1:]
    assert frame.loc[sweep["ranking"][0]["run_id"], "eval loss"] == pytest.approx(
        sweep["ranking"][0]["final_eval"]["loss"])
    assert list(runs_frame(sweep["records"]).index)[0] == sweep["records"][0]["run_id"]  # no baseline, no row


def test_plots_are_real_pngs(sweep, tmp_path):
    records, best = sweep["records"], sweep["ranking"][0]["run_id"]
    paths = save_plots(records, tmp_path / "plots", best)
    assert sorted(p.name for p in paths) == sorted([f"{r['run_id']}.png" for r in records[:3]] + ["sweep.png"])
    for path in paths:
        image = mpimg.imread(path)
        assert path.stat().st_size > 20_000 and image.std() > 0.05  # drawn on, not a blank canvas
        assert image.shape[:2] == ((420, 1400) if path.name == "sweep.png" else (350, 1300))
    assert len(plot_history(records[0]["log_history"]).axes) == 3  # the notebook's inline figure still works


@pytest.mark.slow  # starts a process
def test_render_script_reports_missing_tools(sweep, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_workbook.py"), str(sweep["path"]),
                           str(tmp_path)], capture_output=True, text=True, env={**os.environ, "PATH": str(tmp_path)})
    assert proc.returncode == 1 and "soffice" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("soffice") is None or shutil.which("pdftoppm") is None,
                    reason="needs LibreOffice and poppler: apt-get install -y libreoffice-calc poppler-utils")
@pytest.mark.slow  # starts a process
def test_render_to_pdf_and_png(sweep, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_workbook.py"), str(sweep["path"]),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = [Path(line) for line in proc.stdout.splitlines()]
    assert printed[0].suffix == ".pdf" and printed[0].read_bytes().startswith(b"%PDF")
    pages = printed[1:]
    assert len(pages) >= 5 and all(p.suffix == ".png" and p.exists() for p in pages)  # every sheet printed
    assert mpimg.imread(pages[0]).shape[1] > 600  # an A4 landscape page at 80 dpi is ~935 px wide


def shape(value):
    """The keys and kinds of value in a record, not its numbers."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@pytest.mark.slow
def test_checked_in_records_are_what_runs_write_today(tmp_path):
    """Trains the three tiny runs again (20-50 s on a busy CPU): the checked-in records must have the shape a run writes now,
    or the fast tests above check a workbook no sweep makes. On failure: python tests/data/make_workbook_records.py"""
    spec = importlib.util.spec_from_file_location("make_workbook_records", RECORDS.with_name("make_workbook_records.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    fresh = maker.make(tmp_path)
    records, kwargs = load_records()
    for old, new in zip(records, fresh["records"], strict=True):
        assert shape({**old, "log_history": None}) == shape({**new, "log_history": None}), old["run_id"]
        assert set().union(*old["log_history"] or [{}]) == set().union(*new["log_history"] or [{}])
    assert shape(kwargs["summary"]) == shape(fresh["summary"]) and shape(kwargs["baseline"]) == shape(fresh["baseline"])
    assert [sorted(s) for s in kwargs["samples"]] == [sorted(s) for s in fresh["samples"]]
    made = load_workbook(build_workbook(fresh.pop("records"), tmp_path / "fresh.xlsx", **fresh))
    assert made.sheetnames == SHEETS and list(columns(made["Runs"])) == [c[0] for c in RUN_COLUMNS + EVAL_COLUMNS
                                                                          + COST_COLUMNS]
