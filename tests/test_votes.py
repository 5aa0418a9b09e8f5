"""Blind A/B votes: the row a vote becomes, appends that survive a cut write, the human win rate."""

import json
import multiprocessing

import pytest

import votes  # app/votes.py (conftest puts app/ on the path)
from dpo_pipeline.data import load_preferences

PROMPT = [{"role": "user", "content": "Tell me about owls."}]
ANSWERS = {"A": "Owls hunt at night.", "B": "I like turtles."}


def row(choice, adapter_side="A"):
    return votes.vote_row(PROMPT, ANSWERS, adapter_side, choice, adapter="me/a", base="gpt2",
                          settings={"temperature": 0.7})


def test_a_vote_becomes_a_preference_row_with_the_hidden_sides_resolved():
    won = row("A", adapter_side="A")
    assert (won["chosen"][0]["content"], won["rejected"][0]["content"], won["vote"]) == (
        ANSWERS["A"], ANSWERS["B"], "adapter")
    lost = row("A", adapter_side="B")  # A was the base
    assert lost["vote"] == "base" and lost["chosen"][0]["content"] == ANSWERS["A"]
    assert row("tie")["vote"] == "tie" and row("B")["chosen"][0]["content"] == ANSWERS["B"]
    with pytest.raises(ValueError):
        row("C")


def _append(path, n):
    for _ in range(n):
        votes.append_vote(path, row("A"))


@pytest.mark.slow  # starts processes
def test_appends_from_several_processes_stay_whole_and_a_cut_tail_loses_no_earlier_vote(tmp_path):
    path = tmp_path / "votes.jsonl"
    workers = [multiprocessing.get_context("fork").Process(target=_append, args=(path, 20)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 60 and all(json.loads(line)["vote"] == "adapter" for line in lines)

    path.write_text(path.read_text() + '{"prompt": [{"role": "us')  # a write cut off mid-line
    assert len(votes.read_votes(path)) == 60
    assert len(load_preferences(str(path), test_fraction=0.0).train) == 1  # 60 identical votes: one pair, deduplicated
    votes.append_vote(path, row("tie"))
    assert [v["vote"] for v in votes.read_votes(path)][-2:] == ["adapter", "tie"] and len(votes.read_votes(path)) == 61


def test_a_vote_whose_answer_holds_a_unicode_line_separator_reads_back_whole(tmp_path):
    path = tmp_path / "votes.jsonl"
    for i in range(2):  # json.dumps(ensure_ascii=False) writes U+2028 as it is: not a line break of JSON lines
        votes.append_vote(path, votes.vote_row(PROMPT, {"A": f"one\u2028two {i}", "B": "three"}, "A", "A",
                                               adapter="me/a", base="gpt2", settings={}))
    assert [v["chosen"][0]["content"] for v in votes.read_votes(path)] == ["one\u2028two 0", "one\u2028two 1"]
    assert load_preferences(str(path), test_fraction=0.5).report.kept == 2


def test_tally_counts_a_tie_half_and_only_the_adapter_asked_for():
    rows = [row("A"), row("B"), row("tie"), row("A"), {**row("A"), "adapter": "other/x"}]
    count = votes.tally(rows, adapter="me/a")
    assert (count["n"], count["wins"], count["ties"], count["losses"]) == (4, 2, 1, 1)
    assert count["win_rate"] == 0.625 and count["win_rate_ci"][0] < 0.625 < count["win_rate_ci"][1]
    assert votes.tally([])["n"] == 0


@pytest.mark.slow
def test_the_next_round_trains_on_the_votes_file(tiny_gpt2, tmp_path):
    from dpo_pipeline.args import parse
    from dpo_pipeline.pipeline import run

    path = tmp_path / "votes.jsonl"
    for i in range(20):
        answers = {"A": f"Owls number {i} hunt at night.", "B": f"I like turtle {i}."}
        votes.append_vote(path, votes.vote_row([{"role": "user", "content": f"Tell me about owl {i}."}], answers,
                                               "AB"[i % 2], "A" if i % 3 else "tie", adapter="me/a", base="gpt2",
                                               settings={}))
    record = run(parse({"model_name_or_path": tiny_gpt2, "dataset_name": str(path), "max_steps": 2,
                        "per_device_train_batch_size": 2, "max_length": 48, "judge": "none", "log_completions": 0,
                        "output_dir": str(tmp_path / "round-2")}))
    report = json.loads((tmp_path / "round-2" / "cleaning_report.json").read_text())
    assert record.status == "finished" and report["dropped"]["tie_vote"] == 7 and report["kept"] == 13
