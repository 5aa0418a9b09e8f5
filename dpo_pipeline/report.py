"""Report stage: what people would rather see than read (example tables, training curves)."""

from __future__ import annotations

import pandas as pd


def show_examples(dataset, n: int = 3, width: int = 300) -> pd.DataFrame:
    """The first `n` pairs as a table, each text cut to its last `width` characters of prompt / first of answers."""
    rows = dataset.select(range(min(n, len(dataset))))
    cut = lambda s, tail=False: (("…" + s[-width:]) if tail else (s[:width] + "…")) if len(s) > width else s
    return pd.DataFrame({
        "prompt (end)": [cut(r["prompt"], tail=True) for r in rows],
        "chosen": [cut(r["chosen"]) for r in rows],
        "rejected": [cut(r["rejected"]) for r in rows],
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
    return pd.DataFrame(rows)


def plot_history(log_history: list[dict], title: str = "DPO training"):
    """Loss, reward accuracy and reward margin against steps, train and eval."""
    import matplotlib.pyplot as plt

    frame = history_frame(log_history)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric in zip(axes, ["loss", "rewards/accuracies", "rewards/margins"]):
        for split, style in (("train", "-"), ("eval", "o--")):
            part = frame[frame["split"] == split] if not frame.empty else frame
            if metric in part:
                ax.plot(part["step"], part[metric], style, label=split)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
