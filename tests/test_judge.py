"""judge.py: loading judges (one-line failures), scoring as a decoder or an encoder judge reads its input, and judged
generations base vs policy. Real tiny GPT-2 / BERT, real
TRL, transformers and peft; no mocks."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from dpo_pipeline.judge import JudgeError, judged_generations, load_judge, pairwise_accuracy, score
from dpo_pipeline.model import add_lora, load_base_model, load_tokenizer, lora_config
from dpo_pipeline.chat_template import as_text
from dpo_pipeline.synthetic import get_synthetic

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def random_judge(random_reward_model):
    return load_judge(random_reward_model)


def test_decoder_score_ignores_batching_and_keeps_the_answer_of_a_too_long_text(random_judge):
    prompts = ["\n\nHuman: Hi.\n\nAssistant:", "\n\nHuman: Tell me about rivers.\n\nAssistant:",
               "\n\nHuman: Hi.\n\nAssistant:"]
    answers = [" hello.", " rivers flow to the sea, mostly, and some of them are very long indeed.", " HELLO!!!"]
    batched = score(random_judge, prompts, answers, batch_size=3)
    one_by_one = [score(random_judge, [p], [a])[0] for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)  # padding does not move a score
    assert len({round(s, 4) for s in batched}) == 3

    limit = random_judge.model.config.n_positions  # 512 for the tiny GPT-2
    long_prompt = "\n\nHuman:" + " rivers" * (limit + 50) + "\n\nAssistant:"
    ids = random_judge.tokenizer(long_prompt + " hello." + random_judge.tokenizer.eos_token)["input_ids"][-limit:]
    with torch.no_grad():  # the judge sees the last `limit` tokens: the prompt loses its start, the answer is whole
        expected = random_judge.model(torch.tensor([ids], device=random_judge.model.device)).logits[0, 0].item()
    assert score(random_judge, [long_prompt], [" hello."])[0] == pytest.approx(expected, abs=1e-5)


def test_pairwise_accuracy_counts_the_judge_s_wins_and_ties_beside_the_length_baselines(random_judge, tiny_gpt2):
    tokenizer = load_tokenizer(tiny_gpt2)
    pairs = as_text(get_synthetic(n_pairs=60, seed=2).test, tokenizer)  # the held-out pairs as the model reads them
    pairs["chosen"][1] = pairs["rejected"][1]  # one pair the judge cannot split: a tie, counted as a miss
    result = pairwise_accuracy(random_judge, pairs)
    chosen, rejected = (score(random_judge, pairs["prompt"], pairs[side]) for side in ("chosen", "rejected"))
    wins = sum(c - r > 1e-5 for c, r in zip(chosen, rejected))
    n = len(pairs["prompt"])
    assert (result["pairs"], result["wins"], result["accuracy"]) == (n, wins, wins / n) and result["ties"] >= 1
    lo, hi = result["accuracy_ci"]
    assert 0 <= lo <= result["accuracy"] <= hi <= 1
    tokens = lambda text: len(random_judge.tokenizer(text, add_special_tokens=False)["input_ids"])
    shorter = sum(tokens(c) < tokens(r) for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert result["shorter_accuracy"] == shorter / n  # the baseline in the judge's own tokens


def test_encoder_judge_reads_the_prompt_answer_text_pair(tmp_path):
    """A BERT-style judge (as OpenAssistant's DeBERTa reward models) gets (prompt, answer) as a text pair."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "human", "assistant", ":", "hi", "hello", "there", "."]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert-rm")
    tokenizer.save_pretrained(tmp_path / "bert-rm")
    judge = load_judge(tmp_path / "bert-rm")
    prompts, answers = ["Human: hi. Assistant:", "Human: hello there. Assistant:"], [" hello there.", " hi."]
    with torch.no_grad():
        as_pairs = [judge.model(**judge.tokenizer(p, a, return_tensors="pt").to(judge.model.device)).logits.item()
                    for p, a in zip(prompts, answers)]
        as_one_text = [judge.model(**judge.tokenizer(p + a, return_tensors="pt").to(judge.model.device)).logits.item()
                       for p, a in zip(prompts, answers)]
    got = score(judge, prompts, answers)
    assert got == pytest.approx(as_pairs, abs=1e-5) and got != pytest.approx(as_one_text, abs=1e-5)


def test_load_judge_fails_in_one_line(tiny_gpt2, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        tiny_gpt2: "not a reward model",  # a causal LM: from_pretrained gives it a fresh two-output head
        str(tmp_path / "empty"): "Cannot load judge",  # a folder without a model
        "/no/such/folder/here": "neither a local folder nor a Hub model id",
        "dpo-pipeline-tests/no-such-reward-model": "not cached here",  # and the Hub is unreachable from the tests
    }
    for name, expected in cases.items():
        with pytest.raises(JudgeError) as raised:
            load_judge(name)
        message = str(raised.value)
        assert expected in message and "\n" not in message and isinstance(raised.value, ValueError)


def _counts(rows: list[dict]) -> dict:
    outcomes = [row["outcome"] for row in rows]
    return {"n": len(rows), "wins": outcomes.count("win"), "ties": outcomes.count("tie"),
            "losses": outcomes.count("loss")}


def test_judged_generations_tie_for_a_fresh_adapter_then_differ(tiny_gpt2, random_judge):
    tokenizer = load_tokenizer(tiny_gpt2)
    base = load_base_model(tiny_gpt2).float().to(DEVICE)
    policy = add_lora(base, lora_config(base, r=8))  # lora_B starts at zero: the policy is the base model
    prompts = list(get_synthetic(n_pairs=40, seed=1).test["prompt"])[:6]

    fresh = judged_generations(policy, tokenizer, prompts, random_judge, max_new_tokens=12, seed=0)
    assert all(row["base"] == row["policy"] and row["outcome"] == "tie" for row in fresh["rows"])
    summary = fresh["summary"]
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (0, len(prompts), 0, len(prompts))
    assert summary["win_rate"] == 0.5 and summary["win_rate_ci"][0] < 0.5 < summary["win_rate_ci"][1]
    assert summary["length_matched"]["n"] == len(prompts) and summary["length_matched"]["win_rate"] == 0.5

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    moved = judged_generations(policy, tokenizer, prompts, random_judge, max_new_tokens=12, seed=0)
    rows, summary = moved["rows"], moved["summary"]
    assert [row["base"] for row in rows] == [row["base"] for row in fresh["rows"]]  # the same seed, the same base
    assert summary["ties"] < len(prompts)
    counts = _counts(rows)
    assert {k: summary[k] for k in counts} == counts and counts["wins"] + counts["ties"] + counts["losses"] == 6
    assert summary["win_rate"] == pytest.approx((counts["wins"] + counts["ties"] / 2) / len(rows))
    assert summary["mean_score_policy"] == pytest.approx(sum(r["score_policy"] for r in rows) / len(rows))
    assert summary["mean_length_base"] == pytest.approx(sum(r["length_base"] for r in rows) / len(rows))
    matched = [r for r in rows if abs(r["length_policy"] - r["length_base"]) <= 0.2 * max(r["length_policy"],
                                                                                          r["length_base"])]
    assert {k: summary["length_matched"][k] for k in counts} == _counts(matched)
    for row in rows:  # a row's scores are the judge's scores of its answers, and its outcome follows them
        assert row["score_policy"] == pytest.approx(score(random_judge, [row["prompt"]], [row["policy"]])[0], abs=1e-5)
        difference = row["score_policy"] - row["score_base"]
        expected = "tie" if row["base"] == row["policy"] or abs(difference) <= 1e-5 else \
            "win" if difference > 0 else "loss"
        assert row["outcome"] == expected
        assert row["length_policy"] == len(tokenizer(row["policy"], add_special_tokens=False)["input_ids"])
