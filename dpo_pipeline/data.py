"""Data stage: read preference pairs (local file or Hub id), turn them into prompt/chosen/rejected text in the one
Human/Assistant format, drop pairs that cannot teach DPO anything, and split them into train/test.

Three row schemas are understood: raw hh-rlhf transcripts (``hh_raw``), UltraFeedback-style message lists
(``messages``) and ready-made strings (``plain``). A user mistake in a file is a ``DataError`` with a one-line
message that names the file, the 1-based row and the field; bad pairs in otherwise good data are dropped and counted.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import glob
import gzip
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
from trl.data_utils import common_prefix_length  # where TRL says a completion starts

from .hf import hub_reachable

PROMPT_FORMAT = "\n\nHuman: {user}\n\nAssistant:"
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
DROP_REASONS = ("history_mismatch", "empty_completion", "identical_pair", "duplicate_pair",
                "prompt_too_long", "identical_after_truncation")
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
ROLES = ("system", "user", "assistant")
# Local stand-ins for the Hub datasets, named in the "Hub unreachable" message.
LOCAL_FALLBACKS = {"hh-rlhf": "hh-rlhf/harmless-base.jsonl.gz",
                   "ultrafeedback": "ultrafeedback-style/dpo-en-demo.jsonl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        lines = [f"{self.source} (schema {self.schema})", f"  {'rows read':<28}{self.rows_read:>7}"]
        lines += [f"  - {reason:<26}{n:>7}" for reason, n in self.dropped.items()]
        lines.append(f"  {'kept':<28}{self.kept:>7}")
        if self.max_pairs is not None:
            lines.append(f"  {'max_pairs':<28}{self.max_pairs:>7}")
        lines += [f"  {'split ' + name:<28}{n:>7}" for name, n in self.splits.items()]
        return "\n".join(lines)


@dataclass
class PreferenceData:
    train: datasets.Dataset
    test: datasets.Dataset
    report: CleaningReport
    prompt_format: str = "text"  # "text": Human/Assistant text; "chat": rendered with the model's chat template
    validation: datasets.Dataset | None = None  # a slice of train for evaluating during training (picking settings)

    @property
    def monitor(self) -> datasets.Dataset:
        """What training evaluates on: the validation slice when there is one, so the test split stays unseen."""
        return self.validation if self.validation is not None else self.test


# ---------------------------------------------------------------- text format


def _render(messages: list[tuple[str, str]]) -> str:
    """(role, content) history -> Human/Assistant text ending with the cue the model answers after."""
    text = ""
    for i, (role, content) in enumerate(messages):
        content = content.strip()
        if role == "system" and i == 0:
            text += content  # system text goes before the first Human turn
        else:  # a user (or stray mid-conversation system) message is a Human turn; consecutive ones stay separate
            text += (ASSISTANT if role == "assistant" else HUMAN) + (" " + content if content else "")
    return text + ASSISTANT


def format_prompt(turns: list[tuple[str, str]], user: str, system: str | None = None) -> str:
    """Earlier (user, assistant) turns, then the new user message, in PROMPT_FORMAT; optional system text first."""
    history = [("system", system)] if system else []
    history += [m for u, a in turns for m in (("user", u), ("assistant", a))]
    return _render(history + [("user", user)])


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Prompt = up to and including the LAST "\\n\\nAssistant:"; completion = the rest, leading space kept."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the transcript")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """The (role, content) turns of a Human/Assistant prompt; text before the first turn is a system message."""
    parts = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", prompt)
    messages = [("system", parts[0].strip())] if parts[0].strip() else []
    messages += [("user" if marker == HUMAN else "assistant", text.strip())
                 for marker, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1] == ("assistant", ""):
        messages.pop()  # the cue the model answers after
    return messages


def chat_prompt(tokenizer, messages: list[tuple[str, str]]) -> str:
    """The model's own chat template for these turns, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=True)


def resolve_prompt_format(prompt_format: str, tokenizer) -> str:
    """"auto": the model's chat template when it has one (an instruction-tuned model), else GPT-2's text format."""
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "text"
    if prompt_format not in ("text", "chat"):
        raise ValueError(f"prompt_format must be 'auto', 'text' or 'chat', got {prompt_format!r}")
    return prompt_format


