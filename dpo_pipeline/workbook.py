"""Excel workbook of a sweep: one row a run, per-step history, the best run and why, samples, native charts.

`build_workbook(records, path, ...)` is a function of its inputs alone (apart from the generated-at time): the
run records on disk are the truth, and the workbook is rebuilt from them whenever they change.

Sheets: Runs (one row a run, the base model first, the best highlighted), Summary, Charts (native line charts),
History (every logged train/eval step), Samples (generations), Completions (answers while training), Trials (a TPE
search: the rule's number per trial, with a chart), ChartData (the numbers the charts draw).
pandas writes every table (`DataFrame.to_excel`); openpyxl styles them and draws the charts, which pandas does not.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from functools import reduce
from itertools import zip_longest
from pathlib import Path

import pandas as pd
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
FAILED_FONT, BASELINE_FONT = Font(name="Calibri", color="C00000"), Font(name="Calibri", italic=True, color="808080")
CENTER, LEFT = Alignment(horizontal="center"), Alignment(horizontal="left")
INDENT, WRAP_TOP = Alignment(horizontal="left", indent=1), Alignment(wrap_text=True, vertical="top")
METRIC, LR, SECONDS, INT, SMALL = "0.000", "0.0E+00", "0.0", "0", "0.0##"
PALETTE = ["1F77B4", "FF7F0E", "2CA02C", "D62728", "9467BD", "8C564B", "E377C2", "7F7F7F", "BCBD22", "17BECF"]


def _get(*path):
    """A reader of record[path[0]][path[1]]...: None where a step is missing."""
    return lambda record: reduce(lambda part, key: (part or {}).get(key), path, record)


def _interval(part: str, key: str):
    """A 95% interval [lo, hi] as text, e.g. "0.58-0.69"."""
    return lambda r: "{:.2f}-{:.2f}".format(*_get(part, key)(r)) if _get(part, key)(r) else None


_judged = _get("judged", "n")  # judged prompts: a record judged against the base model has some

# Runs columns: (header, how to read it from a record, number format, width), in reading order.
RUN_COLUMNS = [
    ("run_id", _get("run_id"), None, 24), ("status", _get("status"), None, 9),
    ("search", lambda r: search_label(r) if r.get("config") else None, None, 9),
    ("base model", _get("config", "model_name_or_path"), None, 18),
    *[(k, _get("config", k), fmt, width) for k, fmt, width in [
        ("learning_rate", LR, 8), ("per_device_train_batch_size", INT, 6), ("gradient_accumulation_steps", INT, 6),
        ("beta", SMALL, 6), ("optim", None, 9), ("loss_type", None, 8), ("lora_r", INT, 5), ("lora_alpha", INT, 6),
        ("lora_dropout", SMALL, 8), ("num_train_epochs", SMALL, 7), ("max_steps", INT, 6), ("max_length", INT, 7),
        ("seed", INT, 5)]],
    ("final train loss", _get("final_train_loss"), METRIC, 9),
    *[(f"eval {name}", _get("final_eval", key), METRIC, 9) for name, key in [
        ("loss", "loss"), ("reward accuracy", "rewards/accuracies"), ("reward margin", "rewards/margins"),
        ("chosen reward", "rewards/chosen"), ("rejected reward", "rewards/rejected")]],
]
# Held-out evaluation (dpo_pipeline.evaluate); the only numbers the base model has, so its row is filled here.
EVAL_COLUMNS = [(name, (_interval if name.endswith("CI") else _get)("evaluation", key), fmt, 10)
                for name, key, fmt in [
    ("held-out pairs", "pairs", INT), ("held-out reward accuracy", "reward_accuracy", METRIC),
    ("reward accuracy 95% CI", "reward_accuracy_ci", None), ("reward ties", "reward_ties", METRIC),
    ("held-out reward margin", "reward_margin", METRIC), ("logp accuracy", "logp_accuracy", METRIC),
    ("chosen logp shift", "chosen_logp_shift", METRIC), ("rejected logp shift", "rejected_logp_shift", METRIC),
    ("logp accuracy 95% CI", "logp_accuracy_ci", None), ("pick-the-shorter baseline", "shorter_accuracy", METRIC)]]
# Judged generations against the base model (judge.py): a tie counts half.
JUDGED_COLUMNS = [
    ("judged prompts", _judged, INT, 8), ("win rate vs base", _get("judged", "win_rate"), METRIC, 9),
    ("win rate 95% CI", _interval("judged", "win_rate_ci"), None, 10),
    ("wins / ties / losses", lambda r: "/".join(str(r["judged"].get(k, "")) for k in ("wins", "ties", "losses"))
     if _judged(r) else None, None, 10),
    ("length-matched win rate", _get("judged", "length_matched", "win_rate"), METRIC, 10),
    ("answer length policy / base", lambda r: "{mean_length_policy:.0f} / {mean_length_base:.0f}".format(
        **r["judged"]) if _judged(r) else None, None, 10),
    ("judge accuracy on held-out pairs", _get("judged", "judge_accuracy"), METRIC, 10),
    ("judge error", _get("judged", "error"), None, 30),
]
COST_COLUMNS = [  # run time and evaluating (record timings_s): a sweep's cost is not only its training
    ("train steps", _get("train_steps"), INT, 8), ("wall time (s)", _get("wall_time_s"), SECONDS, 9),
    ("run time (s)", _get("timings_s", "total"), SECONDS, 9),
    ("evaluating (s)", lambda r: evaluating_seconds(r["timings_s"]) if r.get("timings_s") else None, SECONDS, 9),
    ("pairs/s", _get("pairs_per_second"), SECONDS, 8), ("error", _get("error"), None, 48),
    ("doctor", lambda r: "\n".join(r.get("findings") or []) or None, None, 48)]
HISTORY_COLUMNS = [  # (header, history_frame column)
    ("loss", "loss"), ("reward accuracy", "rewards/accuracies"), ("reward margin", "rewards/margins"),
    ("chosen reward", "rewards/chosen"), ("rejected reward", "rewards/rejected"), ("chosen logp", "logps/chosen"),
    ("rejected logp", "logps/rejected"), ("learning rate", "learning_rate"), ("grad norm", "grad_norm"),
    ("epoch", "epoch"),
]
CHARTS = [("train loss", "train", "loss"), ("eval loss", "eval", "loss"),  # (title, split, history metric)
          ("train reward margin", "train", "rewards/margins"), ("eval reward margin", "eval", "rewards/margins")]
VALUE_WIDTH = 44  # Summary's value column
SECTION_FONT = Font(name="Calibri", bold=True, size=12)  # a Summary section's title


def _value(value):
    """A value Excel can hold: no NaN (a corrupt file), no control characters, no lists; None stays empty."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, default=str)
    if isinstance(value, str):
        value = ILLEGAL_CHARACTERS_RE.sub("\N{REPLACEMENT CHARACTER}", value)[:32000]  # Excel's cell limit
    return value


