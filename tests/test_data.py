"""Data stage tests: real shared data (exact cleaning counts), hand-made bad files, every file format, offline Hub."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from dpo_pipeline.data import (
    CleaningReport, DataError, PreferenceData, detect_schema, load_preferences, load_rows, split_hh_transcript,
)
from dpo_pipeline.args import shared_data_dir
from dpo_pipeline import data
from dpo_pipeline.chat_template import HUMAN_ASSISTANT, as_text, format_name, with_prompt_format
from offline_models.gpt2 import gpt2_tokenizer
from dpo_pipeline.prepare import clean_tokens, shuffle_labels, tokenization_args, tokenize_pairs

HERE = Path(__file__).parent / "data"
HH = shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"
UF = shared_data_dir() / "ultrafeedback-style" / "dpo-en-demo.jsonl"
A = "\n\nAssistant:"
REASONS = ["history_mismatch", "empty_completion", "identical_pair", "duplicate_pair", "prompt_too_long",
           "identical_after_truncation", "tie_vote"]


GPT2 = with_prompt_format(gpt2_tokenizer())  # the Human/Assistant chat template
EOS = GPT2.eos_token


def pairs(data: PreferenceData) -> list[dict]:
    """The pairs as GPT-2 reads them: the conversational rows rendered with the Human/Assistant template (the
    answer's eos left off), so a transcript's text can be compared with the source's."""
    out = []
    for split in (data.train, data.test):
        text = as_text(split, GPT2)
        out += [{"prompt": p, "chosen": c.removesuffix(EOS), "rejected": r.removesuffix(EOS)}
                for p, c, r in zip(text["prompt"], text["chosen"], text["rejected"])]
    return out


def args(max_length: int):
    return tokenization_args(max_length)


@pytest.fixture(scope="module")
def hh() -> PreferenceData:
    return load_preferences(str(HH))


@pytest.fixture(scope="module")
def uf() -> PreferenceData:
    return load_preferences(str(UF))


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2


# ---------------------------------------------------------------- the Human/Assistant template


def test_human_assistant_template_renders_the_hh_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Age?"},
                {"role": "assistant", "content": "Old."}, {"role": "user", "content": "Why?"}]
    assert GPT2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Age?\n\nAssistant: Old.\n\nHuman: Why?\n\nAssistant:")
    # the answer ends with eos (what TRL appends to a text completion); an empty turn is its marker alone
    assert GPT2.apply_chat_template(messages[1:2] + [{"role": "assistant", "content": ""}], tokenize=False) == \
        f"\n\nHuman: Hi\n\nAssistant:{EOS}"
    assert data.parse_transcript("Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Why?\n\nAssistant:") == \
        messages[:3] + messages[-1:]


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
    assert r.dropped == dict(zip(REASONS, [5, 4, 0, 0, 0, 0, 0]))
    assert r.kept == 1803
    assert r.splits == {"train": 1442, "test": 361}
    assert (len(hh.train), len(hh.test)) == (1442, 361)
    assert hh.train.column_names == ["prompt", "chosen", "rejected"]
    assert hh.train[0]["chosen"][0]["role"] == "assistant" and hh.train[0]["prompt"][-1]["role"] == "user"
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
        assert prompt.count(A) == len(pieces) - 1 and prompt + completion == row["chosen"]  # lossless
        checked += 1
        if checked == 20:
            break
    assert checked == 20