def to_chat_template(data: PreferenceData, tokenizer) -> PreferenceData:
    """Every pair rendered with the model's chat template: the prompt up to the assistant cue, each completion as the
    rest of what the template writes for that answer (ending with its end-of-turn token)."""

    def render(pair: dict) -> dict:
        messages = parse_prompt(pair["prompt"])
        prompt = chat_prompt(tokenizer, messages)
        out = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            turns = messages + [("assistant", pair[side].strip())]
            full = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
            if not full.startswith(prompt):
                raise ValueError("the chat template renders a prompt differently once an answer follows it")
            out[side] = full[len(prompt):].rstrip()  # ends with the end-of-turn token, so TRL adds no second eos
        return out

    splits = [ds.map(render, desc=f"Chat template ({name})") for name, ds in (("train", data.train),
                                                                               ("test", data.test))]
    return PreferenceData(*splits, data.report, "chat")


# ---------------------------------------------------------------- reading rows


def load_rows(path) -> list[dict]:
    """Rows of a local .jsonl, .jsonl.gz, .json (array or JSON lines) or .parquet file; any problem is a DataError."""
    path, name = Path(path), str(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found" if not path.exists() else f"{name}: not a file")
    if not name.lower().endswith(FILE_TYPES):
        raise DataError(f"{name}: unsupported file type; use one of {', '.join(FILE_TYPES)}")
    try:
        if name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq  # pyarrow keeps nested message lists as Python lists (pandas gives arrays)

            rows = pq.read_table(path).to_pylist()
        else:
            with (gzip.open if name.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                rows = _parse_json(f.read(), name)
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{name}: cannot read the file ({type(e).__name__}: {e})") from None
    except Exception as e:  # pyarrow's errors for a file that is not parquet
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
    rows = []
    for line in text.splitlines():  # JSON lines; blank lines are skipped and not counted as rows
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{name}: row {len(rows) + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_hub(repo_id: str, data_dir: str | None) -> dict[str, tuple[str, list[dict]]]:
    """{"train"/"test" or "all": (label for messages, rows)} for a Hub dataset, without minutes of retries offline."""
    label = repo_id + (f"/{data_dir}" if data_dir else "")
    online = hub_reachable()
    if not online and not _in_hf_cache(repo_id):
        local = next((v for k, v in LOCAL_FALLBACKS.items() if k in repo_id.lower()), LOCAL_FALLBACKS["hh-rlhf"])
        raise DataError(f"{label}: the Hugging Face Hub is unreachable and this dataset is not in the local cache; "
                        f"use a local file instead, e.g. source='../shared/data/{local}'")
    try:
        with _offline(not online):
            names = datasets.get_dataset_split_names(repo_id, data_dir=data_dir)
            own = [{"train": tr, "test": te} for tr, te in (("train_prefs", "test_prefs"), ("train", "test"))
                   if tr in names and te in names]
            # one split only (e.g. argilla's cleaned UltraFeedback): we split it ourselves
            picked = own[0] if own else {"all": "train" if "train" in names else names[0]}
            return {key: (f"{label}[{split}]",

                          datasets.load_dataset(repo_id, data_dir=data_dir, split=split).to_list())
                    for key, split in picked.items()}
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{label}: cannot load the Hub dataset ({type(e).__name__}: {first})") from None


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    owner, name = repo_id.split("/")
    prepared = Path(datasets.config.HF_DATASETS_CACHE) / f"{owner}___{datasets.naming.camelcase_to_snakecase(name)}"
    raw = Path(constants.HF_HUB_CACHE) / f"datasets--{owner}--{name}"
    return bool(glob.glob(str(prepared / "*" / "*" / "*"))) or raw.is_dir()


@contextlib.contextmanager
def _offline(enabled: bool):
    """Make datasets read its cache only (the env vars are read at import time, so set the module flags)."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if enabled:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


# ---------------------------------------------------------------- schemas


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


def _messages(row: dict, name: str, where: str) -> list[tuple[str, str]]:
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
        out.append((m["role"], m["content"]))
    return out


def _plain_prompt(prompt: str) -> str:
    """A prompt string in PROMPT_FORMAT: Human/Assistant text is kept (with the final cue), bare text is wrapped."""
    if HUMAN not in prompt:
        return PROMPT_FORMAT.format(user=prompt.strip())
    prompt = prompt.rstrip()
    return prompt if prompt.endswith(ASSISTANT) else prompt + ASSISTANT


def _side(row: dict, name: str, schema: str, where: str) -> tuple[str, str]:
    """(prompt, completion) for the `name` ("chosen" or "rejected") side of one row, in PROMPT_FORMAT."""
    if schema == "hh_raw":
        text = _text(row, name, where)
        try:
            return split_hh_transcript(text)
        except ValueError as e:
            raise DataError(f"{where}, field '{name}': {e}") from None
    if schema == "messages":
        msgs = _messages(row, name, where)
        if msgs[-1][0] != "assistant":
            raise DataError(f"{where}, field '{name}': the last message has role '{msgs[-1][0]}', expected 'assistant'")
        answer = " " + msgs[-1][1].strip()
        if len(msgs) > 1:
            return _render(msgs[:-1]), answer
        # Only the answer: the conversation is in the prompt column (TRL's conversational style, or plain text).
        if isinstance(row.get("prompt"), list):
            return _render(_messages(row, "prompt", where)), answer
        return _plain_prompt(_text(row, "prompt", where)), answer
    raw_prompt = _text(row, "prompt", where)
    prompt, text = _plain_prompt(raw_prompt), _text(row, name, where)
    for prefix in (raw_prompt, prompt):  # TRL's "implicit prompt" style repeats the prompt in each completion
        if prefix.strip() and text.startswith(prefix):
            text = text[len(prefix):]
            break
    return prompt, text if text[:1].isspace() else " " + text


# ---------------------------------------------------------------- cleaning and splitting


def _clean(rows: list[dict], label: str, report: CleaningReport) -> list[dict]:
    """Converted pairs that can teach DPO something; each dropped pair counted once, under its first reason."""
    kept, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{label}: row {n}"
        if not report.schema:
            report.schema = detect_schema(row, where)
        (prompt, chosen), (rejected_prompt, rejected) = (_side(row, side, report.schema, where)
                                                          for side in ("chosen", "rejected"))
        report.rows_read += 1
        if prompt != rejected_prompt:
            reason = "history_mismatch"
        elif not chosen.strip() or not rejected.strip():
            reason = "empty_completion"
        elif chosen == rejected:
            reason = "identical_pair"
        elif (prompt, chosen, rejected) in seen:
            reason = "duplicate_pair"
        else:
            seen.add((prompt, chosen, rejected))
            kept.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        report.dropped[reason] += 1
    return kept


def _dataset(pairs: list[dict]) -> datasets.Dataset:
    columns = {c: [p[c] for p in pairs] for c in ("prompt", "chosen", "rejected")}
    features = datasets.Features({c: datasets.Value("string") for c in columns})  # typed even when empty
    return datasets.Dataset.from_dict(columns, features=features)


def load_preferences(source: str, *, data_dir: str | None = None, split_seed: int = 42, test_fraction: float = 0.2,
                     max_pairs: int | None = None) -> PreferenceData:
    """Cleaned train/test pairs from a local file (.jsonl, .jsonl.gz, .json, .parquet) or a Hub dataset id."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    source = str(source)
    if Path(source).exists():
        parts = {"all": (source, load_rows(source))}
    elif HUB_ID.match(source) and not source.lower().endswith(FILE_TYPES):
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
    report = CleaningReport(source=source, schema="", max_pairs=max_pairs)
    pairs = {key: _clean(rows, label, report) for key, (label, rows) in parts.items()}
    if "all" in pairs:  # one split: take max_pairs first, then a seeded split, the same on every run
        kept = pairs["all"][:max_pairs]
        order = list(range(len(kept)))
        random.Random(split_seed).shuffle(order)
        n_test = round(len(kept) * test_fraction)
        if test_fraction > 0 and len(kept) >= 2:
            n_test = min(max(n_test, 1), len(kept) - 1)  # never an empty test set nor an empty train set
        train, test = [kept[i] for i in order[n_test:]], [kept[i] for i in order[:n_test]]
    else:  # the source's own split, in a seeded order; max_pairs is shared out by test_fraction
        # The Hub's hh-rlhf is its subsets one after another (harmless-base first): in the file's order the first
        # 2,000 test pairs (max_eval_pairs) would all be harmless-base and a validation slice off the end all one
        # helpful subset.
        train, test = pairs["train"], pairs["test"]
        random.Random(split_seed).shuffle(train)
        random.Random(split_seed + 1).shuffle(test)
        if max_pairs is not None:
            n_test = round(max_pairs * test_fraction)
            train, test = train[:max_pairs - n_test], test[:n_test]
    report.splits = {"train": len(train), "test": len(test)}
    return PreferenceData(_dataset(train), _dataset(test), report)


def get_hh_rlhf(data_dir: str | None = None) -> PreferenceData:
    """Anthropic/hh-rlhf from the Hub (its own train/test); data_dir picks a subset such as "harmless-base"."""
    return load_preferences("Anthropic/hh-rlhf", data_dir=data_dir)


def get_ultrafeedback(name: str = "HuggingFaceH4/ultrafeedback_binarized") -> PreferenceData:
    """UltraFeedback pairs: H4's train_prefs/test_prefs, or a seeded split of a train-only variant (argilla's)."""
    return load_preferences(name)


# ---------------------------------------------------------------- token-level cleaning


def truncation_verdicts(ds: datasets.Dataset, tokenizer, max_length: int) -> list[str | None]:
    """Per pair: "prompt_too_long", "identical_after_truncation" or None, exactly as TRL 1.16's DPOTrainer sees it.

    TRL appends eos to each completion, tokenizes prompt, prompt+chosen and prompt+rejected, drops the pair when the
    prompt alone fills max_length, and keeps the first max_length tokens; equal truncated sequences give no gradient.
    Pairs are tokenized a chunk at a time, so memory stays flat at any size.
    """
    verdicts = []
    if not _splits_like_gpt2(tokenizer):
        for cols in ds.iter(batch_size=_CHUNK):  # plain lists of strings, _CHUNK pairs at a time
            verdicts += _verdicts_whole(cols, tokenizer, max_length)
        return verdicts
    # The package turns the tokenizer's own threads off (TOKENIZERS_PARALLELISM=false, safe across forks); its
    # batch call releases the GIL, so a few threads of ours use every core and end with this call.
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:

        def encode(texts: list[str]) -> list:  # backend.encode_batch_fast(texts), shared out between the threads
            step = max(1, -(-len(texts) // threads))
            parts = pool.map(tokenizer.backend_tokenizer.encode_batch_fast,
                             [texts[i:i + step] for i in range(0, len(texts), step)])
            return [e for part in parts for e in part]

        for cols in ds.iter(batch_size=_CHUNK):
            verdicts += _verdicts_split(cols, tokenizer.eos_token, max_length, encode)
    return verdicts


_CHUNK = 8192  # pairs per batched tokenizer call
# Python's whitespace includes all of the regex engine's \s; the cut point must be a space both agree on.
_CUT = re.compile(r"\S[\t\n\x0b\x0c\r ]")


def _completions(cols: dict, side: str, eos: str, prefixes: list[str]) -> list[str]:
    return [p + t + ("" if t.endswith(eos) else eos) for p, t in zip(prefixes, cols[side])]


def _verdict(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int) -> str | None:
    """TRL's prompt ends where its tokens and either prompt+completion first differ (a token can merge across)."""
    if min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected)) >= max_length:
        return "prompt_too_long"
    return "identical_after_truncation" if chosen[:max_length] == rejected[:max_length] else None


def _verdicts_whole(cols: dict, tokenizer, max_length: int) -> list[str | None]:
    """Any tokenizer: tokenize prompt, prompt+chosen+eos and prompt+rejected+eos whole, as TRL does."""
    eos = tokenizer.eos_token
    full = {side: tokenizer(_completions(cols, side, eos, cols["prompt"]))["input_ids"]
            for side in ("chosen", "rejected")}
    return [_verdict(p, c, r, max_length)
            for p, c, r in zip(tokenizer(cols["prompt"])["input_ids"], full["chosen"], full["rejected"])]


def _head_split(prompt: str) -> int:
    r"""Where to cut a prompt so that its head and the rest tokenize apart exactly as together (GPT-2-style
    tokenizers): the start of its last whitespace run that follows a non-space character; 0 when there is none.

    GPT-2's pre-tokenizer regex never looks behind and no piece it makes holds a non-space character followed by
    whitespace, so tokens(head + rest) == tokens(head) + tokens(rest). An hh-rlhf prompt's rest is "\n\nAssistant:":
    the long history is tokenized once, not three times.
    """
    last = None
    for last in _CUT.finditer(prompt, max(0, prompt.rfind("\n\n") - 1)):  # the usual cut is in the last "\n\n"
        pass
    if last is None:  # none there: search the whole prompt
        for last in _CUT.finditer(prompt):
            pass
    return last.start() + 1 if last is not None else 0


def _verdicts_split(cols: dict, eos: str, max_length: int, encode) -> list[str | None]:
    """The same verdicts as _verdicts_whole, for less tokenizing, with the cut of _head_split used twice:

    - each prompt's head is tokenized once, for its length h only (it starts all three sequences); the verdict is
      taken on the tails (the rest of the prompt, and the rest + each completion + eos) against max_length - h;
    - each completion tail is first tokenized only up to the end of the word where chosen and rejected first differ.
      Once the two token lists differ at an index both reach, that decides the verdict; the few pairs where one list
      is a prefix of the other are tokenized whole.
    """
    prompts = cols["prompt"]
    cuts = [_head_split(p) for p in prompts]
    heads = [len(e) for e in encode([p[:k] for p, k in zip(prompts, cuts)])]
    rests = [p[k:] for p, k in zip(prompts, cuts)]
    tails = {side: _completions(cols, side, eos, rests) for side in ("chosen", "rejected")}
    short = {side: [] for side in tails}
    for chosen, rejected in zip(tails["chosen"], tails["rejected"]):
        d = len(os.path.commonprefix((chosen, rejected)))  # where the two first differ
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            cut = _CUT.search(text, d)  # the first safe cut after the first difference
            short[side].append(text[:cut.start() + 1] if cut else text)
    rest_ids = [e.ids for e in encode(rests)]
    ids = {side: [e.ids for e in encode(texts)] for side, texts in short.items()}
    verdicts, whole = [], []
    for n, (h, p, c, r) in enumerate(zip(heads, rest_ids, ids["chosen"], ids["rejected"])):
        if h >= max_length:
            verdicts.append("prompt_too_long")
            continue
        if common_prefix_length(c, r) == min(len(c), len(r)) and any(
                len(short[side][n]) < len(tails[side][n]) for side in tails):
            whole.append(n)  # undecided on the short tokens: decided below on the whole tails
        verdicts.append(_verdict(p, c, r, max_length - h))
    if whole:
        full = {side: [e.ids for e in encode([tails[side][n] for n in whole])] for side in tails}
        for n, c, r in zip(whole, full["chosen"], full["rejected"]):
            verdicts[n] = _verdict(rest_ids[n], c, r, max_length - heads[n])
    return verdicts


def _splits_like_gpt2(tokenizer) -> bool:
    """A byte-level BPE that splits on GPT-2's regex and adds nothing (GPT-2's own tokenizer and its kin): the
    tokenizers for which _head_split's cut is exact. Anything else takes the whole-sequence path."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or tokenizer.eos_token is None:
        return False
    try:
        spec = json.loads(backend.to_str())
        plain = tokenizer.num_special_tokens_to_add(pair=False) == 0
    except Exception:
        return False
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    added = spec.get("added_tokens") or []
    return (plain and spec.get("normalizer") is None and spec.get("truncation") is None
            and spec.get("padding") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space") and model.get("type") == "BPE" and not model.get("dropout")
            and all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
                    and not any(ch.isspace() for ch in t["content"]) for t in added))


def drop_truncation_ties(data: PreferenceData, tokenizer, max_length: int) -> PreferenceData:
    """Drop, in both splits, pairs TRL would drop or learn nothing from at max_length (None: TRL does not truncate).
    Returns new data with a copy of the report, so calling it twice never double-counts."""

    if max_length is None:
        return data
    report = copy.deepcopy(data.report)
    splits = {}
    for name in ("train", "test"):
        ds = getattr(data, name)
        verdicts = truncation_verdicts(ds, tokenizer, max_length)
        for v in filter(None, verdicts):
            report.dropped[v] += 1
        splits[name] = ds.select([i for i, v in enumerate(verdicts) if v is None])
    report.splits = {name: len(ds) for name, ds in splits.items()}
    return PreferenceData(splits["train"], splits["test"], report, data.prompt_format, data.validation)
