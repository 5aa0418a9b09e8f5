"""Excel workbook of a sweep: one row a run, per-step history, the best run and why, samples, native charts.

`build_workbook(records, path, ...)` is a function of its inputs alone (apart from the generated-at time): the
run records on disk are the truth, and the workbook is rebuilt from them whenever they change.

Sheets: Runs (one row a run, the base model first, the best highlighted), Summary, Charts (native line charts),
History (every logged train/eval step), Samples (generations), Completions (answers while training), Trials (a TPE
search: the rule's number per trial, with a chart), ChartData (the numbers the charts draw).
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.chart import Reference, ScatterChart, Series
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter

from .report import history_frame
from .runs import evaluating_seconds, pick_best, rule_value, search_label, tpe_trials  # pick_best: the runner-up

BASELINE_LABEL = "base model (no adapter)"
BEST_FILL = PatternFill("solid", fgColor="C6EFCE")  # Excel's own "good" green
HEADER_FILL = PatternFill("solid", fgColor="DDEBF7")
# Fonts name Calibri (the default cell font) so LibreOffice does not fall back to a serif for styled cells.
BOLD, ITALIC = Font(name="Calibri", bold=True), Font(name="Calibri", italic=True)
CENTER, INDENT = Alignment(horizontal="center"), Alignment(horizontal="left", indent=1)
FAILED_FONT = Font(name="Calibri", color="C00000")
BASELINE_FONT = Font(name="Calibri", italic=True, color="808080")
METRIC, LR, SECONDS, INT, SMALL = "0.000", "0.0E+00", "0.0", "0", "0.0##"
PALETTE = ["1F77B4", "FF7F0E", "2CA02C", "D62728", "9467BD", "8C564B", "E377C2", "7F7F7F", "BCBD22", "17BECF"]


def _get(part, key):
    return lambda r: (r.get(part) or {}).get(key)


# Runs columns: (header, how to read it from a record, number format, width), in reading order.
RUN_COLUMNS = [
    ("run_id", lambda r: r.get("run_id"), None, 24), ("status", lambda r: r.get("status"), None, 9),
    ("search", lambda r: search_label(r) if r.get("config") else None, None, 9),
    ("base model", _get("config", "model_name_or_path"), None, 18),
    *[(k, _get("config", k), fmt, width) for k, fmt, width in [
        ("learning_rate", LR, 8), ("per_device_train_batch_size", INT, 6), ("gradient_accumulation_steps", INT, 6),
        ("beta", SMALL, 6), ("optim", None, 9), ("loss_type", None, 8), ("lora_r", INT, 5), ("lora_alpha", INT, 6),
        ("lora_dropout", SMALL, 8), ("num_train_epochs", SMALL, 7), ("max_steps", INT, 6), ("max_length", INT, 7),
        ("seed", INT, 5)]],
    ("final train loss", lambda r: r.get("final_train_loss"), METRIC, 9),
    *[(f"eval {name}", _get("final_eval", key), METRIC, 9) for name, key in [
        ("loss", "loss"), ("reward accuracy", "rewards/accuracies"), ("reward margin", "rewards/margins"),
        ("chosen reward", "rewards/chosen"), ("rejected reward", "rewards/rejected")]],
]
# Held-out evaluation (dpo_pipeline.evaluate); the only numbers the base model has, so its row is filled here.
EVAL_COLUMNS = [
    (name, _get("evaluation", key), fmt, 10) for name, key, fmt in [
        ("held-out pairs", "pairs", INT), ("held-out reward accuracy", "reward_accuracy", METRIC),
        ("reward ties", "reward_ties", METRIC), ("held-out reward margin", "reward_margin", METRIC),
        ("logp accuracy", "logp_accuracy", METRIC), ("chosen logp shift", "chosen_logp_shift", METRIC),
        ("rejected logp shift", "rejected_logp_shift", METRIC)]
]


def _judged(record: dict) -> bool:
    return bool((record.get("judged") or {}).get("n"))


def _interval(part: str, key: str):
    """A 95% interval [lo, hi] as text, e.g. "0.58-0.69"."""
    def get(record):
        ci = (record.get(part) or {}).get(key)
        return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else None
    return get


EVAL_COLUMNS[2:2] = [("reward accuracy 95% CI", _interval("evaluation", "reward_accuracy_ci"), None, 10)]
EVAL_COLUMNS += [("logp accuracy 95% CI", _interval("evaluation", "logp_accuracy_ci"), None, 10),
                 ("pick-the-shorter baseline", _get("evaluation", "shorter_accuracy"), METRIC, 10)]
# Judged generations against the base model (judge.py): a tie counts half.
JUDGED_COLUMNS = [
    ("judged prompts", _get("judged", "n"), INT, 8), ("win rate vs base", _get("judged", "win_rate"), METRIC, 9),
    ("win rate 95% CI", _interval("judged", "win_rate_ci"), None, 10),
    ("wins / ties / losses", lambda r: "/".join(str((r.get("judged") or {}).get(k, "")) for k in
                                                ("wins", "ties", "losses")) if _judged(r) else None, None, 10),
    ("length-matched win rate", lambda r: ((r.get("judged") or {}).get("length_matched") or {}).get("win_rate"),
     METRIC, 10),
    ("answer length policy / base", lambda r: "{:.0f} / {:.0f}".format(r["judged"]["mean_length_policy"],
                                                                        r["judged"]["mean_length_base"])
     if _judged(r) else None, None, 10),
    ("judge accuracy on held-out pairs", _get("judged", "judge_accuracy"), METRIC, 10),
    ("judge error", _get("judged", "error"), None, 30),
]
COST_COLUMNS = [(name, lambda r, key=key: r.get(key), fmt, width) for name, key, fmt, width in [
    ("train steps", "train_steps", INT, 8), ("wall time (s)", "wall_time_s", SECONDS, 9),
    ("pairs/s", "pairs_per_second", SECONDS, 8), ("error", "error", None, 48)]]
COST_COLUMNS[2:2] = [  # where a run's time went (record timings_s): a sweep's cost is not only its training
    ("run time (s)", _get("timings_s", "total"), SECONDS, 9),
    ("evaluating (s)", lambda r: evaluating_seconds(r["timings_s"]) if r.get("timings_s") else None, SECONDS, 9)]
HISTORY_COLUMNS = [  # (header, history_frame column)
    ("loss", "loss"), ("reward accuracy", "rewards/accuracies"), ("reward margin", "rewards/margins"),
    ("chosen reward", "rewards/chosen"), ("rejected reward", "rewards/rejected"), ("chosen logp", "logps/chosen"),
    ("rejected logp", "logps/rejected"), ("learning rate", "learning_rate"), ("grad norm", "grad_norm"),
    ("epoch", "epoch"),
]
CHARTS = [("train loss", "train", "loss"), ("eval loss", "eval", "loss"),  # (title, split, history metric)
          ("train reward margin", "train", "rewards/margins"), ("eval reward margin", "eval", "rewards/margins")]


def _value(value):
    """A value Excel can hold: no NaN (a corrupt file), no control characters, no lists; None stays empty."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=str)
    if isinstance(value, str):
        value = ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", value)[:32000]  # Excel's cell limit
    return value


