"""Data stage tests: real shared data (exact cleaning counts), hand-made bad files, every file format, offline Hub."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from dpo_pipeline.data import (
    PROMPT_FORMAT, CleaningReport, DataError, PreferenceData, detect_schema, drop_truncation_ties, format_prompt,
    get_hh_rlhf, get_ultrafeedback, load_preferences, load_rows, split_hh_transcript,
)
from dpo_pipeline.args import shared_data_dir
from dpo_pipeline import data
from dpo_pipeline.model import gpt2_tokenizer

HERE = Path(__file__).parent / "data"
HH = shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"
UF = shared_data_dir() / "ultrafeedback-style" / "dpo-en-demo.jsonl"
A = "\n\nAssistant:"
REASONS = ["history_mismatch", "empty_completion", "identical_pair", "duplicate_pair", "prompt_too_long",
           "identical_after_truncation"]


def pairs(data: PreferenceData) -> list[dict]:
    return data.train.to_list() + data.test.to_list()


@pytest.fixture(scope="module")
def hh() -> PreferenceData:
    return load_preferences(str(HH))


@pytest.fixture(scope="module")
def uf() -> PreferenceData:
    return load_preferences(str(UF))


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


# ---------------------------------------------------------------- formatting helpers


def test_format_prompt():
    assert format_prompt([], "Hi") == PROMPT_FORMAT.format(user="Hi")
    text = format_prompt([("Hi", "Hello."), ("Age?", "Old.")], "Why?", system="Be brief.")
    assert text == ("Be brief.\n\nHuman: Hi\n\nAssistant: Hello."
                    "\n\nHuman: Age?\n\nAssistant: Old.\n\nHuman: Why?\n\nAssistant:")


def test_split_hh_transcript_keeps_leading_space_and_splits_at_last_turn():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d e"
    assert split_hh_transcript(text) == ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " d e")
    with pytest.raises(ValueError):
        split_hh_transcript("\n\nHuman: no answer here")


def test_detect_schema():
    assert detect_schema({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "z"}, "f: row 1") == "hh_raw"
    assert detect_schema({"prompt": "x", "chosen": "y", "rejected": "z"}, "f: row 1") == "plain"
    assert detect_schema({"prompt": "x", "chosen": [], "rejected": []}, "f: row 1") == "messages"
    with pytest.raises(DataError, match="unknown schema.*a, b"):
        detect_schema({"a": 1, "b": 2}, "f: row 1")


# ---------------------------------------------------------------- real hh-rlhf file


def test_hh_cleaning_counts(hh):
    r = hh.report
    assert (r.rows_read, r.schema) == (1812, "hh_raw")
    assert list(r.dropped) == REASONS
    assert r.dropped == dict(zip(REASONS, [5, 4, 0, 0, 0, 0]))
    assert r.kept == 1803
    assert r.splits == {"train": 1442, "test": 361}
    assert (len(hh.train), len(hh.test)) == (1442, 361)
    assert hh.train.column_names == ["prompt", "chosen", "rejected"]
    d = r.as_dict()
    assert json.loads(json.dumps(d))["kept"] == 1803
    assert all(reason in str(r) for reason in REASONS) and "1803" in str(r)


def test_hh_text_shape(hh):
    for p in pairs(hh):
        assert p["prompt"].startswith("\n\nHuman:") and p["prompt"].endswith(A)
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        assert p["chosen"].strip() and p["chosen"] != p["rejected"]


def test_hh_multi_turn_prompt_is_everything_up_to_last_assistant_turn(hh):
    raw = load_rows(HH)
    by_completion = {(p["chosen"], p["rejected"]): p["prompt"] for p in pairs(hh)}
    checked = 0
    for row in raw:
        pieces = row["chosen"].split(A)
        if len(pieces) < 4:  # want at least three assistant turns
            continue
        completion = pieces[-1]
        expected_prompt = A.join(pieces[:-1]) + A
        rejected = row["rejected"][len(expected_prompt):]
        if not row["rejected"].startswith(expected_prompt) or (completion, rejected) not in by_completion:
            continue  # a dropped pair
        prompt = by_completion[(completion, rejected)]
        assert prompt == expected_prompt
        assert prompt.count(A) == len(pieces) - 1 and prompt + completion == row["chosen"]
        checked += 1
        if checked == 20:
            break
    assert checked == 20


def test_hh_split_is_seeded(hh):
    again = load_preferences(str(HH))
    assert again.test["chosen"][:] == hh.test["chosen"][:]
    other = load_preferences(str(HH), split_seed=7)
    assert sorted(other.test["chosen"][:]) != sorted(hh.test["chosen"][:])
    assert len(other.test) == 361
    small = load_preferences(str(HH), max_pairs=100, test_fraction=0.1)
    assert (len(small.train), len(small.test), small.report.kept) == (90, 10, 1803)


def test_a_sources_own_split_is_kept_in_a_seeded_order_so_any_slice_mixes_its_subsets():
    # Two "subsets" one after another in each split, as the Hub's hh-rlhf files are (harmless-base first)
    rows = load_rows(str(HH))
    half = len(rows) // 2
    subset = {json.dumps(r, sort_keys=True): "a" if i < half else "b" for i, r in enumerate(rows)}
    train = rows[:half - 100] + rows[half:-100]
    test = rows[half - 100:half] + rows[-100:]

    def split(seed, max_pairs=None):
        parts = {"train": ("hh[train]", [dict(r) for r in train]), "test": ("hh[test]", [dict(r) for r in test])}
        return data._clean_and_split("hh", parts, seed, 0.1, max_pairs)

    def rows_of(ds):  # back to the raw rows' subset labels: cleaning keeps the text, so match on the transcripts
        by_chosen = {r["chosen"]: subset[json.dumps(r, sort_keys=True)] for r in rows}
        return [by_chosen[p + c] for p, c in zip(ds["prompt"], ds["chosen"])]

    first = split(42)
    assert first.report.splits == {"train": len(first.train), "test": len(first.test)} and len(first.test) > 150
    # the source's split is kept: every test pair is one of the source's test rows, every train pair a train row
    for ds, raw in ((first.test, test), (first.train, train)):
        assert {p + c for p, c in zip(ds["prompt"], ds["chosen"])} <= {r["chosen"] for r in raw}
    for ds in (first.test.select(range(40)), first.train.select(range(len(first.train) - 40, len(first.train)))):
        labels = rows_of(ds)  # the first 40 test pairs (max_eval_pairs), the last 40 train pairs (validation)
        assert 8 <= labels.count("a") <= 32, labels
    assert split(42).test["chosen"] == first.test["chosen"]  # seeded: every run evaluates the same pairs
    assert split(7).test["chosen"] != first.test["chosen"]
    assert sorted(split(7).test["chosen"]) == sorted(first.test["chosen"])
    small = split(42, max_pairs=100)
    assert (len(small.train), len(small.test)) == (90, 10) and set(rows_of(small.test)) == {"a", "b"}


# ---------------------------------------------------------------- real ultrafeedback-style file


def test_ultrafeedback_cleaning_counts(uf):
    r = uf.report
    assert (r.rows_read, r.schema) == (300, "messages")
    assert r.dropped == dict(zip(REASONS, [0, 0, 0, 5, 0, 0]))  # five rows appear twice in the file
    assert r.kept == 295 and r.splits == {"train": 236, "test": 59}


def test_ultrafeedback_rendering(uf):
    raw = load_rows(UF)
    by_completion = {}
    for p in pairs(uf):
        by_completion[(p["chosen"], p["rejected"])] = p["prompt"]
    systems = multi = 0
    for row in raw:
        answers = (" " + row["chosen"][-1]["content"].strip(), " " + row["rejected"][-1]["content"].strip())
        prompt = by_completion[answers]
        assert prompt.endswith(A)
        history = row["chosen"][:-1]
        if history[0]["role"] == "system":
            systems += 1
            human = prompt.index("\n\nHuman:")
            assert human > 0 and prompt[:human] == history[0]["content"].strip()
        else:
            assert prompt.startswith("\n\nHuman:")
        earlier_answers = [m["content"].strip() for m in history if m["role"] == "assistant"]
        multi += bool(earlier_answers)
        for answer in earlier_answers:
            assert f"{A} {answer}" in prompt
        assert prompt.count(A) == len(earlier_answers) + 1
        assert prompt.endswith(f"\n\nHuman: {row['prompt'].strip()}{A}")  # `prompt` is the last user message
    assert (systems, multi) == (80, 106)
    assert sum(not p["prompt"].startswith("\n\nHuman:") for p in pairs(uf)) == 80


# ---------------------------------------------------------------- token-level cleaning (real GPT-2 tokenizer)


def brute_force_verdict(tokenizer, p: dict, max_length: int) -> str | None:
    """One pair at a time, written out independently of data.py: TRL 1.16's view of it."""
    eos = tokenizer.eos_token
    prompt = tokenizer.encode(p["prompt"])
    chosen = tokenizer.encode(p["prompt"] + p["chosen"] + eos)
    rejected = tokenizer.encode(p["prompt"] + p["rejected"] + eos)
    prompt_len = 0
    while (prompt_len < len(prompt) and prompt[prompt_len] == chosen[prompt_len] == rejected[prompt_len]):
        prompt_len += 1
    if prompt_len >= max_length:
        return "prompt_too_long"
    return "identical_after_truncation" if chosen[:max_length] == rejected[:max_length] else None


