"""Report stage: what people would rather see than read (example tables, training curves, sweep plots as PNG)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .runs import rule_value, tpe_trials


def show_examples(dataset, n: int = 3, width: int = 300) -> pd.DataFrame:
    """The first `n` pairs as a table, each text cut to its last `width` characters of prompt / first of answers."""
    rows = dataset.select(range(min(n, len(dataset))))
    text = lambda m: m if isinstance(m, str) else " | ".join(f"{x['role']}: {x['content']}" for x in m)  # messages
    cut = lambda s, tail=False: (("…" + s[-width:]) if tail else (s[:width] + "…")) if len(s) > width else s
    return pd.DataFrame({
        "prompt (end)": [cut(text(r["prompt"]), tail=True) for r in rows],
        "chosen": [cut(text(r["chosen"])) for r in rows],
        "rejected": [cut(text(r["rejected"])) for r in rows],
    })


def history_frame(log_history: list[dict]) -> pd.DataFrame:
    """Trainer log history as one row per (step, train|eval) with TRL's metric names, prefix dropped."""
    rows = []
    for entry in log_history:
        if "eval_loss" in entry:
            rows.append({"step": entry["step"], "split": "eval",
                         **{k[5:]: v for k, v in entry.items() if k.startswith("eval_")}})
        elif "loss" in entry:
            rows.append({"step": entry["step"], "split": "train", **entry})
    return pd.DataFrame(rows, columns=None if rows else ["step", "split"])


def trials_frame(records: list[dict], by: str = "reward_accuracy") -> pd.DataFrame:
    """A TPE search's runs in trial order: the number the best-run rule ranks by, and the best so far (finished)."""
    trials, label = tpe_trials(records), by.replace("_", " ")
    frame = pd.DataFrame({"trial": [r["search"]["trial"] for r in trials], "run_id": [r.get("run_id") for r in trials],
                          "status": [r["status"] for r in trials], label: [rule_value(r, by) for r in trials]})
    frame["best so far"] = frame[label].astype(float).where(frame["status"] == "finished").cummax().ffill()
    return frame


def plot_history(log_history: list[dict], title: str = "DPO training", fig=None):
    """Loss, reward accuracy and reward margin against steps, train and eval, on `fig` or pyplot's (inline)."""
    if fig is None:
        import matplotlib.pyplot as plt  # only here: importing pyplot picks a GUI backend

        fig = plt.figure(figsize=(13, 3.5))
    frame = history_frame(log_history)
    for ax, metric in zip(fig.subplots(1, 3), ["loss", "rewards/accuracies", "rewards/margins"]):
        for split, style in (("train", "-"), ("eval", "o--")):
            part = frame[frame["split"] == split]
            if metric in part:
                ax.plot(part["step"], part[metric], style, label=split)
        ax.set(title=metric, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 4.5
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# The PNGs are drawn on a bare matplotlib Figure, not pyplot: no GUI backend is touched, nothing has to be closed,
# and the notebook's inline backend stays as it is.
def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_sweep(records: list[dict], path, best_run_id: str | None = None) -> Path:
    """PNG comparing runs: eval loss against steps per run, and final eval reward accuracy and margin per run."""
    runs = [r for r in records if r.get("status") == "finished"]
    failed = ", ".join(str(r.get("run_id")) for r in records if r.get("status") == "failed")
    fig = Figure(figsize=(14, 4.2))
    curves, accuracy, margin = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.4, 1, 1]})
    for run in runs:
        frame = history_frame(run.get("log_history") or [])
        evals, best = frame[frame["split"] == "eval"], run.get("run_id") == best_run_id
        if "loss" in evals:
            curves.plot(evals["step"], evals["loss"], "o-", lw=3 if best else 1.5, label=str(run.get("run_id"))
                        + (" (best)" if best else ""))
    curves.set(title="eval loss", xlabel="step")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    if runs:
        curves.legend(fontsize=8)
    for ax, key, label in ((accuracy, "rewards/accuracies", "final eval reward accuracy"),
                           (margin, "rewards/margins", "final eval reward margin")):
        ax.bar(range(len(runs)), [(r.get("final_eval") or {}).get(key) or 0.0 for r in runs],
               color=["tab:green" if r.get("run_id") == best_run_id else "tab:gray" for r in runs])
        ax.set_xticks(range(len(runs)), [str(r.get("run_id")) for r in runs], rotation=30, ha="right", fontsize=8)
        for tick, run in zip(ax.get_xticklabels(), runs):
            tick.set_fontweight("bold" if run.get("run_id") == best_run_id else "normal")
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    accuracy.set_ylim(0, 1.05)
    fig.suptitle(f"Sweep: {len(runs)} finished runs, best {best_run_id or 'none'} in green"
                 + (f"; failed: {failed}" if failed else ""))
    fig.tight_layout()
    return _save(fig, path)