def test_hh_split_is_seeded(hh):
    again = load_preferences(str(HH))
    assert again.test["chosen"][:] == hh.test["chosen"][:]
    other = load_preferences(str(HH), split_seed=7)
    answers = lambda d: sorted(c[0]["content"] for c in d.test["chosen"])
    assert answers(other) != answers(hh)
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
        text = pairs(PreferenceData(ds, ds.select([]), None))
        return [by_chosen[p["prompt"] + p["chosen"]] for p in text]

    first = split(42)
    assert first.report.splits == {"train": len(first.train), "test": len(first.test)} and len(first.test) > 150
    # the source's split is kept: every test pair is one of the source's test rows, every train pair a train row
    for ds, raw in ((first.test, test), (first.train, train)):
        text = pairs(PreferenceData(ds, ds.select([]), None))
        assert {p["prompt"] + p["chosen"] for p in text} <= {r["chosen"] for r in raw}
    for ds in (first.test.select(range(40)), first.train.select(range(len(first.train) - 40, len(first.train)))):
        labels = rows_of(ds)  # the first 40 test pairs (max_eval_pairs), the last 40 train pairs (validation)
        assert 8 <= labels.count("a") <= 32, labels
    assert split(42).test["chosen"] == first.test["chosen"]  # seeded: every run evaluates the same pairs
    assert split(7).test["chosen"] != first.test["chosen"]
    assert sorted(map(json.dumps, split(7).test["chosen"])) == sorted(map(json.dumps, first.test["chosen"]))
    small = split(42, max_pairs=100)
    assert (len(small.train), len(small.test)) == (90, 10) and set(rows_of(small.test)) == {"a", "b"}


# ---------------------------------------------------------------- real ultrafeedback-style file


def test_ultrafeedback_cleaning_counts(uf):
    r = uf.report
    assert (r.rows_read, r.schema) == (300, "messages")
    assert r.dropped == dict(zip(REASONS, [0, 0, 0, 5, 0, 0, 0]))  # five rows appear twice in the file
    assert r.kept == 295 and r.splits == {"train": 236, "test": 59}


def test_ultrafeedback_messages_are_kept_exactly(uf):
    raw = load_rows(UF)
    rows = uf.train.to_list() + uf.test.to_list()
    by_answers = {(p["chosen"][0]["content"], p["rejected"][0]["content"]): p["prompt"] for p in rows}
    systems = multi = 0
    for row in raw:
        prompt = by_answers[(row["chosen"][-1]["content"], row["rejected"][-1]["content"])]  # not stripped
        assert prompt == row["chosen"][:-1]  # the conversation as it is: no text round trip, nothing stripped
        systems += prompt[0]["role"] == "system"
        multi += any(m["role"] == "assistant" for m in prompt)
    assert (systems, multi) == (80, 106)


def test_a_message_that_looks_like_a_transcript_stays_one_message(tmp_path):
    tricky = "Quote this:\n\nHuman: hi\n\nAssistant: hello  "  # markers inside a message, trailing spaces
    row = {"chosen": [_u(tricky), _a(" Sure. ")], "rejected": [_u(tricky), _a("No.")]}
    path = tmp_path / "tricky.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": [_u(tricky), _a("Never.")]}) + "\n")
    got = load_preferences(str(path), test_fraction=0.5)
    pair = (got.train.to_list() + got.test.to_list())[0]
    assert pair["prompt"] == [_u(tricky)] and pair["chosen"] == [_a(" Sure. ")]


# ---------------------------------------------------------------- token-level cleaning on TRL's token ids


def brute_force_verdict(tokenizer, p: dict, max_length: int) -> str | None:
    """One pair at a time, written out independently of TRL and prepare.py, from the rendered text."""
    prompt = tokenizer.encode(p["prompt"])
    chosen = tokenizer.encode(p["prompt"] + p["chosen"] + EOS)
    rejected = tokenizer.encode(p["prompt"] + p["rejected"] + EOS)
    prompt_len = 0
    while (prompt_len < len(prompt) and prompt[prompt_len] == chosen[prompt_len] == rejected[prompt_len]):
        prompt_len += 1
    if prompt_len >= max_length:
        return "prompt_too_long"
    return "identical_after_truncation" if chosen[:max_length] == rejected[:max_length] else None