@pytest.mark.parametrize("max_length, too_long, ties", [(64, 1162, 3), (256, 223, 0), (512, 24, 0)])
def test_hh_truncation_counts(hh, tokenizer, max_length, too_long, ties):
    out = drop_truncation_ties(hh, tokenizer, max_length)
    assert out.report.dropped == dict(zip(REASONS, [5, 4, 0, 0, too_long, ties]))
    assert out.report.kept == 1803 - too_long - ties == len(out.train) + len(out.test)
    assert out.report.splits == {"train": len(out.train), "test": len(out.test)}
    assert hh.report.dropped["prompt_too_long"] == 0  # the input report is left alone
    if max_length == 64:
        kept = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(out)}
        everything = pairs(hh)
        sample = everything[::97]
        assert len(sample) >= 15
        for p in sample:
            verdict = brute_force_verdict(tokenizer, p, 64)
            assert ((p["prompt"], p["chosen"], p["rejected"]) in kept) == (verdict is None)


def test_hh_truncation_ties_match_brute_force(hh, tokenizer):
    """The three ties at 64 tokens: prompts of 62-63 tokens whose answers start with the same token."""
    out = drop_truncation_ties(hh, tokenizer, 64)
    kept = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(out)}
    near_limit = [p for p in pairs(hh) if 60 <= len(tokenizer.encode(p["prompt"])) < 64]
    verdicts = [brute_force_verdict(tokenizer, p, 64) for p in near_limit]
    assert verdicts.count("identical_after_truncation") == 3
    for p, verdict in zip(near_limit, verdicts):
        assert ((p["prompt"], p["chosen"], p["rejected"]) in kept) == (verdict is None)


