"""Benchmark: what every run does after training, old way vs new way, in one process: scoring held-out pairs (the
log-probs behind evaluate.preference_eval), packed vs right-padded; answering prompts for the judge, batched vs one
at a time.

    python benchmarks/eval_speed.py            # CPU: the `cpu` profile's shape, 64 real hh-rlhf test pairs
    python benchmarks/eval_speed.py --gpu      # CUDA: the `full` profile's shape (4-bit, max_length 512, batch 16),
                                               # up to 512 test pairs (the sample has 359 clean ones at 512
                                               # tokens); + peak GPU memory
    python benchmarks/eval_speed.py --pairs 32 --json results/eval_speed.json

After training, every run scores its test pairs twice (adapter on, adapter off), so in a sweep this runs 2 x runs
times. Both scorers here get the same model (GPT-2 124M shape, `offline:gpt2-124m`, random weights, a fresh LoRA
adapter), the same tokenized pairs and the same batch size, in one process:

    padded   what evaluate.py did until 2026-12: prompt+chosen and prompt+rejected as separate rows, right-padded to
             the longest in each batch of `batch_size` rows, log-softmax over the vocabulary at every position
    packed   evaluate.pair_logps: speed/packing.py's shared-prompt layout (each prompt once, no padding between pairs,
             rows of up to 2 x max_length tokens, batch_size / 2 rows a forward), LM head on the scored tokens only

Prints seconds, pairs/s, the tokens each forward ran on (padding included), the largest difference between the two
scorers' summed log-probs, and peak CUDA memory on a GPU. The GPU number names the GPU.

Then the judge's answers (judge.judged_generations: base and policy each answer `--prompts` test prompts, sampled,
48 new tokens): generation.sample_answers with one prompt a generate() call (as before) vs 16 prompts a call
(left-padded). Both decode the same way; their draws differ, so only the time is compared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_scale import cpu_model  # noqa: E402  (this folder is on sys.path)
from dpo_pipeline import evaluate  # noqa: E402
from dpo_pipeline.generation import sample_answers  # noqa: E402
from dpo_pipeline import model as model_lib  # noqa: E402
from dpo_pipeline.args import HH_SAMPLE, resolve  # noqa: E402
from dpo_pipeline.speed.packing import pack_batch, pack_rows, pair_segment  # noqa: E402
from dpo_pipeline.prepare import prepare_data  # noqa: E402
from dpo_pipeline.runs import write_json_atomic  # noqa: E402
from table import markdown  # noqa: E402  (this folder)


@torch.no_grad()
def padded_logps(model, pad_token_id: int, sequences: list[tuple[list[int], list[int]]], max_length: int,
                 batch_size: int) -> torch.Tensor:
    """The baseline: evaluate.py's scorer before packing (kept here, verbatim in what it computes)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        batch = [(prompt + completion)[:max_length] for prompt, completion in sequences[i:i + batch_size]]
        starts = [len(prompt) for prompt, _ in sequences[i:i + batch_size]]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seq, start) in enumerate(zip(batch, starts)):
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            scored[row, start:len(seq)] = True
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out.append((logps * scored[:, 1:]).sum(-1).cpu())
    return torch.cat(out)


def tokens_run(tokenized, max_length: int, batch_size: int) -> dict[str, int]:
    """Tokens each scorer's forwards run on, padding included, and the real (scored or context) tokens."""
    rows = [min(len(p) + len(side), max_length) for p, c, r in tokenized for side in (c, r)]
    rows = rows[0::2] + rows[1::2]  # the padded scorer runs all chosen rows, then all rejected rows
    padded = sum(len(rows[i:i + batch_size]) * max(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))
    segments = [len(pair_segment(p, c, r, max_length)["tokens"]) for p, c, r in tokenized]
    packs, per_forward = pack_rows(segments, 2 * max_length), max(1, batch_size // 2)  # as evaluate.pair_logps
    examples = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in tokenized]
    packed = sum(pack_batch([examples[j] for row in packs[i:i + per_forward] for j in row], max_length,
                            max_length + 1, 0, 2 * max_length)["input_ids"].numel()
                 for i in range(0, len(packs), per_forward))
    return {"padded": padded, "packed": packed, "rows_padded": sum(rows), "pairs_packed": sum(segments)}


