"""Sweep workbook and plots, built from real tiny training runs and read back the way a spreadsheet user sees them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib import image as mpimg
from openpyxl import load_workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.chart import ScatterChart
from peft import PeftModel

from dpo_pipeline.evaluate import preference_eval
from dpo_pipeline.generation import generate_samples
from dpo_pipeline.model import load_base_model, load_tokenizer
from dpo_pipeline.report import plot_history, save_plots
from dpo_pipeline.synthetic import get_synthetic
from dpo_pipeline.args import parse
from dpo_pipeline.pipeline import run
from dpo_pipeline.runs import RunRecord
from dpo_pipeline.workbook import BASELINE_LABEL, build_workbook

pytestmark = pytest.mark.slow  # the module trains three tiny runs once (about 40 s on a busy 2-core CPU)

ROOT = Path(__file__).resolve().parents[1]
RULE = "highest eval reward accuracy, then lowest eval loss"
GREEN, RED = "C6EFCE", "C00000"
EDGE_TEXT = "=1+1 looks like a formula\x07 and has a control character"


@pytest.fixture(scope="module")
def sweep(tiny_gpt2, tmp_path_factory):
    """Three real tiny runs (learning rate and beta varied), one failed run as the sweep records it, and the
    workbook built from them. The first run also gets a real held-out evaluation, the base model's too."""
    tmp = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices gain nothing from a second thread and lose a lot on a busy CPU
    try:
        return _make_sweep(tiny_gpt2, tmp)
    finally:
        torch.set_num_threads(threads)


def _make_sweep(tiny_gpt2: str, tmp: Path) -> dict:
    data = get_synthetic(n_pairs=48, seed=0)  # small: the CPU is shared, and the numbers only need to be real
    records = []
    for i, (lr, beta) in enumerate([(1e-3, 0.1), (2e-4, 0.1), (1e-3, 0.5)]):
        config = parse(dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, max_steps=4, eval_steps=2,
                            logging_steps=1, max_length=48, per_device_train_batch_size=4, learning_rate=lr,
                            beta=beta, output_dir=str(tmp / f"r{i}")))
        record = run(config, data)
        record.run_id = f"run{i}-lr{lr:g}-beta{beta:g}"
        records.append(record)
    tokenizer = load_tokenizer(tiny_gpt2)
    model = PeftModel.from_pretrained(load_base_model(tiny_gpt2), records[0].adapter_path)
    scores = preference_eval(model, tokenizer, data.test, beta=0.1, max_length=48)
    records[0].evaluation = scores["adapter"]
    samples = generate_samples(model, tokenizer, list(data.test["prompt"][:2]), max_new_tokens=8)
    samples.append({"prompt": "edge case", "adapter (greedy)": EDGE_TEXT})
    failed = RunRecord(
        config=parse(dict(model_name_or_path=tiny_gpt2, lora_r=2, output_dir=str(tmp / "bad"))).to_dict(),
        status="failed", train_pairs=0, eval_pairs=0, train_steps=0, final_train_loss=None, final_eval={},
        best_eval={}, log_history=[], wall_time_s=0.0, pairs_per_second=0.0, adapter_path="",
        error="ValueError: learning_rate must be positive", run_id="run3-failed")
    records = [r.to_dict() for r in records] + [failed.to_dict()]

    finished = records[:3]
    ranking = sorted(finished, key=lambda r: (-r["final_eval"]["rewards/accuracies"], r["final_eval"]["loss"]))
    summary = {"data": data.report.as_dict(), "model": finished[0]["model_info"],
               "sweep": {"grid": {"learning_rate": [1e-3, 2e-4], "beta": [0.1, 0.5]}, "max_steps": 4}}
    kwargs = dict(best_run_id=ranking[0]["run_id"], best_rule=RULE, summary=summary, samples=samples,
                  baseline=scores["base"])
    path = build_workbook(records, tmp / "out" / "sweep.xlsx", **kwargs)
    return {"records": records, "ranking": ranking, "kwargs": kwargs, "path": path, "wb": load_workbook(path)}


def columns(ws) -> dict[str, int]:
    return {cell.value: cell.column for cell in ws[1] if cell.value is not None}


