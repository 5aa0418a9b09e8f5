"""Blind A/B votes: a person compares the base model's and the adapter's answers to one prompt, in a hidden random
order, and picks A, B or a tie. Each vote is one line of a preference file the loader reads (plus the vote, the model
ids and the generation settings), so the next round can train on it (`dataset_name: results/votes.jsonl`, iterative
DPO); the loader's cleaning drops a tie as "tie_vote".
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from dpo_pipeline.stats import win_rate

CHOICES = ("A", "B", "tie")


def votes_file(results: str | Path | None = None) -> Path:
    """$DPO_VOTES_FILE, else <results>/votes.jsonl."""
    from dpo_pipeline.args import results_dir

    return Path(os.environ.get("DPO_VOTES_FILE") or Path(results or results_dir()) / "votes.jsonl")


def vote_row(prompt: list[dict], answers: dict[str, str], adapter_side: str, choice: str, *, adapter: str,
             base: str, settings: dict) -> dict:
    """The preference row of one vote: `answers` by side ("A", "B"), `adapter_side` the side the adapter answered."""
    if choice not in CHOICES or adapter_side not in ("A", "B"):
        raise ValueError(f"choice must be one of {CHOICES} and adapter_side A or B")
    winner = adapter_side if choice == "tie" else choice  # a tie is kept in the adapter-first order
    loser = "B" if winner == "A" else "A"
    vote = "tie" if choice == "tie" else "adapter" if choice == adapter_side else "base"
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[winner]}],
            "rejected": [{"role": "assistant", "content": answers[loser]}], "vote": vote,
            "adapter": adapter, "base": base, "settings": settings, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def append_vote(path: str | Path, row: dict) -> None:
    """Append one vote as one line, whole or not at all for readers: under an exclusive lock, a tail cut off by an
    earlier killed write is dropped first, then the line goes out in one write() and is fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    with open(path, "a+b") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)  # other sessions of the app append to the same file
        f.seek(0)
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)
        os.write(f.fileno(), line)  # O_APPEND: at the end, in one call
        os.fsync(f.fileno())


def read_votes(path: str | Path) -> list[dict]:
    """Every complete vote in the file; a last line cut mid-write is left out, the votes before it kept."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text(encoding="utf-8").split("\n")[:-1]  # the last piece: "" or a line cut mid-write
    return [json.loads(line) for line in lines if line.strip()]


def tally(votes: list[dict], adapter: str | None = None) -> dict:
    """The adapter's human win rate over the votes (of `adapter` only, when given): a tie counts half, with the 95%
    Wilson interval on wins + ties / 2, as judge.py counts judged answers."""
    mine = [v for v in votes if adapter is None or v.get("adapter") == adapter]
    return win_rate(sum(v["vote"] == "adapter" for v in mine), sum(v["vote"] == "tie" for v in mine), len(mine))
