"""Judged generations: does the DPO policy answer better than the base model, in a reward model's judgment?

TRL 1.16 ships no judges, so a judge is any one-output sequence-classification reward model: a Hub model (e.g.
OpenAssistant/reward-model-deberta-v3-large-v2) or a local folder (one trained with TRL's RewardTrainer, say). A
decoder judge reads `prompt + answer + eos` as one text, as RewardTrainer does; an encoder (one with a separator
token) reads the (prompt, answer) pair. Check a judge on held-out pairs first (`pairwise_accuracy`): one that cannot
beat the length heuristic there says little about generations. No judge is used unless asked for: on hh-rlhf none
that runs offline settles harmlessness (docs/evaluation.md; behaviour.py measures what can be measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .generation import base_and_adapter_answers
from .hf import load_source
from .stats import TIE_TOLERANCE, length_shares, proportion, win_rate

LENGTH_MATCH = 0.2  # answers whose token counts differ by at most 20% of the longer one are "length-matched"


class JudgeError(ValueError):
    """A judge that cannot be loaded; the message is one line."""


@dataclass
class Judge:
    model: torch.nn.Module
    tokenizer: object
    name: str


def load_judge(name_or_path: str | Path) -> Judge:
    """A one-output sequence-classification model (fp32, on the GPU if there is one) and its tokenizer, by local
    folder or Hub id (a cached snapshot loads as a local folder, with no round-trips)."""
    name = str(name_or_path)
    try:
        source = load_source(name)
    except HFValidationError:
        raise JudgeError(f"Judge {name!r} is neither a local folder nor a Hub model id") from None
    if source is None:  # fail now rather than after from_pretrained's retries
        raise JudgeError(f"Judge {name!r} is not cached here and the Hugging Face Hub cannot be reached")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise JudgeError(f"Cannot load judge {name!r}: {str(err).strip().splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise JudgeError(f"{name!r} is not a reward model: it has {model.config.num_labels} outputs, not 1")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # where a decoder finds the last real token
    tokenizer.truncation_side = "left"  # too long a text loses the start of the prompt, never the judged answer
    return Judge(model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer, name)


@torch.no_grad()
def score(judge: Judge, prompts: list[str], answers: list[str], batch_size: int = 8) -> list[float]:
    """The judge's reward for each answer to its prompt."""
    tokenizer = judge.tokenizer
    limit = min(tokenizer.model_max_length, getattr(judge.model.config, "max_position_embeddings", None) or 10**9)
    device = next(judge.model.parameters()).device
    scores = []
    for i in range(0, len(prompts), batch_size):
        batch_prompts, batch_answers = prompts[i:i + batch_size], answers[i:i + batch_size]
        if tokenizer.sep_token is not None:  # an encoder: the (prompt, answer) pair, cut from the prompt's start
            inputs = tokenizer(batch_prompts, batch_answers, truncation="only_first", max_length=limit,
                               padding=True, return_tensors="pt")
        else:  # a decoder: one text, as RewardTrainer builds it
            eos = tokenizer.eos_token
            texts = [p + a if a.endswith(eos) else p + a + eos for p, a in zip(batch_prompts, batch_answers)]
            inputs = tokenizer(texts, truncation=True, max_length=limit, padding=True, return_tensors="pt")
        scores += judge.model(**inputs.to(device)).logits[:, 0].float().tolist()
    return scores


def pairwise_accuracy(judge: Judge, pairs) -> dict:
    """How often the judge scores the chosen answer above the rejected one on held-out pairs: accuracy (ties count as
    misses), wins, ties, a 95% Wilson interval, and the length baselines on the same pairs in the judge's tokens."""
    prompts = list(pairs["prompt"])
    chosen, rejected = score(judge, prompts, list(pairs["chosen"])), score(judge, prompts, list(pairs["rejected"]))
    wins = sum(c - r > TIE_TOLERANCE for c, r in zip(chosen, rejected))
    lengths = [(_tokens(judge.tokenizer, c), _tokens(judge.tokenizer, r)) for c, r in zip(pairs["chosen"],
                                                                                            pairs["rejected"])]
    return {"pairs": len(prompts), **proportion("accuracy", wins, len(prompts)), "wins": wins,
            "ties": sum(abs(c - r) <= TIE_TOLERANCE for c, r in zip(chosen, rejected)), **length_shares(lengths)}


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tally(outcomes: list[str]) -> dict:
    return win_rate(outcomes.count("win"), outcomes.count("tie"), len(outcomes))


def judged_generations(policy_peft_model, tokenizer, prompts: list, judge: Judge, *, max_new_tokens: int = 48,
                       seed: int = 0) -> dict:
    """Answers of the base (adapter disabled) and of the policy (a PeftModel) to each prompt, scored by the judge.

    Both sides decode alike (generation.sample_answers: sampled at T = 1 from the full distribution, the seed reset
    before each batch of 16 prompts), so a difference comes from the models, not the draws.
    rows: prompt, base, policy, score_base, score_policy, length_base, length_policy (tokens), outcome (the policy's
    win / tie / loss; identical answers or scores within TIE_TOLERANCE tie).
    summary: the _tally counts and win rate, mean scores and lengths, and length_matched: the same tally over the
    prompts whose two answers are within LENGTH_MATCH of the longer one in tokens (a win there is not just length).
    """
    sides = base_and_adapter_answers(policy_peft_model, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens,
                                     batch_size=16)
    prompts = [row["prompt"] for row in sides[0]]  # as the model read them: what is judged
    base_answers, policy_answers = ([row["answer"] for row in rows] for rows in sides)
    rows = []
    for prompt, base, policy, score_base, score_policy in zip(prompts, base_answers, policy_answers,
                                                              score(judge, prompts, base_answers),
                                                              score(judge, prompts, policy_answers)):
        difference = score_policy - score_base
        tie = base == policy or abs(difference) <= TIE_TOLERANCE
        rows.append({"prompt": prompt, "base": base, "policy": policy, "score_base": score_base,
                     "score_policy": score_policy, "length_base": _tokens(tokenizer, base),
                     "length_policy": _tokens(tokenizer, policy),
                     "outcome": "tie" if tie else "win" if difference > 0 else "loss"})
    matched = [row["outcome"] for row in rows if abs(row["length_policy"] - row["length_base"])
               <= LENGTH_MATCH * max(row["length_policy"], row["length_base"])]
    mean = lambda key: sum(row[key] for row in rows) / len(rows) if rows else float("nan")
    summary = {
        **_tally([row["outcome"] for row in rows]),
        **{f"mean_{key}": mean(key) for key in ("score_policy", "score_base", "length_policy", "length_base")},
        "length_matched": {"max_relative_difference": LENGTH_MATCH, **_tally(matched)},
        "judge": judge.name,
        "decoding": f"sampled, temperature 1, seed {seed} + index of a batch of 16 prompts, at most {max_new_tokens} "
                    "new tokens",
    }
    return {"rows": rows, "summary": summary}