def timed(fn, gpu: bool):
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if gpu:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, (torch.cuda.max_memory_allocated() / 2**20 if gpu else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the full profile's shape on CUDA (4-bit, max_length 512)")
    ap.add_argument("--pairs", type=int, help="test pairs to score (default 64 on a CPU, up to 512 on a GPU)")
    ap.add_argument("--prompts", type=int, help="prompts answered for the judge (default 16 on a CPU, 64 on a GPU)")
    ap.add_argument("--model", default="offline:gpt2-124m", help="the base model (default: GPT-2 124M shape)")
    ap.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    opts = ap.parse_args()
    if opts.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA GPU and none is visible", file=sys.stderr)
        sys.exit(2)
    pairs = opts.pairs or (512 if opts.gpu else 64)
    overrides = {"model_name_or_path": opts.model, "dataset_name": HH_SAMPLE, "max_eval_pairs": pairs, "load_in_4bit": opts.gpu,
                 "validation_pairs": 0}  # only test pairs are scored here; full's 2,000 exceed the sample's train split
    settings, profile, _ = resolve("full" if opts.gpu else "cpu", overrides)
    tokenizer = model_lib.load_tokenizer(opts.model)
    data = prepare_data(settings, tokenizer)
    base = model_lib.load_base_model(settings.model)
    model = model_lib.add_lora(base, model_lib.lora_config(base, settings.model))
    tokenized = evaluate.token_ids(tokenizer, data.test, settings.dpo.max_length)
    length, batch = settings.dpo.max_length, settings.dpo.per_device_eval_batch_size

    def run_padded():
        return (padded_logps(model, tokenizer.pad_token_id, [(p, c) for p, c, _ in tokenized], length, batch),
                padded_logps(model, tokenizer.pad_token_id, [(p, r) for p, _, r in tokenized], length, batch))

    def run_packed():
        return evaluate.pair_logps(model, tokenized, length, batch)

    if opts.gpu:  # CUDA start-up and kernel selection out of the timings
        evaluate.pair_logps(model, tokenized[:batch], length, batch)
        padded_logps(model, tokenizer.pad_token_id, [(p, c) for p, c, _ in tokenized[:batch]], length, batch)
    (old, old_s, old_mb), (new, new_s, new_mb) = timed(run_padded, opts.gpu), timed(run_packed, opts.gpu)
    # the eval_batch_size lever: the same packed scorer, 4x the pairs a forward (as the reference precompute and the
    # evaluations while training would run with eval_batch_size = 4 x batch_size)
    wide, wide_s, wide_mb = timed(lambda: evaluate.pair_logps(model, tokenized, length, 4 * batch), opts.gpu)
    diff = max(float((a - b).abs().max()) for a, b in zip(old, new))
    tokens = tokens_run(tokenized, length, batch)
    device = torch.cuda.get_device_name() if opts.gpu else f"{cpu_model()}, {torch.get_num_threads()} threads"
    result = {
        "device": device, "model": opts.model, "profile": profile, "pairs": len(tokenized), "max_length": length, "batch_size": batch,
        "load_in_4bit": settings.model.load_in_4bit, "torch_threads": torch.get_num_threads(),
        "padded": {"seconds": round(old_s, 2), "pairs_per_s": round(len(tokenized) / old_s, 2),
                   "tokens_run": tokens["padded"], "peak_gpu_mb": old_mb and round(old_mb)},
        "packed": {"seconds": round(new_s, 2), "pairs_per_s": round(len(tokenized) / new_s, 2),
                   "tokens_run": tokens["packed"], "peak_gpu_mb": new_mb and round(new_mb)},
        "speedup": round(old_s / new_s, 2), "max_abs_logp_difference": diff,
        "packed_4x_batch": {"batch_size": 4 * batch, "seconds": round(wide_s, 2),
                            "tokens_run": tokens_run(tokenized, length, 4 * batch)["packed"],
                            "pairs_per_s": round(len(tokenized) / wide_s, 2), "peak_gpu_mb": wide_mb and round(wide_mb),
                            "max_abs_logp_difference": max(float((a - b).abs().max()) for a, b in zip(wide, new))},
    }
    print(f"\n{len(tokenized)} real hh-rlhf test pairs, {opts.model} + LoRA r={settings.model.lora_r}, max_length {length}, "
          f"batch {batch}, {'4-bit NF4' if settings.model.load_in_4bit else 'unquantized'}; {device}\n")
    scorers = {"padded": result["padded"], "packed": result["packed"],
               f"packed, batch {4 * batch}": result["packed_4x_batch"]}
    print(markdown([{"scorer": name, "seconds": f"{r['seconds']:.2f}", "pairs/s": f"{r['pairs_per_s']:.2f}",
                     "tokens run": f"{r['tokens_run']:,}", "peak GPU MB": r["peak_gpu_mb"] or "-"}
                    for name, r in scorers.items()]))
    print(f"\npacked is {result['speedup']}x faster; largest difference in a summed log-prob {diff:.2e}; "
          f"packed at batch {4 * batch} takes {wide_s / new_s:.2f}x the time of batch {batch}")

    prompts = list(data.test["prompt"][:opts.prompts or (64 if opts.gpu else 16)])
    answer = lambda batch_size: sample_answers(model, tokenizer, prompts, seed=0, max_new_tokens=48,
                                               batch_size=batch_size)  # judged_generations' decoding
    generation = {}
    for name, fn in (("one prompt a call", lambda: answer(1)), ("16 prompts a call", lambda: answer(16))):
        _, seconds, peak = timed(fn, opts.gpu)
        generation[name] = {"seconds": round(seconds, 2), "peak_gpu_mb": peak and round(peak)}
    result["generation"] = {"prompts": len(prompts), "max_new_tokens": 48, **generation}
    print(f"\n{len(prompts)} prompts answered (one side of judged_generations), 48 new tokens, sampled:\n")
    print(markdown([{"generation": name, "seconds": f"{r['seconds']:.2f}", "peak GPU MB": r["peak_gpu_mb"] or "-"}
                    for name, r in generation.items()]))
    if opts.json:
        write_json_atomic(opts.json, result)
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
