"""Data stage: preference pairs from a local file or a Hub id, in three schemas (hh-rlhf transcripts ``hh_raw``,
message lists ``messages``, ``plain`` strings), as TRL's conversational rows; pairs that cannot teach DPO anything are
dropped and counted, the rest split into train/test. Tokens are TRL's business (prepare.py).
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq  # keeps nested message lists as Python lists (pandas gives arrays)
from huggingface_hub import constants

from .chat_template import ASSISTANT, HUMAN
from .errors import first_line
from .hf import hub_reachable, is_hub_id

DROP_REASONS = ("history_mismatch", "empty_completion", "identical_pair", "duplicate_pair",
                "prompt_too_long", "identical_after_truncation", "tie_vote")
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
ROLES = ("system", "user", "assistant")
# Local stand-ins for the Hub datasets, named in the "Hub unreachable" message.
LOCAL_FALLBACKS = {"hh-rlhf": "hh-rlhf/harmless-base.jsonl.gz",
                   "ultrafeedback": "ultrafeedback-style/dpo-en-demo.jsonl"}


class DataError(ValueError):
    """A problem with the user's data; the message is one line: "<file>: row <n>, field '<f>': <what is wrong>"."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))  # a newline from a library message must not leak in


@dataclass
class CleaningReport:
    source: str
    schema: str
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    splits: dict[str, int] = field(default_factory=dict)  # pairs per split, after max_pairs
    max_pairs: int | None = None

    @property
    def kept(self) -> int:
        return self.rows_read - sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}

    def __str__(self) -> str:
        counts = [("rows read", self.rows_read), *((f"- {r}", n) for r, n in self.dropped.items()), ("kept", self.kept)]
        counts += [("max_pairs", self.max_pairs)] if self.max_pairs is not None else []
        counts += [(f"split {name}", n) for name, n in self.splits.items()]
        return "\n".join([f"{self.source} (schema {self.schema})"] + [f"  {label:<28}{n:>7}" for label, n in counts])