@pytest.mark.slow  # tokenises the whole real sample three ways: kept out of the one-minute set
@pytest.mark.parametrize("max_length, too_long, ties", [
    (64, 1162, 3), (256, 223, 0), (512, 24, 0)])
def test_hh_truncation_counts(hh, tokenizer, max_length, too_long, ties):
    out = clean_tokens(hh, tokenizer, args(max_length))
    assert out.report.dropped == dict(zip(REASONS, [5, 4, 0, 0, too_long, ties, 0]))
    assert out.report.kept == 1803 - too_long - ties == len(out.train) + len(out.test)
    assert out.report.splits == {"train": len(out.train), "test": len(out.test)}
    assert hh.report.dropped["prompt_too_long"] == 0  # the input report is left alone
    assert out.train.column_names == ["prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"]
    if max_length == 64:
        kept = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs(out)}
        sample = pairs(hh)[::97]
        assert len(sample) >= 15
        for p in sample:
            verdict = brute_force_verdict(tokenizer, p, 64)
            assert ((p["prompt"], p["chosen"], p["rejected"]) in kept) == (verdict is None)
        # the three ties: prompts of 62-63 tokens whose answers start with the same token
        near_limit = [p for p in pairs(hh) if 60 <= len(tokenizer.encode(p["prompt"])) < 64]
        verdicts = [brute_force_verdict(tokenizer, p, 64) for p in near_limit]
        assert verdicts.count("identical_after_truncation") == 3
        for p, verdict in zip(near_limit, verdicts):
            assert ((p["prompt"], p["chosen"], p["rejected"]) in kept) == (verdict is None)


def test_a_split_left_empty_is_one_line_naming_what_cleaning_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "Hi?", "chosen": " same", "rejected": " same"}] * 5 + [
        {"prompt": "Hi?", "chosen": " yes", "rejected": " no"}]
    path = tmp_path / "mostly_identical.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_preferences(str(path), test_fraction=0.5)  # one pair left: it trains, none is held out
    with pytest.raises(DataError, match=r"no test pairs \(6 rows read, 1 kept; dropped: 5 identical_pair\)"):
        clean_tokens(loaded, tokenizer, args(64))
    with pytest.raises(DataError, match="none of the 1 train pairs fits max_length 2"):
        clean_tokens(loaded, tokenizer, args(2))


def test_ultrafeedback_truncation_counts(uf, tokenizer):
    out = clean_tokens(uf, tokenizer, args(1024))
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
    assert r.dropped == dict(zip(REASONS, [0, 1, 1, 1, 0, 0, 0]))
    assert (len(data.train), len(data.test)) == (3, 1)
    got = {p["chosen"]: p for p in pairs(data)}
    assert got[" They weigh the same."]["prompt"] == \
        "\n\nHuman: Which is heavier, a kilo of iron or a kilo of feathers?\n\nAssistant:"
    assert got[" Green."]["rejected"] == " Purple."  # the repeated ("implicit") prompt is stripped
    assert got[" Octopuses have three hearts."]["prompt"] == \
        "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a fun fact.\n\nAssistant:"


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
    assert got[" The Nile."] == "\n\nHuman: Name a river.\n\nAssistant:"
    assert got[" The Amazon."] == ("You are terse.\n\nHuman: Name a river.\n\nAssistant: The Nile.\n\nHuman: And a "
                                   "long one?\n\nAssistant:")
    assert got[" Everest."] == "\n\nHuman: Name a mountain.\n\nAssistant:"
    assert got[" The Gobi."] == "\n\nHuman: Name a desert.\n\nAssistant:"


def test_good_json_array(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD_MESSAGES, indent=1))
    _check_good_messages(load_preferences(str(path)))


def test_good_jsonl_gz(tmp_path):
    path = tmp_path / "good.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in GOOD_MESSAGES))
    _check_good_messages(load_preferences(str(path)))