def test_ultrafeedback_truncation_counts(uf, tokenizer):
    out = drop_truncation_ties(uf, tokenizer, 1024)
    assert (out.report.dropped["prompt_too_long"], out.report.dropped["identical_after_truncation"]) == (39, 1)
    assert out.report.kept == 255


# ---------------------------------------------------------------- hand-made bad files


@pytest.mark.parametrize("name, row, field", [
    ("missing_column.jsonl", 2, "'rejected'"),
    ("misspelled_column.jsonl", 1, "'chosen'"),
    ("non_string.jsonl", 3, "'chosen'"),
    ("null_value.jsonl", 2, "'chosen'"),
    ("no_assistant.jsonl", 2, "'rejected'"),
    ("last_not_assistant.jsonl", 2, "'chosen'"),
    ("message_without_content.jsonl", 2, "'chosen[1]'"),
    ("invalid_json.jsonl", 2, "not valid JSON"),
    ("unknown_schema.jsonl", 1, "question, answer"),
])
def test_bad_file_names_file_row_and_field(name, row, field):
    with pytest.raises(DataError) as err:
        load_preferences(str(HERE / name))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert name in message and f"row {row}" in message and field in message, message


def test_bad_file_hints():
    with pytest.raises(DataError, match="did you mean 'chosen_response'"):
        load_preferences(str(HERE / "misspelled_column.jsonl"))
    with pytest.raises(DataError, match="expected 'assistant'"):
        load_preferences(str(HERE / "last_not_assistant.jsonl"))