def _write(writer, sheet: str, frame: pd.DataFrame, row: int = 1, col: int = 1, header: bool = True, **options):
    """Write `frame` with pandas, its top-left cell at Excel's (row, col); return the sheet, for styling."""
    cells = pd.DataFrame([[_value(v) for v in line] for line in frame.to_numpy(object)],
                         columns=range(frame.shape[1]), dtype=object)  # object: ints stay ints, None stays None
    cells.to_excel(writer, sheet_name=sheet, index=False, startrow=row - 1, startcol=col - 1,
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


def _text(writer, sheet: str, lines: list[str], font: Font, row: int = 1, col: int = 1) -> None:
    """Lines of text down a column (a title, notes) in `font`."""
    ws = _write(writer, sheet, pd.DataFrame(lines, dtype=object), row, col, header=False)
    _style(ws, range(row, row + len(lines)), [col], font=font)


def _style(ws, rows, cols, **attributes) -> None:
    """Set cell attributes (font, fill, alignment, number_format) on rows x cols; None leaves one as it is."""
    for cell in (ws.cell(row, col) for row in rows for col in cols):
        for name, value in attributes.items():
            if value is not None:
                setattr(cell, name, value)


def _table(writer, sheet: str, frame: pd.DataFrame, widths=(), formats=(), aligns=(), row: int = 1, col: int = 1,
           lines: int = 2, autofilter: bool = False, **options):
    """`frame` under a bold, filled header `lines` high, its columns `widths` wide with number `formats` and
    `aligns`; `autofilter`: filter buttons on the header. Returns the sheet."""
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


def _print_setup(ws, landscape: bool = True, pages_wide: int = 1, one_page: bool = False) -> None:
    """Pages that read well when printed or rendered: fit the width (and the height, for charts)."""
    ws.page_setup.orientation = "landscape" if landscape else "portrait"
    ws.page_setup.paperSize = ws.PAPERSIZE_A4
    ws.page_margins.left = ws.page_margins.right = 0.4
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.page_setup.fitToWidth, ws.page_setup.fitToHeight = pages_wide, (1 if one_page else 0)


def _chart(title: str, x_title: str, y_title: str) -> ScatterChart:
    chart = ScatterChart(scatterStyle="lineMarker")
    chart.title, chart.style, chart.width, chart.height = title, 2, 16, 8.5
    chart.x_axis.title, chart.y_axis.title = x_title, y_title
    chart.x_axis.delete = chart.y_axis.delete = False  # newer Excel hides axes openpyxl leaves unset
    return chart


def _write_runs(writer, records, baseline, best_run_id, best_rule) -> list[tuple]:
    has_eval = baseline is not None or any(r.get("evaluation") for r in records)
    has_judged = any(r.get("judged") for r in records)
    columns = RUN_COLUMNS + (EVAL_COLUMNS if has_eval else []) + (JUDGED_COLUMNS if has_judged else []) + COST_COLUMNS
    base = {"run_id": BASELINE_LABEL, "status": "reference", "evaluation": baseline}
    rows = ([base] if baseline is not None else []) + records
    frame = pd.DataFrame([[get(r) for _, get, _, _ in columns] for r in rows], columns=[c[0] for c in columns],
                         dtype=object)
    # Text between numbers, centred (the error indented) to keep it off its neighbours.
    aligns = [None] + [None if fmt else INDENT if name == "error" else CENTER for name, _, fmt, _ in columns[1:]]
    ws = _table(writer, "Runs", frame, [c[3] for c in columns], [c[2] for c in columns], aligns, lines=3,
                autofilter=True, freeze_panes=(1, 1))  # the header and the run ids stay in view on a wide table
    for row, rec in enumerate(rows, start=2):
        is_best = rec is not base and best_run_id is not None and rec.get("run_id") == best_run_id
        font = (BASELINE_FONT if rec is base else BOLD if is_best
                else FAILED_FONT if rec.get("status") == "failed" else None)
        _style(ws, [row], range(1, len(columns) + 1), font=font, fill=BEST_FILL if is_best else None)
    _text(writer, "Runs", [f"Best run (green, bold): {best_run_id or 'none'}. Rule: {best_rule}",
                           "Grey italic: the base model without adapter (held-out evaluation only). Red: a failed "
                           "run, see error."], ITALIC, row=len(rows) + 3)  # below a blank row
    _print_setup(ws, pages_wide=2)  # one page would shrink the text past reading
    ws.print_title_cols, ws.print_title_rows = "A:A", "1:1"  # every printed page names its runs and columns
    return columns


def _history(records) -> pd.DataFrame:
    """Every logged train/eval step of every run, a row each: run_id, step, split and history_frame's metrics."""
    frames = [history_frame(r.get("log_history") or []).assign(run_id=r.get("run_id")) for r in records]
    frame = pd.concat([f for f in frames if not f.empty] or [pd.DataFrame()])
    return frame.reindex(columns=["run_id", "step", "split", *(key for _, key in HISTORY_COLUMNS)])


def _write_history(writer, records) -> None:
    frame = _history(records).set_axis(["run_id", "step", "split", *(h for h, _ in HISTORY_COLUMNS)], axis=1)
    formats = [None, INT, None] + [LR if key == "learning_rate" else METRIC for _, key in HISTORY_COLUMNS]
    _print_setup(_table(writer, "History", frame, [24, 7, 7] + [11] * len(HISTORY_COLUMNS), formats,
                        [None, CENTER, CENTER], autofilter=True, freeze_panes=(1, 0)))


def _write_charts(writer, records, best_run_id) -> None:
    """One scatter-with-lines chart per metric, a line per finished run, drawn from a ChartData block of steps x
    runs. The Charts sheet exists already (its note), so that it stays third."""
    runs = [r for r in records if r.get("status") == "finished"]
    history, ids, col0 = _history(runs), [r.get("run_id") for r in runs], 1
    names = [str(i) for i in ids]
    for n, (title, split, metric) in enumerate(CHARTS):
        logged = history[history["split"] == split].dropna(subset=[metric])
        values = logged.groupby(["step", "run_id"])[metric].last().unstack().reindex(columns=ids)
        values = values.set_axis(names, axis=1).rename_axis("step").reset_index()
        _text(writer, "ChartData", [title], BOLD, col=col0)
        data = _table(writer, "ChartData", values, [6] + [min(max(9, len(name) + 1), 30) for name in names],
                      [None] + [METRIC] * len(runs), row=2, col=col0)
        chart = _chart(title, "step", title.split(" ", 1)[1])
        chart.display_blanks = "span"  # runs logged on different step grids still draw as lines
        chart.x_axis.scaling.min = 0
        last = max(len(values) + 2, 3)
        xs = Reference(data, min_col=col0, min_row=3, max_row=last)
        for j, run in enumerate(runs, start=1):
            series = Series(Reference(data, min_col=col0 + j, min_row=2, max_row=last), xs, title_from_data=True)
            colour = PALETTE[(j - 1) % len(PALETTE)]
            series.graphicalProperties.line.solidFill = colour
            series.graphicalProperties.line.width = 38100 if run.get("run_id") == best_run_id else 19050  # EMU
            series.marker.symbol, series.marker.size, series.smooth = "circle", 5, False
            series.marker.graphicalProperties.solidFill = series.marker.graphicalProperties.line.solidFill = colour
            chart.series.append(series)
        writer.sheets["Charts"].add_chart(chart, f"{'A' if n % 2 == 0 else 'J'}{3 + (n // 2) * 18}")  # 2 x 2
        col0 += len(runs) + 2  # a blank column between blocks
    _print_setup(writer.sheets["Charts"], one_page=True)
    _print_setup(writer.sheets["ChartData"])


def _key_values(writer, row: int, title: str, items: dict) -> int:
    """label | value rows under a section title, a nested dict (dropped reasons, splits) as a small table below its
    name; returns the row after the blank row that ends the block."""
    _text(writer, "Summary", [title], SECTION_FONT, row)
    lines = []  # (label, value, kind): "value", "table" (a nested dict's name) or "item" (one of its rows)
    for key, value in items.items():
        nested = isinstance(value, dict) and value
        lines += [(key, None, "table"), *((f"  {k}", v, "item") for k, v in value.items())] if nested else [
            (key, value, "value")]
    ws = _write(writer, "Summary", pd.DataFrame([line[:2] for line in lines], dtype=object), row + 1, header=False)
    for r, (_, value, kind) in enumerate(lines, start=row + 1):
        if kind == "table":
            ws.cell(r, 1).font = BOLD
        elif kind == "item":
            ws.cell(r, 2).alignment = LEFT
        else:
            ws.cell(r, 1).alignment = Alignment(vertical="top")
            ws.cell(r, 2).alignment = Alignment(horizontal="left", vertical="top", wrap_text=True)
            ws.row_dimensions[r].height = 15 * _lines("" if value is None else value, VALUE_WIDTH)
    return row + len(lines) + 2


def _rule_numbers(record: dict) -> str:
    """The numbers the sweep's rule looks at, as text."""
    ev, judged = record.get("final_eval") or {}, record.get("judged") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    return (f"eval reward accuracy {fmt(ev.get('rewards/accuracies'))}, eval loss {fmt(ev.get('loss'))}"
            + (f", judged win rate {fmt(judged.get('win_rate'))}" if judged else ""))


def _write_summary(writer, records, columns, best_run_id, best_rule, summary, baseline, generated_at,
                   best_by) -> None:
    best = next((r for r in records if best_run_id is not None and r.get("run_id") == best_run_id), None)
    runner_up = pick_best([r for r in records if r is not best], best_by)
    failed = sum(r.get("status") == "failed" for r in records)
    runs = f"{len(records)} ({len(records) - failed} finished, {failed} failed)"
    _text(writer, "Summary", ["DPO sweep summary"], Font(name="Calibri", bold=True, size=14))
    ws = _write(writer, "Summary", pd.DataFrame([["generated at", generated_at], ["runs", runs]]), 2, header=False)
    ws.cell(2, 2).alignment = LEFT
    row = _key_values(writer, 5, "Best configuration and why", {
        "best run": best_run_id or "none (no finished run)", "rule": best_rule,
        "runner-up": runner_up.get("run_id") if runner_up else "none",
        "why": "\n".join(f"{label} {r.get('run_id')}: {_rule_numbers(r)}" for label, r in
                         (("best", best), ("runner-up", runner_up)) if r is not None)})
    # The numbers behind the choice: the Runs columns transposed, best, runner-up and base model side by side.
    compared = [best, runner_up] + ([{"evaluation": baseline}] if baseline is not None else [])
    labels = [f"best: {best_run_id}", f"runner-up: {runner_up.get('run_id') if runner_up else 'none'}",
              BASELINE_LABEL][:len(compared)]
    frame = pd.DataFrame([[name] + [get(r) if r is not None else None for r in compared]
                          for name, get, _, _ in columns[1:]], columns=["quantity", *labels], dtype=object)
    _table(writer, "Summary", frame, row=row, lines=1)
    for i, (name, _, fmt, _) in enumerate(columns[1:], start=row + 1):
        for col, rec in enumerate(compared, start=2):
            if rec is not None:  # no best run (none finished): an empty column
                _style(ws, [i], [col], number_format=fmt, fill=BEST_FILL if col == 2 else None,
                       alignment=Alignment(horizontal="right", wrap_text=name == "error"))
    row += len(columns) + 1
    for title, key in (("Data (cleaning report)", "data"), ("Model", "model"), ("Sweep", "sweep")):
        if summary.get(key):
            row = _key_values(writer, row, title, summary[key])
    ws.column_dimensions["A"].width, ws.column_dimensions["B"].width = 30, VALUE_WIDTH
    ws.column_dimensions["C"].width = ws.column_dimensions["D"].width = 24
    _print_setup(ws, landscape=False, one_page=True)


def _write_samples(writer, sheet: str, samples: list[dict]) -> None:
    keys = list(dict.fromkeys(k for s in samples for k in s))  # every key, in order of first appearance
    widths = [40 if k == "prompt" else 45 for k in keys]
    frame = pd.DataFrame([[v if isinstance(v, (int, float)) else "" if v is None else str(v)  # numbers stay numbers
                           for v in map(s.get, keys)] for s in samples], columns=keys, dtype=object)
    ws = _table(writer, sheet, frame, widths, aligns=[WRAP_TOP] * len(keys), freeze_panes=(1, 1))
    for i, values in enumerate(frame.itertuples(index=False), start=2):
        ws.row_dimensions[i].height = min(15 * max([1, *map(_lines, values, widths)]), 400)
    _print_setup(ws)


def _write_behaviour(writer, report: dict) -> None:
    """The best run's paired behaviour tests (behaviour.py) and each model's measures, under a one-line note."""
    tests = pd.DataFrame([{"comparison": name, "measure": measure, "difference": r[measure]["difference"],
                           "test": r[measure]["test"], "p": r[measure]["p"], "Holm p": r[measure]["p_holm"]}
                          for name, r in report["tests"].items() for measure in r])
    models = pd.DataFrame([{"model": name, "prompts": m["prompts"], "refusal rate": m["refusal_rate"],
                            "refusal 95% CI": _interval_text(m["refusal_rate_ci"]), "lexical score": m["lexical_score"],
                            "tokens": m["tokens"], "KL to base (nats)": m["kl"]} for name, m in report["models"].items()])
    judge = report["lexical_judge"]
    _text(writer, "Behaviour", [f"{report['prompts']} held-out prompts, {report['decoding']}. Lexical judge on held-out "
                                f"pairs: {judge['accuracy']:.3f} (pick the shorter {judge['shorter_accuracy']:.3f})."],
          ITALIC)
    _table(writer, "Behaviour", tests, (20, 14, 12, 22, 10, 10), (None, None, "0.000", None, "0.0000", "0.0000"), row=3)
    _table(writer, "Behaviour", models, (20, 10, 12, 16, 14, 10, 16), (None, None, "0.000", None, "0.000", "0.0", "0.000"),
           row=len(tests) + 6)


def _interval_text(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _write_trials(writer, records, best_by: str) -> None:
    """A TPE search's runs in trial order: the number the best-run rule ranks by, the best so far, and a chart."""
    trials, label = tpe_trials(records), best_by.replace("_", " ")
    finished = [rule_value(r, best_by) if r["status"] == "finished" else math.nan for r in trials]
    frame = pd.DataFrame({"trial": [r["search"]["trial"] for r in trials], "run_id": [r.get("run_id") for r in trials],
                          "status": [r["status"] for r in trials], label: [rule_value(r, best_by) for r in trials],
                          "best so far": pd.Series(finished, dtype=float).cummax().ffill()}, dtype=object)
    ws = _table(writer, "Trials", frame, [7, 24, 9, 12, 12], [INT, None, None, METRIC, METRIC])
    chart = _chart("the rule's number per trial", "trial", label)
    xs = Reference(ws, min_col=1, min_row=2, max_row=len(trials) + 1)
    for col, line in ((4, False), (5, True)):  # each trial's number as a dot, the best so far as a line
        series = Series(Reference(ws, min_col=col, min_row=1, max_row=len(trials) + 1), xs, title_from_data=True)
        series.marker.symbol = "none" if line else "circle"
        series.graphicalProperties.line.noFill = not line
        chart.series.append(series)
    ws.add_chart(chart, "G2")
    _print_setup(ws, one_page=True)


def runs_frame(records: list[dict], baseline: dict | None = None) -> pd.DataFrame:
    """The Runs sheet as a pandas DataFrame (the notebook shows it inline), base model first."""
    base = [{"run_id": BASELINE_LABEL, "status": "reference", "evaluation": baseline}] if baseline else []
    columns = RUN_COLUMNS + EVAL_COLUMNS + JUDGED_COLUMNS + COST_COLUMNS
    return pd.DataFrame([{c[0]: c[1](r) for c in columns} for r in base + records]).set_index("run_id")


def build_workbook(records: list[dict], path, *, best_run_id: str | None, best_rule: str, summary: dict,
                   samples: list[dict], baseline: dict | None = None, best_by: str = "reward_accuracy",
                   behaviour: dict | None = None) -> Path:
    """Write the sweep workbook to `path` atomically (temp file in the same folder, then rename); return the path.

    records: RunRecord.to_dict() per run; baseline: the held-out evaluation of the base model without adapter;
    summary: {"data": cleaning report dict, "model": model_info, "sweep": sweep settings}; each optional;
    behaviour: the best run's behaviour report (its behaviour.json), a sheet of its own.
    """
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    completions = [{"run_id": r.get("run_id"), **row} for r in records for row in r.get("completions") or []]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xlsx")
    try:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:  # sheets stand in the order they are first written
            columns = _write_runs(writer, records, baseline, best_run_id, best_rule)
            _write_summary(writer, records, columns, best_run_id, best_rule, summary, baseline, generated_at,
                           best_by)
            _text(writer, "Charts", [f"One line per finished run (the best, {best_run_id}, drawn thicker). "
                                     "The numbers are on the ChartData sheet."], ITALIC)  # charts: with ChartData
            _write_history(writer, records)
            _write_samples(writer, "Samples", samples)
            if completions:
                _write_samples(writer, "Completions", completions)
            if tpe_trials(records):
                _write_trials(writer, records, best_by)
            if (behaviour or {}).get("tests"):
                _write_behaviour(writer, behaviour)
            _write_charts(writer, records, best_run_id)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
