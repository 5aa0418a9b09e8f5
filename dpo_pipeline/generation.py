"""Answers sampled from prompts with the same random draws for any model: the answers the judge scores (judge.py),
the side-by-side samples of a sweep's best run, and sampled answers with their log-ratio to the reference, from which
KL(policy || base) is estimated (known_answer.py, behaviour.py).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import set_seed

from .chat_template import HUMAN, prompt_text


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list, *, seed: int, max_new_tokens: int = 32, batch_size: int = 32,
                   temperature: float = 1.0, top_p: float = 1.0, log_ratio: bool = False,
                   reference=None) -> list[dict]:
    """One answer per prompt (messages, or a user message's text), `batch_size` prompts a left-padded generate()
    call with set_seed(seed + b) before batch b: two models given the same prompts and seed draw from the same random
    stream, so their answers differ by the models, not the draws. Sampled at `temperature` from the full
    distribution (no top-k; nucleus when `top_p` < 1), greedy at 0.

    Each row: {"prompt": the text the model read, "answer": the text up to the first eos or the next human turn,
    "tokens": generated tokens up to the first eos, "log_ratio": None}. With `log_ratio` (at T = 1), log pi(y|x) -
    log pi_ref(y|x) of exactly those tokens, pi_ref being `reference` or, for a PeftModel, the model with its
    adapter off: the per-sample term of the Monte-Carlo KL estimate."""
    if log_ratio and (temperature != 1.0 or top_p != 1.0):  # the raw logits are pi only when sampling from them
        raise ValueError("log_ratio needs answers sampled at temperature 1 from the full distribution (top_p 1)")
    model.eval()
    device = next(model.parameters()).device
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    decoding = dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False)
    rows = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        texts = [prompt_text(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
                 for p in prompts[start:start + batch_size]]
        # the rendered template holds any special tokens the model expects, as in training
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        set_seed(seed + b)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, output_logits=log_ratio, **decoding)
        generated = out.sequences[:, batch["input_ids"].shape[1]:]
        is_eos = torch.isin(generated, torch.tensor(sorted(eos), device=device))
        keep = (is_eos.cumsum(-1) - is_eos.long()) == 0  # up to and including the first eos
        ratios = _log_ratios(model, reference, out, batch["attention_mask"], keep) if log_ratio \
            else [None] * len(texts)
        for text, tokens, kept, ratio in zip(texts, generated, keep, ratios):
            answer = tokenizer.decode(tokens[kept], skip_special_tokens=True).split(HUMAN)[0]
            rows.append({"prompt": text, "answer": answer, "tokens": int(kept.sum()), "log_ratio": ratio})
    return rows


def base_and_adapter_answers(model, tokenizer, prompts: list, **sampling) -> tuple[list[dict], list[dict]]:
    """sample_answers of a PeftModel with its adapter off (the base model), then on: the same draws for both."""
    with model.disable_adapter():
        base = sample_answers(model, tokenizer, prompts, **sampling)
    return base, sample_answers(model, tokenizer, prompts, **sampling)


def generate_samples(model, tokenizer, prompts: list, max_new_tokens: int = 40, seed: int = 0) -> list[dict]:
    """Greedy and sampled (fixed seed) answers to each prompt, from the base model and from the adapter."""
    columns = {}
    for label, temperature, top_p in (("greedy", 0, 1.0), ("sampled", 0.8, 0.95)):
        base, adapter = base_and_adapter_answers(model, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_p=top_p)
        columns["prompt"] = [row["prompt"] for row in base]
        columns[f"base ({label})"] = [row["answer"] for row in base]
        columns[f"adapter ({label})"] = [row["answer"] for row in adapter]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _log_ratios(model, reference, out, prompt_mask, keep) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) of each answer's kept tokens: pi from the raw logits generate() drew them from,
    pi_ref from one forward of `reference` (else the model with its adapter off) over the left-padded prompts +
    answers, the LM head on the answer positions only."""
    generated = out.sequences[:, prompt_mask.shape[1]:]
    mask = torch.cat([prompt_mask, keep.long()], -1)
    logps = lambda logits: (logits.float().log_softmax(-1).gather(-1, generated[..., None])[..., 0] * keep).sum(-1)
    scorer = model if reference is None else reference.eval()
    with model.disable_adapter() if reference is None else contextlib.nullcontext():
        logits = scorer(input_ids=out.sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        logits_to_keep=generated.shape[1] + 1).logits[:, :-1]  # position t predicts token t + 1
    return (logps(torch.stack(out.logits, 1)) - logps(logits)).tolist()
