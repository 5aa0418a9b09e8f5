"""Excel workbook of a sweep, rebuilt from the run records (the truth) whenever they change: sheets Runs, Summary,
Charts (native), History, Samples, Completions, Trials (a TPE search), Behaviour and ChartData (the charts' numbers).
pandas writes every table (`DataFrame.to_excel`); openpyxl styles them and draws the charts, which pandas does not.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timezone
from itertools import cycle, zip_longest
from pathlib import Path

import pandas as pd
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.chart import Reference, ScatterChart, Series
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter

from .report import history_frame, trials_frame
from .runs import (behaviour_test_rows, evaluating_seconds, pick_best, search_label,  # pick_best: the runner-up
                   tpe_trials)

BASELINE_LABEL = "base model (no adapter)"
BEST_FILL = PatternFill("solid", fgColor="C6EFCE")  # Excel's own "good" green
HEADER_FILL = PatternFill("solid", fgColor="DDEBF7")
# Fonts name Calibri (the default cell font) so LibreOffice does not fall back to a serif for styled cells.
BOLD, ITALIC = Font(name="Calibri", bold=True), Font(name="Calibri", italic=True)
FAILED_FONT, BASELINE_FONT = Font(name="Calibri", color="C00000"), Font(name="Calibri", italic=True, color="808080")
CENTER = Alignment(horizontal="center")
INDENT, WRAP_TOP = Alignment(horizontal="left", indent=1), Alignment(wrap_text=True, vertical="top")
METRIC, LR, SECONDS, INT, SMALL = "0.000", "0.0E+00", "0.0", "0", "0.0##"
PALETTE = ["1F77B4", "FF7F0E", "2CA02C", "D62728", "9467BD", "8C564B", "E377C2", "7F7F7F", "BCBD22", "17BECF"]
_judged = lambda r: (r.get("judged") or {}).get("n")  # judged prompts: a record judged against the base model has some

# Runs columns: (header, source, number format, width), in reading order. A source is a column of
# pd.json_normalize(records), a 95% interval ("..._ci") read as "0.58-0.69", or a function of a record.
RUN_COLUMNS = [
    ("run_id", "run_id", None, 24), ("status", "status", None, 9),
    ("search", lambda r: search_label(r) if r.get("config") else None, None, 9),
    ("base model", "config.model_name_or_path", None, 18),
    *[(k, f"config.{k}", fmt, width) for k, fmt, width in [
        ("learning_rate", LR, 8), ("per_device_train_batch_size", INT, 6), ("gradient_accumulation_steps", INT, 6),
        ("beta", SMALL, 6), ("optim", None, 9), ("loss_type", None, 8), ("lora_r", INT, 5), ("lora_alpha", INT, 6),
        ("lora_dropout", SMALL, 8), ("num_train_epochs", SMALL, 7), ("max_steps", INT, 6), ("max_length", INT, 7),
        ("seed", INT, 5)]],
    ("final train loss", "final_train_loss", METRIC, 9),
    *[(f"eval {name}", f"final_eval.{key}", METRIC, 9) for name, key in [
        ("loss", "loss"), ("reward accuracy", "rewards/accuracies"), ("reward margin", "rewards/margins"),
        ("chosen reward", "rewards/chosen"), ("rejected reward", "rewards/rejected")]],
]
# Held-out evaluation (dpo_pipeline.evaluate); the only numbers the base model has, so its row is filled here.
EVAL_COLUMNS = [(name, f"evaluation.{key}", fmt, 10) for name, key, fmt in [
    ("held-out pairs", "pairs", INT), ("held-out reward accuracy", "reward_accuracy", METRIC),
    ("reward accuracy 95% CI", "reward_accuracy_ci", None), ("reward ties", "reward_ties", METRIC),
    ("held-out reward margin", "reward_margin", METRIC), ("logp accuracy", "logp_accuracy", METRIC),
    ("chosen logp shift", "chosen_logp_shift", METRIC), ("rejected logp shift", "rejected_logp_shift", METRIC),
    ("logp accuracy 95% CI", "logp_accuracy_ci", None), ("pick-the-shorter baseline", "shorter_accuracy", METRIC)]]
# Judged generations against the base model (judge.py): a tie counts half.
JUDGED_COLUMNS = [
    ("judged prompts", "judged.n", INT, 8), ("win rate vs base", "judged.win_rate", METRIC, 9),
    ("win rate 95% CI", "judged.win_rate_ci", None, 10),
    ("wins / ties / losses", lambda r: "/".join(str(r["judged"].get(k, "")) for k in ("wins", "ties", "losses"))
     if _judged(r) else None, None, 10),
    ("length-matched win rate", "judged.length_matched.win_rate", METRIC, 10),
    ("answer length policy / base", lambda r: "{mean_length_policy:.0f} / {mean_length_base:.0f}".format(
        **r["judged"]) if _judged(r) else None, None, 10),
    ("judge accuracy on held-out pairs", "judged.judge_accuracy", METRIC, 10),
    ("judge error", "judged.error", None, 30)]
COST_COLUMNS = [  # run time and evaluating (record timings_s): a sweep's cost is not only its training
    ("train steps", "train_steps", INT, 8), ("wall time (s)", "wall_time_s", SECONDS, 9),
    ("run time (s)", "timings_s.total", SECONDS, 9),
    ("evaluating (s)", lambda r: evaluating_seconds(r["timings_s"]) if r.get("timings_s") else None, SECONDS, 9),
    ("pairs/s", "pairs_per_second", SECONDS, 8), ("error", "error", None, 48),
    ("doctor", lambda r: "\n".join(r.get("findings") or []) or None, None, 48)]
HISTORY_COLUMNS = {  # History header: history_frame column
    "loss": "loss", "reward accuracy": "rewards/accuracies", "reward margin": "rewards/margins",
    "chosen reward": "rewards/chosen", "rejected reward": "rewards/rejected", "chosen logp": "logps/chosen",
    "rejected logp": "logps/rejected", "learning rate": "learning_rate", "grad norm": "grad_norm", "epoch": "epoch"}
CHARTS = [("train loss", "train", "loss"), ("eval loss", "eval", "loss"),  # (title, split, history metric)
          ("train reward margin", "train", "rewards/margins"), ("eval reward margin", "eval", "rewards/margins")]
VALUE_WIDTH = 44  # Summary's value column


def runs_frame(records: list[dict], baseline: dict | None = None, columns: list | None = None) -> pd.DataFrame:
    """The Runs sheet as a pandas DataFrame indexed by run_id (the notebook shows it inline), base model first."""
    base = [{"run_id": BASELINE_LABEL, "status": "reference", "evaluation": baseline}] if baseline is not None else []
    rows = base + records
    flat = pd.json_normalize(rows)
    for key in [k for k in flat if k.endswith("_ci")]:
        flat[key] = flat[key].map(lambda ci: "{:.2f}-{:.2f}".format(*ci) if isinstance(ci, (list, tuple)) else None)
    columns = columns or RUN_COLUMNS + EVAL_COLUMNS + JUDGED_COLUMNS + COST_COLUMNS
    return pd.DataFrame({name: [source(r) for r in rows] if callable(source) else flat.get(source)
                         for name, source, _, _ in columns}, index=flat.index).set_index("run_id")


def _value(value):
    """A value Excel can hold: no control characters, no lists (pandas writes NaN and inf as text)."""
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=str)
    if isinstance(value, str):
        value = ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", value)[:32000]  # Excel's cell limit
    return value


def _write(writer, sheet: str, frame: pd.DataFrame, row: int = 1, col: int = 1, header: bool = True, **options):
    """Write `frame` with pandas, its top-left cell at Excel's (row, col); return the sheet, for styling."""
    frame.map(_value).to_excel(writer, sheet_name=sheet, index=False, startrow=row - 1, startcol=col - 1,
                               header=[_value(h) for h in frame.columns] if header else False, **options)
    ws = writer.sheets[sheet]
    for line in ws.iter_rows(min_row=row, max_row=row + len(frame) - (not header), min_col=col,
                             max_col=col + frame.shape[1] - 1):
        for cell in line:
            if cell.value == "":
                cell.value = None  # pandas writes a missing value as empty text, which a chart reads as zero
            elif cell.data_type == "f":
                cell.data_type = "s"  # generated text that starts with "=", never a formula
    return ws


