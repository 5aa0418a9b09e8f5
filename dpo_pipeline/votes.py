"""Blind A/B votes: a person compares the base model's and the adapter's answers to one prompt, shown in a random,
hidden order, and picks A, B or a tie. Each vote is one line of a preference file in the schema the loader reads
(prompt messages, chosen and rejected assistant messages, plus the vote, the model ids and the generation settings),
so the next round can train on it: `dataset_name: results/votes.jsonl` (iterative DPO). A tie is kept in the file
and dropped by the loader's cleaning as "tie_vote".
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .stats import win_rate

CHOICES = ("A", "B", "tie")


def votes_file(results: str | Path | None = None) -> Path:
    """$DPO_VOTES_FILE, else <results>/votes.jsonl."""
    from .args import results_dir

    return Path(os.environ.get("DPO_VOTES_FILE") or Path(results or results_dir()) / "votes.jsonl")


def vote_row(prompt: list[dict], answers: dict[str, str], adapter_side: str, choice: str, *, adapter: str,
             base: str, settings: dict) -> dict:
    """The preference row of one vote: `answers` by side ("A", "B"), `adapter_side` the side the adapter answered."""
    if choice not in CHOICES or adapter_side not in ("A", "B"):
        raise ValueError(f"choice must be one of {CHOICES} and adapter_side A or B")
    base_side = "B" if adapter_side == "A" else "A"
    winner, loser = (choice, base_side if choice == adapter_side else adapter_side) if choice != "tie" else \
        (adapter_side, base_side)
    winner_model = "tie" if choice == "tie" else "adapter" if choice == adapter_side else "base"
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[winner]}],
            "rejected": [{"role": "assistant", "content": answers[loser]}], "vote": winner_model,
            "adapter": adapter, "base": base, "settings": settings, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def append_vote(path: str | Path, row: dict) -> None:
    """Append one vote as one line, whole or not at all for readers: under an exclusive lock, a tail cut off by an
    earlier killed write is dropped first, then the line goes out in one write() and is fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # other sessions of the app append to the same file
        try:
            f.seek(0)
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)
            os.write(f.fileno(), line)  # O_APPEND: at the end, in one call
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_votes(path: str | Path) -> list[dict]:
    """Every complete vote in the file; a last line cut mid-write is left out, the votes before it kept."""
    path = Path(path)
    if not path.exists():
        return []
    votes = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            votes.append(json.loads(line))
    return votes


def tally(votes: list[dict], adapter: str | None = None) -> dict:
    """The adapter's human win rate over the votes (of `adapter` only, when given): a tie counts half, with the 95%
    Wilson interval on wins + ties / 2, as judge.py counts judged answers."""
    mine = [v for v in votes if adapter is None or v.get("adapter") == adapter]
    return win_rate(sum(v["vote"] == "adapter" for v in mine), sum(v["vote"] == "tie" for v in mine), len(mine))