def test_whole_file_problems(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_preferences(str(HERE / "empty.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        load_preferences(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        load_preferences("not a dataset at all")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read"):
        load_rows(tmp_path / "broken.jsonl.gz")
    (tmp_path / "broken.parquet").write_text("this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet"):
        load_rows(tmp_path / "broken.parquet")
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(tmp_path / "data.csv")
    (tmp_path / "scalars.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="row 1: expected a JSON object"):
        load_rows(tmp_path / "scalars.json")


def test_data_error_is_one_line():
    assert str(DataError("a\nb")) == "a b"


# ---------------------------------------------------------------- good files in every format


def test_plain_schema_file():
    data = load_preferences(str(HERE / "plain_good.jsonl"), test_fraction=0.25)
    r = data.report
    assert (r.schema, r.rows_read, r.kept) == ("plain", 7, 4)
    assert r.dropped == dict(zip(REASONS, [0, 1, 1, 1, 0, 0]))
    assert (len(data.train), len(data.test)) == (3, 1)
    got = {p["chosen"]: p for p in pairs(data)}
    assert got[" They weigh the same."]["prompt"] == PROMPT_FORMAT.format(
        user="Which is heavier, a kilo of iron or a kilo of feathers?")
    assert got[" Green."]["rejected"] == " Purple."  # the repeated ("implicit") prompt is stripped
    assert got[" Octopuses have three hearts."]["prompt"] == format_prompt([("Hi there.", "Hello! How can I help?")],
                                                                           "Tell me a fun fact.")


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


GOOD_MESSAGES = [
    {"prompt": "Name a river.", "chosen": [_u("Name a river."), _a("The Nile.")],
     "rejected": [_u("Name a river."), _a("The moon.")]},
    {"prompt": "And a long one?", "chosen": [{"role": "system", "content": "You are terse."}, _u("Name a river."),
                                             _a("The Nile."), _u("And a long one?"), _a("The Amazon.")],
     "rejected": [{"role": "system", "content": "You are terse."}, _u("Name a river."), _a("The Nile."),
                  _u("And a long one?"), _a("A puddle.")]},
    {"prompt": "Name a lake.", "chosen": [_u("Name a lake."), _a("Lake Baikal.")],
     "rejected": [_u("Name a sea."), _a("The Red Sea.")]},  # histories differ
    {"prompt": [_u("Name a mountain.")], "chosen": [_a("Everest.")], "rejected": [_a("A hill.")]},  # TRL style
    {"prompt": "Name a desert.", "chosen": [_a("The Gobi.")], "rejected": [_a("A glacier.")]},
]


def _check_good_messages(data: PreferenceData):
    r = data.report
    assert (r.schema, r.rows_read, r.kept) == ("messages", 5, 4)
    assert r.dropped["history_mismatch"] == 1
    got = {p["chosen"]: p["prompt"] for p in pairs(data)}
    assert got[" The Nile."] == PROMPT_FORMAT.format(user="Name a river.")
    assert got[" The Amazon."] == format_prompt([("Name a river.", "The Nile.")], "And a long one?",
                                                system="You are terse.")
    assert got[" Everest."] == PROMPT_FORMAT.format(user="Name a mountain.")
    assert got[" The Gobi."] == PROMPT_FORMAT.format(user="Name a desert.")


def test_good_json_array(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD_MESSAGES, indent=1))
    _check_good_messages(load_preferences(str(path)))


def test_good_jsonl_gz(tmp_path):
    path = tmp_path / "good.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in GOOD_MESSAGES))
    _check_good_messages(load_preferences(str(path)))


def test_good_parquet(tmp_path):
    path = tmp_path / "good.parquet"
    rows = [dict(row, prompt=row["prompt"] if isinstance(row["prompt"], str) else "Name a mountain.")
            for row in GOOD_MESSAGES]  # a parquet column has one type
    pd.DataFrame(rows).to_parquet(path)
    _check_good_messages(load_preferences(str(path)))


# ---------------------------------------------------------------- Hub ids without a network


@pytest.mark.parametrize("load", [lambda: get_hh_rlhf("harmless-base"), lambda: get_ultrafeedback(),
                                  lambda: load_preferences("argilla/ultrafeedback-binarized-preferences-cleaned")])
def test_unreachable_hub_is_a_quick_one_line_error(monkeypatch, load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load()
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and "/" in message.split(":")[0] and "source='../shared/data/" in message


def test_report_defaults():
    r = CleaningReport(source="x", schema="plain", rows_read=3)
    assert list(r.dropped) == REASONS and r.kept == 3


# ---------------------------------------------------------------- chat-template prompts (instruction-tuned models)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = gpt2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template, tok.eos_token = CHATML, "<|im_end|>"
    return tok


def test_parse_prompt_inverts_format_prompt():
    text = data.format_prompt([("Hi", "Hello there")], "Name a color.", system="Be brief.")
    assert data.parse_prompt(text) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello there"),
                                       ("user", "Name a color.")]


def test_prompt_format_auto_follows_the_tokenizer(chat_tokenizer):
    assert data.resolve_prompt_format("auto", gpt2_tokenizer()) == "text"
    assert data.resolve_prompt_format("auto", chat_tokenizer) == "chat"
    with pytest.raises(ValueError, match="prompt_format"):
        data.resolve_prompt_format("markdown", chat_tokenizer)


def test_to_chat_template_renders_pairs_with_the_models_template(hh, chat_tokenizer):
    small = data.PreferenceData(hh.train.select(range(20)), hh.test.select(range(5)), hh.report)
    chat = data.to_chat_template(small, chat_tokenizer)
    assert chat.prompt_format == "chat" and len(chat.train) == 20 and len(chat.test) == 5
    for before, after in zip(small.train, chat.train):
        messages = [{"role": r, "content": c} for r, c in data.parse_prompt(before["prompt"])]
        assert after["prompt"] == chat_tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
        assert after["prompt"].endswith("<|im_start|>assistant\n")
        for side in ("chosen", "rejected"):
            assert after[side] == before[side].strip() + "<|im_end|>"  # ends with eos: TRL adds no second one
    # The truncation check works on the rendered text and keeps the format.
    assert data.drop_truncation_ties(chat, chat_tokenizer, 512).prompt_format == "chat"


# ---------------------------------------------------------------- token-level checks at scale: the fast path


def whole_tokens(tokenizer, p: dict) -> tuple[list[int], list[int], list[int]]:
    """The reference: prompt, prompt+chosen+eos and prompt+rejected+eos, each tokenized whole, one call per text
    (TRL adds no second eos to a completion that already ends with one)."""
    eos = tokenizer.eos_token
    chosen, rejected = (p[side] if p[side].endswith(eos) else p[side] + eos for side in ("chosen", "rejected"))
    return tuple(tokenizer.encode(text) for text in (p["prompt"], p["prompt"] + chosen, p["prompt"] + rejected))


def reference_verdict(tokens: tuple, max_length: int) -> str | None:
    prompt, chosen, rejected = tokens
    prompt_len = 0
    while prompt_len < len(prompt) and prompt[prompt_len] == chosen[prompt_len] == rejected[prompt_len]:
        prompt_len += 1
    if prompt_len >= max_length:
        return "prompt_too_long"
    return "identical_after_truncation" if chosen[:max_length] == rejected[:max_length] else None


def all_verdicts(d: PreferenceData, tokenizer, max_length: int) -> list:
    return data.truncation_verdicts(d.train, tokenizer, max_length) + data.truncation_verdicts(d.test, tokenizer,
                                                                                                 max_length)


@pytest.fixture(scope="module")
def hh_tokens(hh, tokenizer):
    return [whole_tokens(tokenizer, p) for p in pairs(hh)]


def test_fast_truncation_verdicts_match_the_reference_on_the_real_file(hh, hh_tokens, tokenizer, monkeypatch):
    """GPT-2 takes the split path (each prompt's head tokenized once, threads, chunks); every verdict on every real
    pair at every max_length is the whole-sequence reference's."""
    assert data._splits_like_gpt2(tokenizer)
    monkeypatch.setattr(data, "_CHUNK", 97)  # many chunks, uneven last one: order is kept across chunks and threads
    for max_length in (1, 16, 63, 64, 65, 100, 256, 512, 1024):
        expected = [reference_verdict(t, max_length) for t in hh_tokens]
        assert all_verdicts(hh, tokenizer, max_length) == expected, max_length
    assert [reference_verdict(t, 64) for t in hh_tokens].count("identical_after_truncation") == 3


def test_whole_sequence_path_matches_the_reference(hh, hh_tokens, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "_splits_like_gpt2", lambda tok: False)  # what a non-GPT-2 tokenizer takes
    for max_length in (64, 512):
        assert all_verdicts(hh, tokenizer, max_length) == [reference_verdict(t, max_length) for t in hh_tokens]


def test_fast_truncation_verdicts_on_awkward_text(tokenizer):
    """Random text from pieces that stress the cut: every kind of whitespace, contractions, digits, emoji, the eos
    text itself and the turn markers; the split path must agree with whole-sequence tokenization on all of it."""
    import random

    import datasets

    rng = random.Random(0)
    alphabet = list("ab Z1 '\n\t\r\x0b\x0c\x85\xa0\u2028\u3000\x1c:!.é") + [
        "'s", "'ll", "<|endoftext|>", A, "\n\nHuman:", "  ", "99", "\U0001F600"]

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    rows = [{"prompt": text(30), "chosen": text(6), "rejected": text(6)} for _ in range(1500)]
    ds = datasets.Dataset.from_list(rows)
    tokens = [whole_tokens(tokenizer, r) for r in rows]
    for max_length in (1, 4, 16, 40):
        verdicts = data.truncation_verdicts(ds, tokenizer, max_length)
        assert verdicts == [reference_verdict(t, max_length) for t in tokens], max_length
        assert len(set(verdicts)) == 3  # all three outcomes are exercised


def test_fast_truncation_verdicts_with_chat_template_tokens(hh, chat_tokenizer):
    """Added special tokens (<|im_start|>, <|im_end|> as eos) keep the split path exact."""
    assert data._splits_like_gpt2(chat_tokenizer)
    small = data.PreferenceData(hh.train.select(range(150)), hh.test.select(range(50)), hh.report)
    chat = data.to_chat_template(small, chat_tokenizer)
    tokens = [whole_tokens(chat_tokenizer, p) for p in pairs(chat)]
    for max_length in (32, 128, 512):
        assert all_verdicts(chat, chat_tokenizer, max_length) == [reference_verdict(t, max_length) for t in tokens]


def test_head_split_cuts_before_the_last_space_run(hh):
    p = pairs(hh)[0]["prompt"]
    assert p[data._head_split(p):] == A
    assert data._head_split("no-space-at-all") == 0 and data._head_split("   lead") == 0
    assert data._head_split("a b\u2028c") == 1  # \u2028 is not a safe cut, the ASCII space is
    assert data._head_split("x\n\n\ny \t") == 5  # the last run that follows a non-space character
