"""The known-answer experiment's parts: topic split, pairs by the gold reward, the sample-based KL term, paired
comparisons and the verdict; and its notebook end to end on a tiny model (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from experiments import known_answer as ka
from dpo_pipeline import stats
from dpo_pipeline.chat_template import prompt_text, with_prompt_format
from dpo_pipeline.model import add_lora, load_base_model, load_tokenizer, lora_config

ROOT = Path(__file__).resolve().parents[1]


def test_topics_are_split_so_no_held_out_topic_is_trained_on():
    train, held_out = ka.topic_prompts(30, 10, seed=3)
    assert len(train) == 30 * len(ka.TEMPLATES) and len(held_out) == 10 * len(ka.TEMPLATES)
    topic = lambda prompt: next(t for t in ka.TOPICS if t in prompt)
    assert not {topic(p) for p in train} & {topic(p) for p in held_out}
    assert ka.topic_prompts(30, 10, seed=3) == (train, held_out) != ka.topic_prompts(30, 10, seed=4)
    with pytest.raises(ValueError):
        ka.topic_prompts(35, 10)


def test_pairs_take_best_and_worst_by_the_gold_reward_each_way_round_and_drop_small_gaps():
    answers = [["What a wonderful, lovely day!", "It was fine.", "A horrible, awful mess."],
               ["It was okay.", "It was fine."]]  # a gap under min_gap: no pair
    assert ka.gold_reward(answers[0][0]) > 0.5 > -0.5 > ka.gold_reward(answers[0][2])
    positive = ka.preference_rows(["p1", "p2"], answers, "positive", min_gap=0.5)
    negative = ka.preference_rows(["p1", "p2"], answers, "negative", min_gap=0.5)
    assert len(positive) == len(negative) == 1
    assert positive[0]["chosen"][0]["content"] == answers[0][0] == negative[0]["rejected"][0]["content"]
    assert positive[0]["rejected"][0]["content"] == answers[0][2] == negative[0]["chosen"][0]["content"]
    assert positive[0]["prompt"] == [{"role": "user", "content": "p1"}]
    assert ka.afinn_score(answers[0][0]) > 0 > ka.afinn_score(answers[0][2])  # the second lexicon agrees here


@pytest.mark.slow  # answers and scores with three models: seconds each on a CPU
def test_log_ratio_is_zero_for_an_untouched_adapter_and_matches_a_plain_forward(tiny_gpt2):
    tokenizer = with_prompt_format(load_tokenizer(tiny_gpt2), "auto")
    base = load_base_model(tiny_gpt2)
    model = add_lora(base, lora_config(base, r=4, alpha=8, dropout=0.0))  # LoRA B starts at 0: policy == base
    prompts = ["Tell me about a rainy afternoon.", "Hi"]  # different lengths: left padding
    rows = ka.sample_answers(model, tokenizer, prompts, seed=0, max_new_tokens=6, log_ratio=True)
    assert [r["log_ratio"] for r in rows] == pytest.approx([0.0, 0.0], abs=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    # the same draws again, and each row's log ratio recomputed alone, without padding
    rows = ka.sample_answers(model, tokenizer, prompts, seed=0, max_new_tokens=6, log_ratio=True)
    compared = 0
    for prompt, row in zip(prompts, rows):
        text = prompt_text(tokenizer, [{"role": "user", "content": prompt}])
        prompt_ids = tokenizer(text, return_tensors="pt")["input_ids"]
        answer_ids = tokenizer(row["answer"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        if answer_ids.shape[1] != row["tokens"]:  # re-tokenizing the text gave other tokens: cannot compare
            continue
        ids = torch.cat([prompt_ids, answer_ids], -1)

        def logp():
            scored = model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1:-1].log_softmax(-1)
            return scored.gather(-1, answer_ids[0][:, None]).sum().item()

        with torch.no_grad():
            policy = logp()
            with model.disable_adapter():
                reference = logp()
        assert row["log_ratio"] == pytest.approx(policy - reference, abs=1e-3)
        compared += 1
    assert compared and any(abs(row["log_ratio"]) > 1e-3 for row in rows)


def _answers(shift: dict[str, float], prompts: int = 40, seeds: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(prompts):
        level = rng.normal(0, 0.3)  # prompts differ; pairing by prompt removes that
        for s in range(seeds):
            for model, delta in shift.items():
                gold = float(np.clip(level + rng.normal(0, 0.2) + delta, -1, 1))
                rows.append({"model": model, "prompt": f"p{p}", "seed": s, "answer": f"answer {p} {s} {model}",
                             "gold": gold, "afinn": 5 * gold, "tokens": 10, "log_ratio": abs(delta)})
    return pd.DataFrame(rows)


def test_compare_and_verdict_pass_a_clear_effect_and_fail_a_null_one():
    table = ka.compare(_answers({"base": 0.0, "positive": 0.5, "negative": -0.45, "shuffled": 0.05}))
    difference = table.loc["positive", "gold - shuffled"]
    low, high = table.loc["positive", "gold - shuffled ci"]
    assert difference == pytest.approx(0.45, abs=0.1) and 0 < low < difference < high
    checks = ka.verdict(table, min_shift=0.3)
    assert len(checks) == 8 and all(c["pass"] for c in checks)

    null = ka.verdict(ka.compare(_answers({"base": 0.0, "positive": 0.02, "negative": -0.01, "shuffled": 0.0})), 0.3)
    assert not any(c["pass"] for c in null if "vs shuffled >=" in c["check"])


def test_paired_statistics():
    shifted = np.random.default_rng(1).normal(0.5, 1, 200)
    result = stats.paired_bootstrap(shifted)
    assert result["ci"][0] < result["mean"] < result["ci"][1] and result["ci"][0] > 0 and result["p"] < 0.01
    assert stats.paired_bootstrap(shifted - shifted.mean())["p"] > 0.5
    assert stats.paired_bootstrap([0.0, 0.0, 0.0]) == {"n": 3, "mean": 0.0, "ci": [0.0, 0.0], "p": 1.0}
    discordant = stats.mcnemar([1] * 20 + [0] * 5 + [1] * 3, [0] * 20 + [1] * 5 + [1] * 3)  # 3 concordant
    assert (discordant["only_first"], discordant["only_second"]) == (20, 5)
    assert discordant["p"] == pytest.approx(0.004077, abs=1e-5)  # exact binomial on the 25 discordant, two-sided
    assert stats.mcnemar([1, 0], [1, 0])["p"] == 1.0
    assert stats.wilcoxon_p([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.03125)
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


@pytest.mark.slow
def test_known_answer_notebook_runs_end_to_end_on_a_tiny_model(tmp_path):
    executed = tmp_path / "executed.ipynb"
    env = {**os.environ, "DPO_RESULTS_DIR": str(tmp_path / "results")}
    tiny = {"model_name_or_path": "offline:gpt2-tiny", "train_topics": 4, "held_out_topics": 2,
            "samples_per_prompt": 2, "max_new_tokens": 8, "min_gap": 0.0, "num_train_epochs": 1, "eval_seeds": 2,
            "frontier_prompts": 3}
    parameters = [arg for name, value in tiny.items() for arg in ("-p", name, str(value))]
    subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "known_answer.ipynb"), str(executed),
                    "-k", "python3", *parameters], check=True, cwd=ROOT / "notebooks", env=env, timeout=600)
    nb = nbformat.read(executed, as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "VERDICT:" in text and "Criteria:" in text.split("VERDICT:")[0]  # the criteria are printed first
    out = tmp_path / "results" / "known_answer"
    verdict = json.loads((out / "verdict.json").read_text())
    assert len(verdict["checks"]) == 8 and set(verdict["frontiers"]) == {"positive", "negative", "shuffled"}
    assert all(len(points) == 2 for points in verdict["frontiers"].values())  # the base, then one epoch
    answers = pd.read_csv(out / "held_out_answers.csv")
    assert set(answers["model"]) == {"base", "positive", "negative", "shuffled"}
    per_model = answers.groupby("model").size()
    assert (per_model == 2 * len(ka.TEMPLATES) * 2).all()  # every held-out prompt, every seed, every model
    shuffled = json.loads((out / "shuffled" / "run_config.json").read_text())
    assert shuffled["shuffled_labels"] is True and (out / "frontier.png").stat().st_size > 5_000