def _style(ws, rows, cols, **attributes) -> None:
    """Set cell attributes (font, fill, alignment, number_format) on rows x cols; None leaves one as it is."""
    for cell in (ws.cell(row, col) for row in rows for col in cols):
        for name, value in attributes.items():
            if value is not None:
                setattr(cell, name, value)


def _text(writer, sheet: str, lines: list[str], font: Font, row: int = 1, col: int = 1):
    """Lines of text down a column (a title, notes) in `font`; returns the sheet."""
    ws = _write(writer, sheet, pd.DataFrame(lines, dtype=object), row, col, header=False)
    _style(ws, range(row, row + len(lines)), [col], font=font)
    return ws


def _table(writer, sheet: str, frame: pd.DataFrame, widths=(), formats=(), aligns=(), row: int = 1, col: int = 1,
           lines: int = 2, autofilter: bool = False, **options):
    """`frame` under a bold, filled header `lines` high, columns `widths` wide with `formats` and `aligns`."""
    ws = _write(writer, sheet, frame, row, col, **options)
    ws.row_dimensions[row].height = 15 * lines  # LibreOffice does not grow a row for wrapped text on its own
    _style(ws, [row], range(col, col + frame.shape[1]), font=BOLD, fill=HEADER_FILL, alignment=WRAP_TOP)
    for c, (width, fmt, align) in enumerate(zip_longest(widths, formats, aligns), start=col):
        if width:
            ws.column_dimensions[get_column_letter(c)].width = width
        _style(ws, range(row + 1, row + len(frame) + 1), [c], number_format=fmt, alignment=align)
    if autofilter:  # by hand: pandas 3.1's to_excel(autofilter=True) names the columns past Z wrongly
        ws.auto_filter.ref = f"A1:{get_column_letter(frame.shape[1])}{len(frame) + 1}"
    return ws