def test_sheets_and_runs_rows_match_the_records(sweep):
    wb, records = sweep["wb"], sweep["records"]
    assert wb.sheetnames == ["Runs", "Summary", "Charts", "History", "Samples", "Completions", "ChartData"]
    answers = [row for row in wb["Completions"].iter_rows(min_row=2, values_only=True)]  # answers while training
    assert answers == [(r["run_id"], c["step"], c["prompt"], c["completion"]) for r in records
                       for c in r["completions"]] and answers
    ws, col = wb["Runs"], columns(wb["Runs"])
    for header in ("run_id", "status", "search", "learning_rate", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "beta", "optim", "loss_type", "lora_r", "lora_alpha",
                   "num_train_epochs", "max_steps", "max_length", "seed", "final train loss",
                   "eval loss", "eval reward accuracy", "eval reward margin", "eval chosen reward",
                   "eval rejected reward", "held-out reward accuracy", "reward ties", "logp accuracy",
                   "chosen logp shift", "rejected logp shift", "train steps", "wall time (s)", "run time (s)", "evaluating (s)", "pairs/s", "error"):
        assert header in col, header
    ids = [ws.cell(r, 1).value for r in range(2, ws.max_row + 1)]
    assert ids[:len(records) + 1] == [BASELINE_LABEL] + [r["run_id"] for r in records]
    assert ws.cell(len(records) + 4, 1).value.startswith("Best run")  # header, base, runs, a blank row, the note
    baseline = sweep["kwargs"]["baseline"]
    assert ws.cell(2, col["held-out reward accuracy"]).value == pytest.approx(baseline["reward_accuracy"])
    assert ws.cell(2, col["reward ties"]).value == pytest.approx(baseline["reward_ties"])
    assert ws.cell(2, col["eval loss"]).value is None
    assert ws.cell(2, 1).font.i and ws.cell(2, 1).font.color.rgb.endswith("808080")
    for row, rec in enumerate(records, start=3):
        cell = lambda name: ws.cell(row, col[name]).value
        assert cell("status") == rec["status"] and cell("seed") == rec["config"]["seed"]
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


def test_runs_layout_frozen_filtered_formatted(sweep):
    ws, n = sweep["wb"]["Runs"], len(sweep["records"])
    col = columns(ws)
    assert ws.freeze_panes == "B2"
    last = max(col.values())
    assert ws.auto_filter.ref == f"A1:{ws.cell(1, last).column_letter}{n + 2}"  # header, base model, runs
    assert ws.cell(3, col["learning rate"]).number_format == "0.0E+00"
    assert ws.cell(3, col["eval loss"]).number_format == "0.000"
    assert ws.cell(3, col["wall time (s)"]).number_format == "0.0"
    width = lambda name: ws.column_dimensions[ws.cell(1, col[name]).column_letter].width
    assert width("run_id") >= max(len(BASELINE_LABEL), *(len(r["run_id"]) for r in sweep["records"]))
    assert width("error") >= len("ValueError: learning_rate must be positive")


def test_charts_have_one_series_per_finished_run(sweep):
    wb, finished = sweep["wb"], sweep["records"][:3]
    charts = wb["Charts"]._charts
    assert len(charts) == 4 and all(isinstance(c, ScatterChart) for c in charts)
    assert all(len(c.series) == len(finished) for c in charts)
    # The first chart (train loss) draws ChartData numbers that are the runs' logged train losses.
    data = wb["ChartData"]
    assert [data.cell(2, j).value for j in range(2, 5)] == [r["run_id"] for r in finished]
    steps = [data.cell(i, 1).value for i in range(3, data.max_row + 1) if data.cell(i, 1).value is not None]
    first = {e["step"]: e["loss"] for e in finished[0]["log_history"] if "loss" in e}
    assert steps == sorted(first) and [data.cell(3 + k, 2).value for k in range(len(steps))] == [
        pytest.approx(first[s]) for s in steps]
    assert "ChartData" in charts[0].series[0].yVal.numRef.f