@dataclass
class PreferenceData:
    train: datasets.Dataset
    test: datasets.Dataset
    report: CleaningReport
    prompt_format: str = "text"  # "text": the Human/Assistant template; "chat": the model's own (chat_template.py)
    validation: datasets.Dataset | None = None  # a slice of train for evaluating during training (picking settings)

    @property
    def monitor(self) -> datasets.Dataset:
        """What training evaluates on: the validation slice when there is one, so the test split stays unseen."""
        return self.validation if self.validation is not None else self.test


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Prompt = up to and including the LAST "\\n\\nAssistant:"; completion = the rest, leading space kept. Not TRL's
    extract_prompt, which cuts where chosen and rejected first differ: inside answers that share their first words."""
    head, cue, answer = text.rpartition(ASSISTANT)
    if not cue:
        raise ValueError("no '\\n\\nAssistant:' turn in the transcript")
    return head + cue, answer


def parse_transcript(prompt: str) -> list[dict]:
    """The messages of a Human/Assistant prompt (HUMAN_ASSISTANT renders them back to the same text; the one space
    after each marker is dropped); text before the first turn is a system message, the final assistant cue dropped."""
    parts = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", prompt)
    messages = [{"role": "system", "content": parts[0]}] if parts[0] else []
    messages += [{"role": "user" if marker == HUMAN else "assistant", "content": text.removeprefix(" ")}
                 for marker, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # the cue the model answers after
    return messages


def load_rows(path) -> list[dict]:
    """Rows of a local .jsonl, .jsonl.gz, .json (array or JSON lines) or .parquet file; any problem is a DataError."""
    path, name = Path(path), str(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found" if not path.exists() else f"{name}: not a file")
    if not name.lower().endswith(FILE_TYPES):
        raise DataError(f"{name}: unsupported file type; use one of {', '.join(FILE_TYPES)}")
    try:
        if name.lower().endswith(".parquet"):
            rows = pq.read_table(path).to_pylist()
        else:
            with (gzip.open if name.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
                rows = _parse_json(f.read(), name)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{name}: cannot read the file ({type(e).__name__}: {e})") from None
    except pa.ArrowException as e:  # a file that is not parquet
        raise DataError(f"{name}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if not rows:
        raise DataError(f"{name}: no rows (the file is empty)")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {n}: expected a JSON object, got {_kind(row)}")
    return rows


def _parse_json(text: str, name: str) -> list:
    if name.lower().endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    rows, lines = [], text.split("\n")  # not splitlines(): a JSON string may hold U+2028 and the like
    for i, line in enumerate(lines):  # JSON lines; blank lines are skipped and not counted as rows
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # no newline after it: an append cut mid-line (a killed app)
                    print(f"{name}: its last line was cut off mid-write; reading the {len(rows)} rows before it",
                          flush=True)
                    break
                raise DataError(f"{name}: row {len(rows) + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_hub(repo_id: str, data_dir: str | None) -> dict[str, tuple[str, list[dict]]]:
    """{"train"/"test" or "all": (label for messages, rows)} for a Hub dataset, without minutes of retries offline."""
    label = repo_id + (f"/{data_dir}" if data_dir else "")
    online = hub_reachable()
    try:
        with _offline(not online):
            names = datasets.get_dataset_split_names(repo_id, data_dir=data_dir)
            own = [{"train": tr, "test": te} for tr, te in (("train_prefs", "test_prefs"), ("train", "test"))
                   if tr in names and te in names]
            # one split only (e.g. argilla's cleaned UltraFeedback): we split it ourselves
            picked = own[0] if own else {"all": "train" if "train" in names else names[0]}
            return {key: (f"{label}[{split}]", datasets.load_dataset(repo_id, data_dir=data_dir, split=split).to_list())
                    for key, split in picked.items()}
    except Exception as e:
        why = first_line(e)
        if online:
            raise DataError(f"{label}: cannot load the Hub dataset ({why})") from None
        local = next((v for k, v in LOCAL_FALLBACKS.items() if k in repo_id.lower()), LOCAL_FALLBACKS["hh-rlhf"])
        raise DataError(f"{label}: the Hugging Face Hub is unreachable and this dataset cannot be read from the local "
                        f"cache ({why}); use a local file instead, e.g. "
                        f"dataset_name='../shared/data/{local}'") from None


@contextlib.contextmanager
def _offline(enabled: bool):
    """Make datasets read its cache only, failing at once when it is not there instead of retrying for minutes (the
    env vars are read at import time, so set the module flags)."""
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if enabled:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _field(row: dict, name: str, where: str):
    if name not in row:
        near = difflib.get_close_matches(name, [str(k) for k in row], n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise DataError(f"{where}, field '{name}': missing column (found: {', '.join(map(str, row))}){hint}")
    return row[name]


def _text(row: dict, name: str, where: str) -> str:
    value = _field(row, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}, field '{name}': expected a string, got {_kind(value)}")
    return value


def detect_schema(row: dict, where: str) -> str:
    """ "hh_raw" | "messages" | "plain" from one row's columns; `where` is "<file>: row <n>"."""
    if not any(k in row for k in ("chosen", "rejected", "prompt")) and not any(
            difflib.get_close_matches(k, ("chosen", "rejected"), cutoff=0.6) for k in map(str, row)):
        raise DataError(f"{where}: unknown schema: found columns [{', '.join(map(str, row))}]; expected "
                        "chosen+rejected transcripts, prompt+chosen+rejected strings, or chosen/rejected message lists")
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "messages"
    return "plain" if "prompt" in row else "hh_raw"


def _messages(row: dict, name: str, where: str) -> list[dict]:
    value = _field(row, name, where)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, field '{name}': expected a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        at = f"{where}, field '{name}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            found = f"keys {', '.join(map(str, m))}" if isinstance(m, dict) else _kind(m)
            raise DataError(f"{at}': expected a {{role, content}} message, found {found}")
        if m["role"] not in ROLES:
            raise DataError(f"{at}.role': unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{at}.content': expected a string, got {_kind(m['content'])}")
        out.append({"role": m["role"], "content": m["content"]})  # the text as it is: nothing stripped
    return out


def _prompt_column(row: dict, where: str) -> list[dict]:
    """The prompt column as messages: a message list as it is, Human/Assistant text parsed, other text one message."""
    if isinstance(row.get("prompt"), list):
        return _messages(row, "prompt", where)
    prompt = _text(row, "prompt", where)
    return parse_transcript(prompt) if HUMAN in prompt else [{"role": "user", "content": prompt}]