def _lines(text, width: float) -> int:
    """Lines a wrapped cell of `width` characters needs: rows are sized by hand, Excel and LibreOffice do not."""
    return sum(1 + len(part) // max(int(width * 1.1), 1) for part in str(text).split("\n"))


def _chart(ws, title: str, x_title: str, y_title: str, x_col: int, y_cols, header_row: int, last_row: int):
    """A scatter chart of `ws`'s columns `y_cols` against `x_col`, a series each, named from the header row."""
    chart = ScatterChart(scatterStyle="lineMarker")
    chart.title, chart.style, chart.width, chart.height = title, 2, 16, 8.5
    chart.x_axis.title, chart.y_axis.title = x_title, y_title
    chart.x_axis.delete = chart.y_axis.delete = False  # newer Excel hides axes openpyxl leaves unset
    xs = Reference(ws, min_col=x_col, min_row=header_row + 1, max_row=last_row)
    for col in y_cols:
        chart.series.append(Series(Reference(ws, min_col=col, min_row=header_row, max_row=last_row), xs,
                                   title_from_data=True))
    return chart


def _write_runs(writer, frame: pd.DataFrame, columns, best_run_id, best_rule) -> None:
    # Text between numbers, centred (the error indented) to keep it off its neighbours.
    aligns = [None] + [None if fmt else INDENT if name == "error" else CENTER for name, _, fmt, _ in columns[1:]]
    ws = _table(writer, "Runs", frame.reset_index(), [c[3] for c in columns], [c[2] for c in columns], aligns,
                lines=3, autofilter=True, freeze_panes=(1, 1))  # the header and the run ids stay in view
    for row, (run_id, status) in enumerate(frame["status"].items(), start=2):
        is_best = best_run_id is not None and run_id == best_run_id
        font = (BASELINE_FONT if status == "reference" else BOLD if is_best
                else FAILED_FONT if status == "failed" else None)
        _style(ws, [row], range(1, len(columns) + 1), font=font, fill=BEST_FILL if is_best else None)
    _text(writer, "Runs", [f"Best run (green, bold): {best_run_id or 'none'}. Rule: {best_rule}",
                           "Grey italic: the base model without adapter (held-out evaluation only). Red: a failed "
                           "run, see error."], ITALIC, row=len(frame) + 3)  # below a blank row
    ws.print_title_cols, ws.print_title_rows = "A:A", "1:1"  # every printed page names its runs and columns


def _write_charts(writer, history: pd.DataFrame, runs: list[dict], best_run_id) -> None:
    """One scatter-with-lines chart per metric, a line per finished run, drawn from a ChartData block of steps x
    runs. The Charts sheet exists already (its note), so that it stays third."""
    ids, col0 = [r["run_id"] for r in runs], 1  # RunRecord.run_id: a str
    for n, (title, split, metric) in enumerate(CHARTS):
        values = history[history["split"] == split].pivot_table(  # steps x runs; a step with no value is dropped
            index="step", columns="run_id", values=metric, aggfunc="last").reindex(columns=ids).reset_index()
        _text(writer, "ChartData", [title], BOLD, col=col0)
        data = _table(writer, "ChartData", values, [6] + [min(max(9, len(run_id) + 1), 30) for run_id in ids],
                      [None] + [METRIC] * len(runs), row=2, col=col0)
        chart = _chart(data, title, "step", title.split(" ", 1)[1], col0, range(col0 + 1, col0 + len(runs) + 1),
                       2, max(len(values) + 2, 3))
        chart.display_blanks = "span"  # runs logged on different step grids still draw as lines
        chart.x_axis.scaling.min = 0
        for series, run_id, colour in zip(chart.series, ids, cycle(PALETTE)):
            series.graphicalProperties.line.solidFill = colour
            series.graphicalProperties.line.width = 38100 if run_id == best_run_id else 19050  # EMU
            series.marker.symbol, series.marker.size, series.smooth = "circle", 5, False
            series.marker.graphicalProperties.solidFill = series.marker.graphicalProperties.line.solidFill = colour
        writer.sheets["Charts"].add_chart(chart, f"{'A' if n % 2 == 0 else 'J'}{3 + (n // 2) * 18}")  # 2 x 2
        col0 += len(runs) + 2  # a blank column between blocks


def _key_values(writer, row: int, title: str, items: dict, size: int = 12) -> int:
    """label | value rows under a section title, a nested dict (dropped reasons, splits) as a small table below its
    bold name; returns the row after the blank row that ends the block."""
    lines = [(title, None)]
    for key, value in items.items():
        nested = isinstance(value, dict) and value
        lines += [(key, None), *((f"  {k}", v) for k, v in value.items())] if nested else [(key, value)]
    ws = _write(writer, "Summary", pd.DataFrame(lines, dtype=object), row, header=False)
    ws.cell(row, 1).font = Font(name="Calibri", bold=True, size=size)
    for r, (key, value) in enumerate(lines[1:], start=row + 1):
        if isinstance(items.get(key), dict) and items[key]:  # a nested dict's name
            ws.cell(r, 1).font = BOLD
        ws.cell(r, 1).alignment = Alignment(vertical="top")
        ws.cell(r, 2).alignment = Alignment(horizontal="left", vertical="top", wrap_text=True)
        ws.row_dimensions[r].height = 15 * _lines("" if value is None else value, VALUE_WIDTH)
    return row + len(lines) + 1


def _write_summary(writer, records, frame, columns, best_run_id, best_rule, summary, generated_at, best_by) -> None:
    best = next((r for r in records if best_run_id is not None and r.get("run_id") == best_run_id), None)
    runner_up = pick_best([r for r in records if r is not best], best_by)
    statuses = Counter(r.get("status") for r in records)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"

    def numbers(record: dict) -> str:  # the numbers the sweep's rule looks at
        ev, judged = record.get("final_eval") or {}, record.get("judged") or {}
        return (f"eval reward accuracy {fmt(ev.get('rewards/accuracies'))}, eval loss {fmt(ev.get('loss'))}"
                + (f", judged win rate {fmt(judged.get('win_rate'))}" if judged else ""))

    row = _key_values(writer, 1, "DPO sweep summary", {
        "generated at": generated_at, "runs": f"{len(records)} ({statuses['finished']} finished, "
        + (f"{statuses['pruned']} pruned, " if statuses["pruned"] else "") + f"{statuses['failed']} failed)"},
        size=14)
    row = _key_values(writer, row, "Best configuration and why", {
        "best run": best_run_id or "none (no finished run)", "rule": best_rule,
        "runner-up": runner_up.get("run_id") if runner_up else "none",
        "why": "\n".join(f"{label} {r.get('run_id')}: {numbers(r)}" for label, r in
                         (("best", best), ("runner-up", runner_up)) if r is not None)})
    # The numbers behind the choice: the Runs columns transposed, best, runner-up and base model side by side.
    ids = [best_run_id if best else None, runner_up.get("run_id") if runner_up else None]
    ids += [BASELINE_LABEL] if BASELINE_LABEL in frame.index else []
    labels = [f"best: {best_run_id}", f"runner-up: {ids[1] or 'none'}", BASELINE_LABEL][:len(ids)]
    compared = frame.reindex(ids).T.set_axis(labels, axis=1).rename_axis("quantity").reset_index()
    ws = _table(writer, "Summary", compared, row=row, lines=1)
    for i, (name, _, number_format, _) in enumerate(columns[1:], start=row + 1):
        for col, run_id in enumerate(ids, start=2):
            if run_id is not None:  # no best run (none finished): an empty column
                _style(ws, [i], [col], number_format=number_format, fill=BEST_FILL if col == 2 else None,
                       alignment=Alignment(horizontal="right", wrap_text=name == "error"))
    row += len(columns) + 1
    for title, key in (("Data (cleaning report)", "data"), ("Model", "model"), ("Sweep", "sweep")):
        if summary.get(key):
            row = _key_values(writer, row, title, summary[key])
    ws.column_dimensions["A"].width, ws.column_dimensions["B"].width = 30, VALUE_WIDTH
    ws.column_dimensions["C"].width = ws.column_dimensions["D"].width = 24


def _write_samples(writer, sheet: str, samples: list[dict]) -> None:
    frame = pd.DataFrame(samples)  # every key a column, in order of first appearance
    widths = [40 if k == "prompt" else 45 for k in frame.columns]
    ws = _table(writer, sheet, frame, widths, aligns=[WRAP_TOP] * len(widths), freeze_panes=(1, 1))
    for i, values in enumerate(frame.itertuples(index=False), start=2):
        ws.row_dimensions[i].height = min(15 * max([1, *map(_lines, values, widths)]), 400)


def _write_behaviour(writer, report: dict) -> None:
    """The best run's paired behaviour tests (behaviour.py) and each model's measures, under a one-line note."""
    tests = pd.DataFrame(behaviour_test_rows(report))
    models = pd.DataFrame([{"model": name, "prompts": m["prompts"], "refusal rate": m["refusal_rate"],
                            "refusal 95% CI": "[{:.2f}, {:.2f}]".format(*m["refusal_rate_ci"]),
                            "lexical score": m["lexical_score"], "tokens": m["tokens"], "KL to base (nats)": m["kl"]}
                           for name, m in report["models"].items()])
    judge = report["lexical_judge"]
    _text(writer, "Behaviour", [f"{report['prompts']} held-out prompts, {report['decoding']}. Lexical judge on "
                                f"held-out pairs: {judge['accuracy']:.3f} (pick the shorter "
                                f"{judge['shorter_accuracy']:.3f})."], ITALIC)
    _table(writer, "Behaviour", tests, (20, 14, 12, 22, 10, 10), (None, None, METRIC, None, "0.0000", "0.0000"), row=3)
    _table(writer, "Behaviour", models, (20, 10, 12, 16, 14, 10, 16),
           (None, None, METRIC, None, METRIC, "0.0", METRIC), row=len(tests) + 6)


def _write_trials(writer, records, best_by: str) -> None:
    """A TPE search's runs in trial order: the number the best-run rule ranks by, the best so far, and a chart."""
    frame = trials_frame(records, best_by)
    ws = _table(writer, "Trials", frame, [7, 24, 9, 12, 12], [INT, None, None, METRIC, METRIC])
    chart = _chart(ws, "the rule's number per trial", "trial", frame.columns[3], 1, [4, 5], 1, len(frame) + 1)
    for series, line in zip(chart.series, (False, True)):  # each trial's number as a dot, the best so far as a line
        series.marker.symbol = "none" if line else "circle"
        series.graphicalProperties.line.noFill = not line
    ws.add_chart(chart, "G2")


def build_workbook(records: list[dict], path, *, best_run_id: str | None, best_rule: str, summary: dict,
                   samples: list[dict], baseline: dict | None = None, best_by: str = "reward_accuracy",
                   behaviour: dict | None = None) -> Path:
    """Write the sweep workbook to `path` atomically (temp file in the same folder, then rename); return the path.

    records: RunRecord.to_dict() per run; baseline: the held-out evaluation of the base model without adapter;
    summary: {"data": cleaning report dict, "model": model_info, "sweep": sweep settings}; each optional;
    behaviour: the best run's behaviour report (its behaviour.json), a sheet of its own.
    """
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    has_eval = baseline is not None or any(r.get("evaluation") for r in records)
    columns = (RUN_COLUMNS + (EVAL_COLUMNS if has_eval else []) + (JUDGED_COLUMNS if any(map(_judged, records)) else [])
               + COST_COLUMNS)
    frame = runs_frame(records, baseline, columns)
    frames = [history_frame(r.get("log_history") or []).assign(run_id=r.get("run_id")) for r in records]
    history = pd.concat([f for f in frames if not f.empty] or [pd.DataFrame()]).reindex(
        columns=["run_id", "step", "split", *HISTORY_COLUMNS.values()])
    completions = [{"run_id": r.get("run_id"), **row} for r in records for row in r.get("completions") or []]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xlsx")
    try:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:  # sheets stand in the order they are first written
            _write_runs(writer, frame, columns, best_run_id, best_rule)
            _write_summary(writer, records, frame, columns, best_run_id, best_rule, summary, generated_at, best_by)
            _text(writer, "Charts", [f"One line per finished run (the best, {best_run_id}, drawn thicker). "
                                     "The numbers are on the ChartData sheet."], ITALIC)  # charts: with ChartData
            _table(writer, "History", history.set_axis(["run_id", "step", "split", *HISTORY_COLUMNS], axis=1),
                   [24, 7, 7] + [11] * len(HISTORY_COLUMNS), [None, INT, None] + [
                       LR if key == "learning_rate" else METRIC for key in HISTORY_COLUMNS.values()],
                   [None, CENTER, CENTER], autofilter=True, freeze_panes=(1, 0))
            _write_samples(writer, "Samples", samples)
            if completions:
                _write_samples(writer, "Completions", completions)
            if tpe_trials(records):
                _write_trials(writer, records, best_by)
            if (behaviour or {}).get("tests"):
                _write_behaviour(writer, behaviour)
            runs = [r for r in records if r.get("status") == "finished"]
            _write_charts(writer, history[history["run_id"].isin([r.get("run_id") for r in runs])], runs, best_run_id)
            for ws in writer.book.worksheets:  # pages that read well printed: fit the width (and the height of some)
                ws.page_setup.orientation = "portrait" if ws.title == "Summary" else "landscape"
                ws.page_setup.paperSize = ws.PAPERSIZE_A4
                ws.page_margins.left = ws.page_margins.right = 0.4
                ws.sheet_properties.pageSetUpPr.fitToPage = True
                ws.page_setup.fitToWidth = 2 if ws.title == "Runs" else 1  # one page would shrink Runs past reading
                ws.page_setup.fitToHeight = 1 if ws.title in ("Summary", "Charts", "Trials") else 0
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