def _put(ws, row: int, col: int, value, fmt: str | None = None):
    cell = ws.cell(row, col, _value(value))
    if isinstance(cell.value, str) and cell.value.startswith("="):
        cell.data_type = "s"  # generated text, never a formula
    if fmt:
        cell.number_format = fmt
    return cell


def _lines(text: str, width: float) -> int:
    """Lines a wrapped cell of `width` characters needs: rows are sized by hand, Excel and LibreOffice do not."""
    return sum(1 + len(part) // max(int(width * 1.1), 1) for part in str(text).split("\n"))


def _header(ws, row: int, names: list[str], widths: list[float] | None = None, col0: int = 1,
            lines: int = 2) -> None:
    ws.row_dimensions[row].height = 15 * lines  # LibreOffice does not grow a row for wrapped text on its own
    for col, name in enumerate(names, start=col0):
        cell = _put(ws, row, col, name)
        cell.font, cell.fill = BOLD, HEADER_FILL
        cell.alignment = Alignment(wrap_text=True, vertical="top")
        if widths:
            ws.column_dimensions[get_column_letter(col)].width = widths[col - col0]


def _print_setup(ws, landscape: bool = True, pages_wide: int = 1, one_page: bool = False) -> None:
    """Pages that read well when printed or rendered: fit the width (and the height, for charts)."""
    ws.page_setup.orientation = "landscape" if landscape else "portrait"
    ws.page_setup.paperSize = ws.PAPERSIZE_A4
    ws.page_margins.left = ws.page_margins.right = 0.4
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.page_setup.fitToWidth, ws.page_setup.fitToHeight = pages_wide, (1 if one_page else 0)


def _write_runs(ws, records, baseline, best_run_id, best_rule) -> list[tuple]:
    has_eval = baseline is not None or any(r.get("evaluation") for r in records)
    has_judged = any(r.get("judged") for r in records)
    columns = RUN_COLUMNS + (EVAL_COLUMNS if has_eval else []) + (JUDGED_COLUMNS if has_judged else []) + COST_COLUMNS
    _header(ws, 1, [c[0] for c in columns], [c[3] for c in columns], lines=3)
    base = {"run_id": BASELINE_LABEL, "status": "reference", "evaluation": baseline}
    rows = ([base] if baseline is not None else []) + records
    for i, rec in enumerate(rows, start=2):
        is_base = rec is base
        is_best = not is_base and best_run_id is not None and rec.get("run_id") == best_run_id
        font = (BASELINE_FONT if is_base else BOLD if is_best
                else FAILED_FONT if rec.get("status") == "failed" else None)
        for j, (header, get, fmt, _) in enumerate(columns, start=1):
            cell = _put(ws, i, j, get(rec), fmt)
            if j > 1 and fmt is None:  # text between numbers: keep it off its neighbours
                cell.alignment = INDENT if header == "error" else CENTER
            if font:
                cell.font = font
            if is_best:
                cell.fill = BEST_FILL
    last = len(rows) + 1
    ws.freeze_panes = "B2"  # the header and the run ids stay in view on a wide table
    ws.auto_filter.ref = f"A1:{get_column_letter(len(columns))}{last}"
    notes = [f"Best run (green, bold): {best_run_id or 'none'}. Rule: {best_rule}",
             "Grey italic: the base model without adapter (held-out evaluation only). Red: a failed run, see error."]
    for k, note in enumerate(notes):
        _put(ws, last + 2 + k, 1, note).font = ITALIC
    _print_setup(ws, pages_wide=2)  # one page would shrink the text past reading
    ws.print_title_cols, ws.print_title_rows = "A:A", "1:1"  # every printed page names its runs and columns
    return columns


def _write_history(ws, records) -> None:
    _header(ws, 1, ["run_id", "step", "split"] + [h for h, _ in HISTORY_COLUMNS],
            [24, 7, 7] + [11] * len(HISTORY_COLUMNS))
    row = 2
    for rec in records:
        for entry in history_frame(rec.get("log_history") or []).to_dict("records"):
            _put(ws, row, 1, rec.get("run_id"))
            _put(ws, row, 2, entry["step"], INT).alignment = CENTER
            _put(ws, row, 3, entry["split"]).alignment = CENTER
            for col, (_, key) in enumerate(HISTORY_COLUMNS, start=4):
                _put(ws, row, col, entry.get(key), LR if key == "learning_rate" else METRIC)
            row += 1
    ws.freeze_panes = "A2"
    ws.auto_filter.ref = f"A1:{get_column_letter(3 + len(HISTORY_COLUMNS))}{max(row - 1, 1)}"
    _print_setup(ws)


def _series_of(record, split: str, metric: str) -> dict[int, float]:
    frame = history_frame(record.get("log_history") or [])
    if frame.empty or metric not in frame:
        return {}
    part = frame[(frame["split"] == split) & frame[metric].notna()]
    return {int(s): float(v) for s, v in zip(part["step"], part[metric])}


def _write_charts(charts_ws, data_ws, records, best_run_id) -> None:
    """One scatter-with-lines chart per metric, a line per finished run; steps as rows x runs as columns."""
    runs = [r for r in records if r.get("status") == "finished"]
    _put(charts_ws, 1, 1, f"One line per finished run (the best, {best_run_id}, drawn thicker). "
                          "The numbers are on the ChartData sheet.").font = ITALIC
    col0 = 1
    for n, (title, split, metric) in enumerate(CHARTS):
        values = [_series_of(r, split, metric) for r in runs]
        steps = sorted(set().union(*values)) if values else []
        _put(data_ws, 1, col0, title).font = BOLD
        names = [str(r.get("run_id")) for r in runs]
        _header(data_ws, 2, ["step"] + names, [6] + [min(max(9, len(n) + 1), 30) for n in names], col0=col0)
        for i, step in enumerate(steps, start=3):
            _put(data_ws, i, col0, step)
            for j, series in enumerate(values, start=1):
                _put(data_ws, i, col0 + j, series.get(step), METRIC)
        chart = ScatterChart(scatterStyle="lineMarker")
        chart.title, chart.style, chart.width, chart.height = title, 2, 16, 8.5
        chart.x_axis.title, chart.y_axis.title = "step", title.split(" ", 1)[1]
        chart.x_axis.delete = chart.y_axis.delete = False  # newer Excel hides axes openpyxl leaves unset
        chart.display_blanks = "span"  # runs logged on different step grids still draw as lines
        chart.x_axis.scaling.min = 0
        last = max(len(steps) + 2, 3)
        xs = Reference(data_ws, min_col=col0, min_row=3, max_row=last)
        for j, run in enumerate(runs, start=1):
            series = Series(Reference(data_ws, min_col=col0 + j, min_row=2, max_row=last), xs, title_from_data=True)
            colour = PALETTE[(j - 1) % len(PALETTE)]
            series.graphicalProperties.line.solidFill = colour
            series.graphicalProperties.line.width = 38100 if run.get("run_id") == best_run_id else 19050  # EMU
            series.marker.symbol, series.marker.size, series.smooth = "circle", 5, False
            series.marker.graphicalProperties.solidFill = colour
            series.marker.graphicalProperties.line.solidFill = colour
            chart.series.append(series)
        charts_ws.add_chart(chart, f"{'A' if n % 2 == 0 else 'J'}{3 + (n // 2) * 18}")  # a 2 x 2 grid
        col0 += len(runs) + 2  # a blank column between blocks
    _print_setup(charts_ws, one_page=True)
    _print_setup(data_ws)


VALUE_WIDTH = 44  # Summary's value column


def _section(ws, row: int, title: str) -> int:
    _put(ws, row, 1, title).font = Font(name="Calibri", bold=True, size=12)
    return row + 1


def _key_values(ws, row: int, items: dict) -> int:
    """Plain values as label | value rows; a nested dict (dropped reasons, splits) as its own small table."""
    for key, value in items.items():
        if isinstance(value, dict) and value:
            _put(ws, row, 1, key).font = BOLD
            for sub_key, sub_value in value.items():
                row += 1
                _put(ws, row, 1, f"  {sub_key}")
                _put(ws, row, 2, sub_value).alignment = Alignment(horizontal="left")
        else:
            _put(ws, row, 1, key).alignment = Alignment(vertical="top")
            _put(ws, row, 2, value).alignment = Alignment(horizontal="left", vertical="top", wrap_text=True)
            ws.row_dimensions[row].height = 15 * _lines("" if value is None else value, VALUE_WIDTH)
        row += 1
    return row + 1


def _rule_numbers(record: dict) -> str:
    """The numbers the sweep's rule looks at, as text."""
    ev = record.get("final_eval") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    judged = record.get("judged") or {}
    return (f"eval reward accuracy {fmt(ev.get('rewards/accuracies'))}, eval loss {fmt(ev.get('loss'))}"
            + (f", judged win rate {fmt(judged.get('win_rate'))}" if judged else ""))


def _write_summary(ws, records, columns, best_run_id, best_rule, summary, baseline, generated_at,
                   best_by="reward_accuracy") -> None:
    ws.column_dimensions["A"].width, ws.column_dimensions["B"].width = 30, VALUE_WIDTH
    ws.column_dimensions["C"].width = ws.column_dimensions["D"].width = 24
    _put(ws, 1, 1, "DPO sweep summary").font = Font(name="Calibri", bold=True, size=14)
    _put(ws, 2, 1, "generated at")
    _put(ws, 2, 2, generated_at).alignment = Alignment(horizontal="left")
    failed = [r for r in records if r.get("status") == "failed"]
    _put(ws, 3, 1, "runs")
    _put(ws, 3, 2, f"{len(records)} ({len(records) - len(failed)} finished, {len(failed)} failed)")
    row = _section(ws, 5, "Best configuration and why")
    best = next((r for r in records if best_run_id is not None and r.get("run_id") == best_run_id), None)
    runner_up = pick_best([r for r in records if r is not best], best_by)
    why = "\n".join(f"{label} {r.get('run_id')}: {_rule_numbers(r)}" for label, r in
                    (("best", best), ("runner-up", runner_up)) if r is not None)
    row = _key_values(ws, row, {"best run": best_run_id or "none (no finished run)", "rule": best_rule,
                                "runner-up": runner_up.get("run_id") if runner_up else "none", "why": why})
    labels = ["best: " + str(best_run_id), "runner-up: " + (str(runner_up.get("run_id")) if runner_up else "none")]
    _header(ws, row, ["quantity"] + labels + ([BASELINE_LABEL] if baseline is not None else []), lines=1)
    base = {"evaluation": baseline}
    for header, get, fmt, _ in columns[1:]:  # the Runs columns, transposed: the numbers behind the choice
        row += 1
        _put(ws, row, 1, header)
        for col, rec in enumerate([best, runner_up] + ([base] if baseline is not None else []), start=2):
            if rec is not None:
                cell = _put(ws, row, col, get(rec), fmt)
                cell.alignment = Alignment(horizontal="right", wrap_text=header == "error")
                if col == 2:
                    cell.fill = BEST_FILL
    row += 2
    for title, key in (("Data (cleaning report)", "data"), ("Model", "model"), ("Sweep", "sweep")):
        if summary.get(key):
            row = _key_values(ws, _section(ws, row, title), summary[key])
    _print_setup(ws, landscape=False, one_page=True)


def _write_samples(ws, samples: list[dict]) -> None:
    keys = list(dict.fromkeys(k for s in samples for k in s))  # every key, in order of first appearance
    widths = [40 if k == "prompt" else 45 for k in keys]
    _header(ws, 1, keys, widths)
    for i, sample in enumerate(samples, start=2):
        lines = 1
        for j, key in enumerate(keys, start=1):
            value = sample.get(key)
            text = "" if value is None else str(value)
            cell = _put(ws, i, j, value if isinstance(value, (int, float)) else text)  # numbers stay numbers
            cell.alignment = Alignment(wrap_text=True, vertical="top")
            lines = max(lines, _lines(text, widths[j - 1]))
        ws.row_dimensions[i].height = min(15 * lines, 400)
    ws.freeze_panes = "B2"
    _print_setup(ws)


def _write_trials(ws, records, best_by: str) -> None:
    """A TPE search's runs in trial order: the number the best-run rule ranks by, the best so far, and a chart."""
    trials = tpe_trials(records)
    _header(ws, 1, ["trial", "run_id", "status", best_by.replace("_", " "), "best so far"], [7, 24, 9, 12, 12])
    best = None
    for i, rec in enumerate(trials, start=2):
        value = rule_value(rec, best_by)
        if rec["status"] == "finished" and math.isfinite(value):
            best = value if best is None else max(best, value)
        for j, (cell, fmt) in enumerate([(rec["search"]["trial"], INT), (rec.get("run_id"), None),
                                         (rec["status"], None), (value, METRIC), (best, METRIC)], start=1):
            _put(ws, i, j, cell, fmt)
    chart = ScatterChart(scatterStyle="lineMarker")
    chart.title, chart.style, chart.width, chart.height = "the rule's number per trial", 2, 16, 8.5
    chart.x_axis.title, chart.y_axis.title = "trial", best_by.replace("_", " ")
    chart.x_axis.delete = chart.y_axis.delete = False
    xs = Reference(ws, min_col=1, min_row=2, max_row=len(trials) + 1)
    for col, line in ((4, False), (5, True)):
        series = Series(Reference(ws, min_col=col, min_row=1, max_row=len(trials) + 1), xs, title_from_data=True)
        series.marker.symbol = "none" if line else "circle"
        series.graphicalProperties.line.noFill = not line
        chart.series.append(series)
    ws.add_chart(chart, "G2")
    _print_setup(ws, one_page=True)


def runs_frame(records: list[dict], baseline: dict | None = None):
    """The Runs sheet as a pandas DataFrame (the notebook shows it inline), base model first."""
    import pandas as pd

    base = [{"run_id": BASELINE_LABEL, "status": "reference", "evaluation": baseline}] if baseline else []
    columns = RUN_COLUMNS + EVAL_COLUMNS + JUDGED_COLUMNS + COST_COLUMNS
    return pd.DataFrame([{c[0]: c[1](r) for c in columns} for r in base + records]).set_index("run_id")


def build_workbook(records: list[dict], path, *, best_run_id: str | None, best_rule: str, summary: dict,
                   samples: list[dict], baseline: dict | None = None, best_by: str = "reward_accuracy") -> Path:
    """Write the sweep workbook to `path` atomically (temp file in the same folder, then rename); return the path.

    records: RunRecord.to_dict() per run; baseline: the held-out evaluation of the base model without adapter;
    summary: {"data": cleaning report dict, "model": model_info, "sweep": sweep settings}; each optional.
    """
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    wb = Workbook()
    runs = wb.active
    runs.title = "Runs"
    columns = _write_runs(runs, records, baseline, best_run_id, best_rule)
    _write_summary(wb.create_sheet("Summary"), records, columns, best_run_id, best_rule, summary, baseline,
                   generated_at, best_by)
    charts = wb.create_sheet("Charts")
    _write_history(wb.create_sheet("History"), records)
    _write_samples(wb.create_sheet("Samples"), samples)
    completions = [{"run_id": r.get("run_id"), **row} for r in records for row in r.get("completions") or []]
    if completions:
        _write_samples(wb.create_sheet("Completions"), completions)
    if tpe_trials(records):
        _write_trials(wb.create_sheet("Trials"), records, best_by)
    _write_charts(charts, wb.create_sheet("ChartData"), records, best_run_id)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xlsx")
    try:
        wb.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
