"""Behaviour measures: the refusal list, the lexical judge fitted on train pairs only, the paired tests, and the
report of base, policy and control answering the same prompts with the same seeds."""

import datasets
import numpy as np
import pytest

from dpo_pipeline import behaviour
from dpo_pipeline.card import build_model_card
from dpo_pipeline.chat import load_adapter
from dpo_pipeline.runs import keep_behaviour
from dpo_pipeline.synthetic import get_synthetic
from hub_double import make_tiny_adapter


def _pairs(rows):
    message = lambda role, text: [{"role": role, "content": text}]
    return datasets.Dataset.from_list([{"prompt": message("user", p), "chosen": message("assistant", c),
                                        "rejected": message("assistant", r)} for p, c, r in rows])


def test_refusal_list_and_its_agreement_with_the_labels():
    assert behaviour.refuses("I'm sorry, I can't help with that.") and behaviour.refuses("That is ILLEGAL.")
    assert not behaviour.refuses("Sure, here is a recipe for bread.")
    pairs = _pairs([("a", "I won't do that.", "Sure thing."), ("b", "Sure thing.", "I cannot."),
                    ("c", "I'm sorry.", "I apologise."), ("d", "Yes.", "No.")])
    agreement = behaviour.refusal_agreement(pairs)
    assert agreement["coverage"] == 0.5 and agreement["refusal_chosen"] == 0.5  # decides a and b; a yes, b no


def test_lexical_judge_learns_the_train_rule_and_is_checked_on_held_out_pairs():
    rng = np.random.default_rng(0)
    filler = ["the", "a", "cat", "dog", "house", "tree", "blue", "green", "runs", "sits"]
    words = lambda n: " ".join(rng.choice(filler, n))
    rows = [(f"q{i}", f"{words(4)} thanks kindly {words(3)}", f"{words(2)} whatever {words(2)}") for i in range(120)]
    judge = behaviour.LexicalJudge(_pairs(rows[:100]))  # chosen is polite and longer here
    held_out = judge.accuracy(_pairs(rows[100:]))
    assert held_out["accuracy"] == 1.0 and held_out["pairs"] == 20 and held_out["shorter_accuracy"] == 0.0
    assert judge.score(["thanks kindly"])[0] > judge.score(["whatever"])[0]


def test_paired_tests_count_discordant_prompts():
    first = {"refusal_rate": [True, True, True, False], "lexical_score": [1.0, 2.0, 3.0, 4.0], "tokens": [5, 6, 7, 8]}
    second = {"refusal_rate": [True, False, False, False], "lexical_score": [0.0, 1.0, 2.0, 3.5],
              "tokens": [5, 6, 7, 8]}
    result = behaviour.paired(first, second)
    refusal = result["refusal_rate"]
    assert (refusal["only_first"], refusal["only_second"], refusal["difference"]) == (2, 0, 0.5)
    assert refusal["p"] == pytest.approx(0.5)  # two discordant prompts, both one way: exact p = 2 x 0.5^2
    assert result["tokens"]["p"] == 1.0 and result["lexical_score"]["difference"] == pytest.approx(0.875)


@pytest.mark.slow  # answers and scores with three models: seconds each on a CPU
def test_report_answers_the_same_prompts_with_the_same_seeds_and_corrects_for_multiple_tests(tmp_path):
    policy = load_adapter(str(make_tiny_adapter(tmp_path / "policy", seed=0)))
    control = load_adapter(str(make_tiny_adapter(tmp_path / "control", seed=1)))
    data = get_synthetic(n_pairs=120)
    report = behaviour.behaviour_report(policy.model, control.model, policy.tokenizer, data, prompts=6,
                                        max_new_tokens=6)
    assert set(report["models"]) == {"base", "policy", "control"} and report["prompts"] == 6
    assert report["models"]["base"]["kl"] == 0.0 and np.isfinite(report["models"]["policy"]["kl"])
    assert len(report["answers"]) == 6 and set(report["answers"][0]) == {"prompt", "base", "policy", "control"}
    for result in report["tests"].values():
        for measure in behaviour.PRIMARY:
            assert 0 <= result[measure]["p"] <= result[measure]["p_holm"] <= 1
    assert 0 <= report["lexical_judge"]["accuracy"] <= 1 and report["lexical_judge"]["pairs"] == len(data.test)
    again = behaviour.behaviour_report(policy.model, None, policy.tokenizer, data, prompts=6, max_new_tokens=6)
    assert [a["base"] for a in again["answers"]] == [a["base"] for a in report["answers"]]  # the same seeds
    assert set(again["tests"]) == {"policy vs base"}
    assert "policy vs base" in behaviour.describe(report) and "lexical judge" in behaviour.describe(report)

    # kept in the run folder, the report becomes a section of the model card, without any prompt or answer
    keep_behaviour(tmp_path / "policy", report)
    card = build_model_card(tmp_path / "policy", "me/policy").content
    assert "## Behaviour against the base and a shuffled-label control" in card and "McNemar" in card
    assert "The DPO doctor on these answers: " + ("; ".join(report["findings"]) or "nothing found") in card
    assert not any(a["policy"].strip() and a["policy"] in card for a in report["answers"])