def plot_trials(records: list[dict], by: str = "reward_accuracy"):
    """The best-run rule's number against the trial of a model-based (TPE) search, with the best so far."""
    frame, label = trials_frame(records, by), by.replace("_", " ")
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    for status, colour in (("finished", "tab:blue"), ("pruned", "tab:orange"), ("failed", "tab:red")):
        part = frame[frame["status"] == status]
        ax.plot(part["trial"], part[label], "o", color=colour, label=status)
    finished = frame[frame["status"] == "finished"]
    if not finished.empty:
        ax.step(finished["trial"], finished["best so far"], where="post", color="tab:green", label="best so far")
    ax.set(title="TPE search: the number the best-run rule ranks by, per trial", xlabel="trial", ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_plots(records: list[dict], plots_dir, best_run_id: str | None = None, best_by: str = "reward_accuracy"
               ) -> list[Path]:
    """`<run-id>.png` for every run with a log (its loss, reward accuracy and margin), `sweep.png`, and
    `trials.png` for a TPE search, under `plots_dir`; returns the paths written."""
    plots_dir, paths = Path(plots_dir), []
    for r in (r for r in records if r.get("log_history")):
        cfg = r.get("config") or {}
        title = (f"run {r.get('run_id') or '?'}: lr {cfg.get('learning_rate')}, beta {cfg.get('beta')}, "
                 f"{cfg.get('loss_type')}, {r.get('train_steps')} steps")
        paths.append(_save(plot_history(r["log_history"], title, Figure(figsize=(13, 3.5))),
                           plots_dir / f"{r.get('run_id')}.png"))
    if tpe_trials(records):
        paths.append(_save(plot_trials(records, best_by), plots_dir / "trials.png"))
    return paths + [plot_sweep(records, plots_dir / "sweep.png", best_run_id)]


def plot_against_controls(runs: dict[str, dict]):
    """Bars with 95% intervals for each run record in `runs` (label -> record): held-out reward accuracy, log-prob
    accuracy and judged win rate against its base, with the pick-the-shorter baseline and chance as lines."""
    fig = Figure(figsize=(12, 3.6))
    colours = dict(zip(runs, ["tab:green", "tab:gray", "tab:blue", "tab:orange"]))  # one colour a run, all panels
    shorter = next((r["evaluation"].get("shorter_accuracy") for r in runs.values() if r.get("evaluation")), None)
    panels = [("held-out reward accuracy", "evaluation", "reward_accuracy"),
              ("log-prob accuracy", "evaluation", "logp_accuracy"), ("judged win rate vs base", "judged", "win_rate")]
    for ax, (title, part, key) in zip(fig.subplots(1, 3), panels):
        labels = [label for label, r in runs.items() if (r.get(part) or {}).get(key) is not None]
        values = [runs[label][part][key] for label in labels]
        ci = [runs[label][part].get(f"{key}_ci") or [v, v] for label, v in zip(labels, values)]
        errors = [[v - lo for v, (lo, _) in zip(values, ci)], [hi - v for v, (_, hi) in zip(values, ci)]]
        ax.bar(labels, values, yerr=errors, capsize=6, color=[colours[label] for label in labels])
        ax.tick_params(axis="x", labelsize=8)
        ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
        if part == "evaluation" and shorter is not None:
            ax.axhline(shorter, color="tab:red", lw=1, ls="--", label="pick the shorter")
        ax.set(title=title, ylim=(0, 1.05))
        ax.legend(fontsize=8)
    fig.suptitle("DPO against its controls (95% Wilson intervals)")
    fig.tight_layout()
    return fig