def test_history_has_every_logged_step(sweep):
    ws, records = sweep["wb"]["History"], sweep["records"]
    logged = [(r["run_id"], e) for r in records for e in r["log_history"] if "loss" in e or "eval_loss" in e]
    assert ws.max_row - 1 == len(logged) and ws.freeze_panes == "A2"
    assert ws.auto_filter.ref.startswith("A1:") and ws.auto_filter.ref.endswith(str(len(logged) + 1))
    col = columns(ws)
    for row, (run_id, entry) in enumerate(logged, start=2):
        split = "eval" if "eval_loss" in entry else "train"
        assert (ws.cell(row, 1).value, ws.cell(row, col["step"]).value, ws.cell(row, col["split"]).value) == (
            run_id, entry["step"], split)
        assert ws.cell(row, col["loss"]).value == pytest.approx(entry["eval_loss" if split == "eval" else "loss"])


def test_summary_names_best_runner_up_data_and_model(sweep):
    ws, ranking = sweep["wb"]["Summary"], sweep["ranking"]
    rows = {ws.cell(r, 1).value: ws.cell(r, 2).value for r in range(1, ws.max_row + 1)}
    assert rows["best run"] == ranking[0]["run_id"] and rows["runner-up"] == ranking[1]["run_id"]
    assert rows["rule"] == RULE and f"{ranking[0]['final_eval']['loss']:.3f}" in rows["why"]
    report = sweep["kwargs"]["summary"]["data"]
    assert rows["rows_read"] == report["rows_read"] and rows["kept"] == report["kept"]
    assert rows["  duplicate_pair"] == report["dropped"]["duplicate_pair"]
    assert rows["trainable_params"] == ranking[0]["model_info"]["trainable_params"]
    assert rows["generated at"].endswith("UTC")
    assert rows["eval loss"] == pytest.approx(ranking[0]["final_eval"]["loss"])  # the transposed comparison


def test_samples_keep_every_text_safely(sweep):
    ws, samples = sweep["wb"]["Samples"], sweep["kwargs"]["samples"]
    col = columns(ws)
    assert list(col) == ["prompt", "base (greedy)", "adapter (greedy)", "base (sampled)", "adapter (sampled)"]
    for row, sample in enumerate(samples[:2], start=2):  # real generations, control characters made visible
        assert all(ws.cell(row, col[k]).value == ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", v)
                   for k, v in sample.items() if v)
    edge = ws.cell(4, col["adapter (greedy)"])
    assert edge.data_type == "s" and edge.value.startswith("=1+1") and "\x07" not in edge.value  # text, not formula
    assert ws.cell(2, 1).alignment.wrap_text and ws.column_dimensions["B"].width >= 40


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


def test_plots_are_real_pngs(sweep, tmp_path):
    records, best = sweep["records"], sweep["ranking"][0]["run_id"]
    paths = save_plots(records, tmp_path / "plots", best)
    assert sorted(p.name for p in paths) == sorted([f"{r['run_id']}.png" for r in records[:3]] + ["sweep.png"])
    for path in paths:
        image = mpimg.imread(path)
        assert path.stat().st_size > 20_000 and image.std() > 0.05  # drawn on, not a blank canvas
        assert image.shape[:2] == ((420, 1400) if path.name == "sweep.png" else (350, 1300))
    assert len(plot_history(records[0]["log_history"]).axes) == 3  # the notebook's inline figure still works


def test_render_script_reports_missing_tools(sweep, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_workbook.py"), str(sweep["path"]),
                           str(tmp_path)], capture_output=True, text=True, env={**os.environ, "PATH": str(tmp_path)})
    assert proc.returncode == 1 and "soffice" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("soffice") is None or shutil.which("pdftoppm") is None,
                    reason="needs LibreOffice and poppler: apt-get install -y libreoffice-calc poppler-utils")
def test_render_to_pdf_and_png(sweep, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_workbook.py"), str(sweep["path"]),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = [Path(line) for line in proc.stdout.splitlines()]
    assert printed[0].suffix == ".pdf" and printed[0].read_bytes().startswith(b"%PDF")
    pages = printed[1:]
    assert len(pages) >= 5 and all(p.suffix == ".png" and p.exists() for p in pages)  # every sheet printed
    assert mpimg.imread(pages[0]).shape[1] > 600  # an A4 landscape page at 80 dpi is ~935 px wide
