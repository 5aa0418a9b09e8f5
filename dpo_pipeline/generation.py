"""Answers generated from prompts, the same random draws for any model: the side-by-side samples of a sweep's best
run (base vs adapter), the answers the judge scores (judge.py), and sampled answers with their log-ratio to the
reference, from which KL(policy || base) is estimated (known_answer.py, behaviour.py).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import set_seed

from .chat_template import HUMAN, prompt_text


def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, **sampling) -> str:
    """One answer to `prompt` after set_seed(seed) (the same draws for any model), cut where the next human turn
    would begin; `sampling` are generate()'s decoding arguments."""
    return generate_answers(model, tokenizer, [prompt], max_new_tokens, seed, 1, **sampling)[0]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16,
                     **sampling) -> list[str]:
    """Answers to `prompts` (text, or messages rendered with the tokenizer's chat template), `batch_size` prompts a
    generate() call (left-padded, so every row continues from its
    prompt's end), with set_seed(seed + b) before batch b: two models given the same prompts draw from the same
    random stream, so their answers differ by the models, not the draws. Cut where the next human turn would begin.
    One prompt a call ran 64 prompts x 2 models as 6,144 sequential decoding steps at 48 new tokens; batched, 384."""
    device = next(model.parameters()).device
    prompts = [prompt_text(tokenizer, p) for p in prompts]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            ids = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            set_seed(seed + b)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling)
            texts = tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            answers += [text.split(HUMAN)[0] for text in texts]
    finally:
        tokenizer.padding_side = padding_side
    return answers


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[dict]:
    """Greedy and sampled (fixed seed) answers to each prompt, from the base model and from the adapter."""
    model.eval()
    rows = []
    for prompt in prompts:
        prompt = prompt_text(tokenizer, prompt)
        row = {"prompt": prompt}
        for label, sampling in (("greedy", dict(do_sample=False)),
                                ("sampled", dict(do_sample=True, temperature=0.8, top_p=0.95))):
            for who in ("base", "adapter"):
                with model.disable_adapter() if who == "base" else contextlib.nullcontext():
                    row[f"{who} ({label})"] = generate_answer(model, tokenizer, prompt, max_new_tokens, seed,
                                                              **sampling)
        rows.append(row)
    return rows


def _eos_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list, *, seed: int, max_new_tokens: int = 32, batch_size: int = 32,
                   log_ratio: bool = False, reference=None) -> list[dict]:
    """One answer per prompt (a user message's text, or messages), sampled at T = 1 from the full distribution (no
    top-k, no top-p) with set_seed(seed + b) before batch b, so two models given the same prompts and seed draw from
    the same random stream.

    Each answer: {"answer": text, "tokens": sampled tokens up to the first eos}. With `log_ratio`, also
    log pi(y|x) - log pi_ref(y|x) of exactly those tokens, pi_ref being `reference` or, for a PeftModel, the model
    with its adapter off: the per-sample term of the Monte-Carlo KL estimate (generate's raw logits for pi, one
    forward for pi_ref)."""
    model.eval()
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    rows = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            texts = [prompt_text(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
                     for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            set_seed(seed + b)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                                 output_logits=log_ratio)  # the raw logits the tokens were drawn from
            width = batch["input_ids"].shape[1]
            generated = out.sequences[:, width:]
            is_eos = torch.isin(generated, torch.tensor(sorted(eos), device=device))
            keep = (is_eos.cumsum(-1) - is_eos.long()) == 0  # up to and including the first eos
            ratios = [None] * len(texts)
            if log_ratio:
                mask = torch.cat([batch["attention_mask"], keep.long()], -1)
                policy = _token_logps(torch.stack(out.logits, 1), generated, keep)
                ratios = (policy - _reference_logps(model, reference, out.sequences, mask, generated, keep)).tolist()
            for tokens, kept, ratio in zip(generated, keep, ratios):
                answer = tokenizer.decode(tokens[kept], skip_special_tokens=True).split(HUMAN)[0]
                rows.append({"answer": answer, "tokens": int(kept.sum()), "log_ratio": ratio})
    finally:
        tokenizer.padding_side = padding_side
    return rows


def _token_logps(logits, tokens, keep):
    """Sum of log-probabilities of `tokens` under `logits` (one row of logits a token), over the kept ones."""
    return (logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1) * keep).sum(-1)


def _reference_logps(model, reference, sequences, attention_mask, generated, keep):
    """log pi_ref of the sampled tokens: one forward of `reference` (else the model with its adapter off) over the
    left-padded prompts + answers, the LM head on the answer positions only."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def logps(scorer):
        logits = scorer(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                        logits_to_keep=generated.shape[1] + 1).logits[:, :-1]  # position t predicts token t + 1
        return _token_logps(logits, generated, keep)

    if reference is not None:
        return logps(reference.eval())
    with model.disable_adapter():
        return logps(model)