def test_a_byte_order_mark_as_editors_on_windows_write_it_is_not_part_of_the_first_row(tmp_path):
    for name in ("bom.jsonl", "bom.json"):
        path = tmp_path / name
        rows = "".join(json.dumps(row) + "\n" for row in GOOD_MESSAGES) if name.endswith("l") else json.dumps(
            GOOD_MESSAGES)
        path.write_text(rows, encoding="utf-8-sig")  # starts with EF BB BF
        _check_good_messages(load_preferences(str(path)))


def test_good_parquet(tmp_path):
    path = tmp_path / "good.parquet"
    rows = [dict(row, prompt=row["prompt"] if isinstance(row["prompt"], str) else "Name a mountain.")
            for row in GOOD_MESSAGES]  # a parquet column has one type
    pd.DataFrame(rows).to_parquet(path)
    _check_good_messages(load_preferences(str(path)))


# ---------------------------------------------------------------- Hub ids without a network


@pytest.mark.parametrize("repo_id, data_dir", [("Anthropic/hh-rlhf", "harmless-base"),
                                               ("HuggingFaceH4/ultrafeedback_binarized", None),
                                               ("argilla/ultrafeedback-binarized-preferences-cleaned", None)])
def test_unreachable_hub_is_a_quick_one_line_error(monkeypatch, repo_id, data_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_preferences(repo_id, data_dir=data_dir)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and "/" in message.split(":")[0] and "dataset_name='../shared/data/" in message


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


def test_prompt_format_follows_the_tokenizer(chat_tokenizer):
    assert format_name(with_prompt_format(gpt2_tokenizer())) == "text"  # no template of its own: Human/Assistant
    assert format_name(with_prompt_format(chat_tokenizer)) == "chat"
    with pytest.raises(ValueError, match="prompt_format 'chat' needs a model with its own chat template"):
        with_prompt_format(gpt2_tokenizer(), "chat")
    forced = with_prompt_format(gpt2_tokenizer(), "text")
    assert forced.chat_template == HUMAN_ASSISTANT


def test_trl_tokenizes_conversational_pairs_with_the_models_template(hh, chat_tokenizer):
    small = hh.train.select(range(20))
    tokenized = tokenize_pairs(small, chat_tokenizer, args(512))
    end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for pair in tokenized:
        prompt = chat_tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        assert chat_tokenizer.decode(pair["prompt_ids"]) == prompt and prompt.endswith("<|im_start|>assistant\n")
        assert pair["chosen_ids"][-2] == end  # the answer closes its turn ("<|im_end|>\n"): no eos added on top
        assert chat_tokenizer.decode(pair["chosen_ids"]).startswith(pair["chosen"][0]["content"])


def test_shuffled_labels_swap_a_seeded_half_of_the_pairs_text_and_token_ids_together():
    import datasets

    pairs = datasets.Dataset.from_dict({
        "prompt": [f"p{i}" for i in range(200)], "chosen": [f"c{i}" for i in range(200)],
        "rejected": [f"r{i}" for i in range(200)], "chosen_ids": [[i, 1] for i in range(200)],
        "rejected_ids": [[i, 2] for i in range(200)]})
    shuffled, swapped = shuffle_labels(pairs, seed=7)
    flipped = [row["chosen"].startswith("r") for row in shuffled]
    assert sum(flipped) == swapped and 70 < swapped < 130  # about half, at random
    for i, (row, flip) in enumerate(zip(shuffled, flipped)):
        assert row["prompt"] == f"p{i}"
        assert (row["chosen"], row["chosen_ids"], row["rejected"], row["rejected_ids"]) == (
            (f"r{i}", [i, 2], f"c{i}", [i, 1]) if flip else (f"c{i}", [i, 1], f"r{i}", [i, 2]))
    assert shuffle_labels(pairs, seed=7)[0]["chosen"] == shuffled["chosen"]  # seeded
    assert shuffle_labels(pairs, seed=8)[0]["chosen"] != shuffled["chosen"]