def _side(row: dict, name: str, schema: str, where: str) -> tuple[list[dict], str]:
    """(prompt messages, answer) for the `name` ("chosen" or "rejected") side of one row."""
    if schema == "hh_raw":
        try:
            prompt, answer = split_hh_transcript(_text(row, name, where))
        except ValueError as e:
            raise DataError(f"{where}, field '{name}': {e}") from None
        return parse_transcript(prompt), answer.removeprefix(" ")
    if schema == "messages":
        msgs = _messages(row, name, where)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}, field '{name}': the last message has role '{msgs[-1]['role']}', expected "
                            "'assistant'")
        # Only the answer: the conversation is in the prompt column (TRL's conversational style, or plain text).
        return (msgs[:-1] if len(msgs) > 1 else _prompt_column(row, where)), msgs[-1]["content"]
    raw_prompt, text = _text(row, "prompt", where), _text(row, name, where)
    if raw_prompt.strip() and text.startswith(raw_prompt):  # TRL's "implicit prompt" style repeats the prompt
        text = text[len(raw_prompt):]
    return _prompt_column(row, where), text.removeprefix(" ")


def _clean(rows: list[dict], label: str, report: CleaningReport) -> list[dict]:
    """Conversational pairs that can teach DPO something; each dropped pair counted once, under its first reason."""
    kept, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{label}: row {n}"
        if not report.schema:
            report.schema = detect_schema(row, where)
        prompt, chosen = _side(row, "chosen", report.schema, where)
        rejected_prompt, rejected = _side(row, "rejected", report.schema, where)
        report.rows_read += 1
        key = (json.dumps(prompt), chosen, rejected)
        failed = {"tie_vote": row.get("vote") == "tie",  # a blind A/B vote of "neither is better" (app/votes.py)
                  "history_mismatch": prompt != rejected_prompt,
                  "empty_completion": not chosen.strip() or not rejected.strip(),
                  "identical_pair": chosen == rejected, "duplicate_pair": key in seen}  # checked in this order
        reason = next((reason for reason, fails in failed.items() if fails), None)
        if reason:
            report.dropped[reason] += 1
        else:
            seen.add(key)
            kept.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
    return kept


MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
FEATURES = datasets.Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES})  # typed even when empty


def _dataset(pairs: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({c: [p[c] for p in pairs] for c in FEATURES}, features=FEATURES)


def load_preferences(source: str, *, data_dir: str | None = None, split_seed: int = 42, test_fraction: float = 0.2,
                     max_pairs: int | None = None) -> PreferenceData:
    """Cleaned train/test pairs from a local file (.jsonl, .jsonl.gz, .json, .parquet) or a Hub dataset id."""
    source = str(source)
    if Path(source).exists():
        parts = {"all": (source, load_rows(source))}
    elif is_hub_id(source) and not source.lower().endswith(FILE_TYPES):
        parts = _read_hub(source, data_dir)
    else:
        raise DataError(f"{source}: file not found (and not a Hub dataset id like 'Anthropic/hh-rlhf')")
    return _clean_and_split(source, parts, split_seed, test_fraction, max_pairs)


def preferences_from_rows(rows: list[dict], source: str, *, split_seed: int = 42, test_fraction: float = 0.2,
                          max_pairs: int | None = None) -> PreferenceData:
    """The same conversion, cleaning and split for rows already in memory (e.g. the synthetic set)."""
    return _clean_and_split(source, {"all": (source, rows)}, split_seed, test_fraction, max_pairs)


def _clean_and_split(source: str, parts: dict, split_seed: int, test_fraction: float,
                     max_pairs: int | None) -> PreferenceData:
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    report = CleaningReport(source=source, schema="", max_pairs=max_pairs)
    pairs = {key: _clean(rows, label, report) for key, (label, rows) in parts.items()}
    if "all" in pairs:  # one split: take max_pairs first, then a seeded split, the same on every run
        kept = pairs["all"][:max_pairs]
        random.Random(split_seed).shuffle(kept)
        n_test = round(len(kept) * test_fraction)
        if test_fraction > 0 and len(kept) >= 2:
            n_test = min(max(n_test, 1), len(kept) - 1)  # never an empty test set nor an empty train set
        train, test = kept[n_test:], kept[:n_test]
    else:  # the source's own split, in a seeded order; max_pairs is shared out by test_fraction
        # The Hub's hh-rlhf is its subsets one after another: in the file's order the first test pairs
        # (max_eval_pairs) would all be harmless-base and a validation slice off the end all one helpful subset.
        train, test = pairs["train"], pairs["test"]
        random.Random(split_seed).shuffle(train)
        random.Random(split_seed + 1).shuffle(test)
        if max_pairs is not None:
            n_test = round(max_pairs * test_fraction)
            train, test = train[:max_pairs - n_test], test[:n_test]
    report.splits = {"train": len(train), "test": len(test)}
    return PreferenceData(_dataset(train), _dataset(test), report)

