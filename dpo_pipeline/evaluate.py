"""Evaluation beyond the loss: per-pair implicit rewards on held-out pairs, and generations base vs adapter.

For a pair, the implicit reward of a completion y is beta * (log pi(y|x) - log pi_ref(y|x)), summed over the
completion tokens exactly as TRL tokenizes and truncates them. The reference is the same model with its LoRA
adapter disabled, so both numbers come from one model in memory. Ties (equal rewards, e.g. an untrained adapter)
are counted apart, not as wrong.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import set_seed

from trl.data_utils import common_prefix_length

TIE_TOLERANCE = 1e-6


def _tokenize_pair_side(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """(input ids, index where the completion starts), as TRL 1.16 builds them: eos appended, keep_start truncation."""
    eos = tokenizer.eos_token
    text = completion if completion.endswith(eos) else completion + eos
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + text)["input_ids"]
    start = common_prefix_length(prompt_ids, full)
    return full[:max_length], start


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], max_length: int,
                     batch_size: int = 8) -> torch.Tensor:
    """Sum of log-probabilities of each completion's tokens given its prompt."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        items = [_tokenize_pair_side(tokenizer, p, c, max_length)
                 for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seq, start) in enumerate(items):  # right padding; only completion tokens are scored
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            mask[row, start:len(seq)] = True
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        out.append((logps * mask[:, 1:].to(device)).sum(-1).cpu())
    return torch.cat(out)


def _summary(chosen_shift, rejected_shift, chosen_logps, rejected_logps, beta) -> dict:
    margins = beta * (chosen_shift - rejected_shift)
    ties = margins.abs() <= TIE_TOLERANCE
    return {
        "pairs": len(margins),
        "reward_accuracy": float(((margins > TIE_TOLERANCE)).float().mean()),
        "reward_ties": float(ties.float().mean()),
        "reward_margin": float(margins.mean()),
        "logp_accuracy": float((chosen_logps > rejected_logps).float().mean()),
        "chosen_logp_shift": float(chosen_shift.mean()),
        "rejected_logp_shift": float(rejected_shift.mean()),
    }


def preference_eval(model, tokenizer, pairs, beta: float, max_length: int, batch_size: int = 8) -> dict:
    """{"adapter": metrics, "base": metrics} on held-out pairs for a PeftModel (adapter on vs disabled).

    reward_accuracy  share of pairs whose chosen implicit reward beats the rejected one (ties excluded)
    reward_ties      share of pairs with equal rewards
    reward_margin    mean chosen minus rejected implicit reward
    logp_accuracy    share of pairs where the model gives the chosen completion the higher log-probability
    *_logp_shift     mean change in the completions' log-probabilities against the base model
    """
    prompts, chosen, rejected = list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    score = lambda completions: completion_logps(model, tokenizer, prompts, completions, max_length, batch_size)
    policy_c, policy_r = score(chosen), score(rejected)
    with model.disable_adapter():
        ref_c, ref_r = score(chosen), score(rejected)
    zero = torch.zeros_like(ref_c)
    return {
        "adapter": _summary(policy_c - ref_c, policy_r - ref_r, policy_c, policy_r, beta),
        "base": _summary(zero, zero, ref_c, ref_r, beta),  # the base is its own reference: every reward is 0
    }


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[dict]:
    """Greedy and sampled (fixed seed) answers to each prompt, from the base model and from the adapter."""
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        row = {"prompt": prompt}
        for label, sampled in (("greedy", False), ("sampled", True)):
            for who in ("base", "adapter"):
                set_seed(seed)  # the same random draws for base and adapter
                kwargs = dict(do_sample=True, temperature=0.8, top_p=0.95) if sampled else dict(do_sample=False)
                with model.disable_adapter() if who == "base" else contextlib.nullcontext():
                    out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         **kwargs)
                text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                row[f"{who} ({label})"] = text.split("\n\nHuman:")[0]  # stop where the next turn would begin
        rows.append(row)
    return rows
