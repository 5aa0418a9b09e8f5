"""Answers generated from prompts, the same random draws for any model: the side-by-side samples of a sweep's best
run (base vs adapter), and the answers the judge scores (judge.py).
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
