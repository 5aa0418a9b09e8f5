"""Benchmark: the same DPO training in several setups, in one process, on the same real hh-rlhf pairs, each one a
setting set run through `dpo_pipeline.pipeline.run` (the path users run).

    python benchmarks/bench.py --quick            # CPU: 4 steps, one measured cache-hit sweep run: a few minutes
    python benchmarks/bench.py                    # CPU: 12 steps, all sweep runs
    python benchmarks/bench.py --levers           # + the lever table (tuned with one lever off at a time)
    python benchmarks/bench.py --gpu              # the `full` setting on a CUDA GPU: 4-bit, max_length 512,
                                                  # 16 pairs a step, 30 steps; + GPU memory and MFU
    python benchmarks/bench.py --gpu --profile    # + one tuned run under torch.profiler (step_profile.py)

Every setup trains GPT-2 124M (`offline:gpt2-124m`: the real architecture and tokenizer, random weights) with LoRA
r=16 on c_attn/c_proj/c_fc, for the same optimizer steps, batch, max_length, learning rate and seed, on the first
steps x batch cleaned pairs of ../shared/data/hh-rlhf/harmless-base.jsonl.gz (one epoch: the same pairs and the
same real tokens for every setup).

    seed-style   TRL's DPOTrainer, fp32, every sequence padded to 1024 tokens, the reference forward at every step
    TRL-default  trainer="trl": a DPOConfig written the way a user would; TRL's defaults otherwise (bf16 autocast,
                 gradient checkpointing, reference forward every step, padding to the longest in the batch)
    tuned        this project's path (trainer="tuned"): reference log-probs cached on disk, precision by hardware,
                 no gradient checkpointing, shared-prompt packing; on a CPU one pair per forward and the lean LM head

Measured per setup: pairs/s and non-pad tokens/s over the training steps (every step timed; the tokens the model
runs on, so a packed pair counts its prompt once), padding share of the batches trained on, peak memory (process
RSS on a CPU: the kernel's high-water mark, reset per setup; peak CUDA memory on a GPU), per-step losses; on a GPU also model FLOPs utilisation against a bf16 matmul peak measured in the
same process (LoRA on a frozen base: ~4 N FLOPs a trained token, + 2 N when the reference runs every step).
The sweep cost compares 4 tuned runs sharing the reference cache (the first cold) with 4 x one TRL-default run, and
projects a 24-run `sweep_full.yaml` from them, evaluations included: one more run evaluates the way a sweep_full run
does (a validation slice while training with the completion prompts answered, held-out test pairs, judged answers)
on fewer pairs, and its rates are scaled to the sweep's pair counts. Targets: the CPU set, or with --gpu issue 12's (tuned >= 300 pairs/s,
>= 3x TRL-default, peak CUDA memory <= TRL-default's, per-step losses within 0.01 of TRL-default's, the projected
sweep <= 30 min); each is printed MET or NOT MET.
Writes `<out>/bench-<timestamp>.json` and `<out>/latest.json`, prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from dpo_pipeline.args import HH_SAMPLE, Settings, cpu_has_native_bf16, parse
from dpo_pipeline.pipeline import free_memory, run
from dpo_pipeline.prepare import prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import StepProfiler  # noqa: E402  (this folder)
from step_profile import markdown as profile_markdown  # noqa: E402

WHOLE = -1  # pairs_per_forward: the whole step's pairs in one forward (resolved to the batch below)
SETUPS = {  # every key a setting by its own name, except pairs_per_forward and lean_lm_head (resolved below)
    "seed-style": dict(trainer="trl", pad_to_multiple_of=1024, bf16=False, fp16=False, gradient_checkpointing=False,
                       precompute_ref_log_probs=False, pairs_per_forward=WHOLE),
    # TRL's own defaults where this project departs from them (args.PROJECT_DEFAULTS)
    "TRL-default": dict(trainer="trl", bf16=True, gradient_checkpointing=True, precompute_ref_log_probs=False,
                        pairs_per_forward=WHOLE),
    "tuned": dict(trainer="tuned"),
}
# tuned with one lever switched off (or on). Only levers with a measured gain on some machine (benchmarks/README.md);
# compile_model, Trainer's torch_compile, data-loading workers and fused AdamW had none and were removed.
LEVERS = {
    "tuned, no packing": dict(packing=False),
    "tuned, no reference cache": dict(precompute_ref_log_probs=False),
    "tuned, gradient checkpointing": dict(gradient_checkpointing=True),
    # any budget under a row: each row alone
    "tuned, one packed row a forward": dict(micro_batch_tokens=1, pairs_per_forward=WHOLE),
}
CPU_LEVERS = {
    "tuned, fp32": dict(bf16=False, fp16=False),
    "tuned, whole batch per forward": dict(pairs_per_forward=WHOLE),
    "tuned, whole batch per forward, no packing": dict(pairs_per_forward=WHOLE, packing=False),
    "tuned, TRL's CPU LM head": dict(lean_lm_head=False),
}
GPU_LEVERS = {  # the GPU's sizes of the kept levers, and two DPOConfig settings only a GPU can judge (no code here)
    "tuned, 4 pairs per forward": dict(pairs_per_forward=4),
    "tuned, forwards of at most 2,048 tokens": dict(micro_batch_tokens=2048, pairs_per_forward=WHOLE),
    "tuned + Trainer's torch_compile": dict(torch_compile=True),  # the whole PEFT model
    "tuned, fused AdamW": dict(optim="adamw_torch_fused"),  # TRL's default optimizer
}
# (direction, bound) per target: the CPU set of the first speed issue, the GPU set of issue 12 (an H100, `full`)
TARGETS = {"tuned_vs_seed": (">=", 4.0), "tuned_vs_trl": (">=", 1.5), "sweep_vs_4_trl_runs": ("<=", 0.75),
           "loss_gap_vs_trl": ("<=", 0.01)}
GPU_TARGETS = {"tuned_pairs_per_s": (">=", 300.0), "tuned_vs_trl": (">=", 3.0), "cuda_peak_vs_trl": ("<=", 1.0),
               "loss_gap_vs_trl": ("<=", 0.01), "sweep_full_minutes": ("<=", 30.0)}
WARMUP_STEPS = 2  # steps left out of `warm_pairs_per_s`: compilation, first allocations, kernel autotuning
PROFILED_STEPS = 3  # --profile: steps recorded after the warm-up
SWEEP_FULL = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "full.yaml"  # the sweep the target is about


def sweep_shape(path: Path) -> dict:
    """Runs, steps, pairs a step and what each run evaluates, of a grid sweep file, read from it (not copied here)."""
    from dpo_pipeline.sweep import SweepSpec

    spec = SweepSpec.from_file(path)
    run, dpo = (settings := spec.base_config()[0]).run, settings.dpo
    runs = 1
    for values in spec.grid.values():
        runs *= len(values)
    judged = run.judge not in (None, "", "none")
    return dict(runs=runs, steps=dpo.max_steps, pairs_per_step=dpo.per_device_train_batch_size
                * dpo.gradient_accumulation_steps, evaluations=dpo.max_steps // dpo.eval_steps,
                validation_pairs=run.validation_pairs, test_pairs=run.max_eval_pairs,
                judge_prompts=run.judge_prompts if judged else 0)


def rss_mb(field: str = "VmRSS") -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) / 1024


class Meter(TrainerCallback):
    """Counts the pairs, real tokens and padded positions of the training batches, and times every optimizer step.
    It counts in `training_step`, in the training process: a collator runs in the data-loading workers when there
    are some."""

    def __init__(self, trainer):
        self.steps, self.ends, self.start = [], [], None
        training_step = trainer.training_step

        def counted(model, inputs, *args, **kwargs):
            batches = inputs.get("chunks", [inputs])  # micro_batch_tokens: a step split into forwards
            # the positions the model runs on: packed rows when the batch has them
            masks = [b["packed"]["segment"] >= 0 if "packed" in b else b["attention_mask"] for b in batches]
            # the token count stays a tensor: reading it here would wait for the GPU before every forward
            self.steps.append((sum(len(b["input_ids"]) // 2 for b in batches), sum(m.sum() for m in masks),
                               sum(m.numel() for m in masks)))
            return training_step(model, inputs, *args, **kwargs)

        trainer.training_step = counted
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def matmul_peak_tflops() -> float | None:
    """bf16 matmul throughput of this GPU, measured here (the MFU denominator)."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, 1)


def time_answers(trainer, prompts: list[str]) -> float:
    """Seconds for the trained policy and its base to answer `prompts` as a judged run does (judge.judged_generations:
    generation.base_and_adapter_answers, 48 new tokens, 16 prompts a call)."""
    from dpo_pipeline.generation import base_and_adapter_answers

    start = time.perf_counter()
    base_and_adapter_answers(trainer.model, trainer.processing_class, prompts, seed=0, max_new_tokens=48, batch_size=16)
    return time.perf_counter() - start


def run_setup(name: str, config: Settings, data, lean_lm_head: bool = True, peak_tflops: float | None = None,
              answer_prompts: list[str] | None = None, profiler: StepProfiler | None = None) -> dict:
    """One run through pipeline.run, measured (with `answer_prompts`, also the judged answers' generation; with a
    `profiler`, where its steps' time went); everything is freed afterwards."""
    print(f"\n=== {name} ===", flush=True)
    free_memory()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is honest
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    baseline, meters = rss_mb(), []

    def setup(trainer):
        meters.append(Meter(trainer))
        trainer.LEAN_LM_HEAD = lean_lm_head
        meters.append(trainer)
        if profiler:
            trainer.add_callback(profiler)

    t0 = time.perf_counter()
    record = run(config, data, setup=setup)
    meter, trainer = meters
    pairs, tokens, positions = (int(sum(s[i] for s in meter.steps)) for i in range(3))
    train_s = meter.ends[-1] - meter.start
    losses = [round(e["loss"], 6) for e in record.log_history if "loss" in e]
    args = trainer.args
    steps_s = [b - a for a, b in zip([meter.start, *meter.ends[:-1]], meter.ends)]
    result = {
        "setup": name, "steps": record.train_steps, "pairs": pairs, "non_pad_tokens": tokens,
        "padding_fraction": round(1 - tokens / positions, 4), "train_s": round(train_s, 2),
        "pairs_per_s": round(pairs / train_s, 3), "tokens_per_s": round(tokens / train_s, 1),
        "step_s": [round(t, 3) for t in steps_s],
        # past the warm-up steps (the rate a long run trains at), when there are more steps than that
        "warm_pairs_per_s": round(pairs / len(steps_s) * (len(steps_s) - WARMUP_STEPS) / sum(steps_s[WARMUP_STEPS:]),
                                  3) if len(steps_s) > WARMUP_STEPS else None,
        "run_s": round(meter.ends[-1] - t0, 2),  # construction (model, data, reference precompute) + training
        "peak_rss_mb": round(rss_mb("VmHWM")), "baseline_rss_mb": round(baseline),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "losses": losses, "final_loss": losses[-1], "mean_loss": round(sum(losses) / len(losses), 6),
        "ref_cache_hits": [e["hit"] for e in getattr(trainer, "ref_cache_events", [])],
        "timings_s": record.timings_s, "reference_s_per_pair": reference_cost(trainer),
        "evaluations": sum("eval_runtime" in e for e in record.log_history),
        "settings": {"bf16": args.bf16, "fp16": args.fp16, "gradient_checkpointing": args.gradient_checkpointing,
                     "precompute_ref_log_probs": args.precompute_ref_log_probs, "micro_batch":
                     args.per_device_train_batch_size, "pad_to_multiple_of": args.pad_to_multiple_of,
                     "packing": bool(getattr(trainer, "packing", False))},
    }
    if peak_tflops:  # LoRA on a frozen base: forward 2N + backward through activations 2N (+ 2N reference forward)
        n = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in trainer.model.parameters())
        per_token = (4 if args.precompute_ref_log_probs else 6) * n
        result["model_tflops"] = round(per_token * tokens / train_s / 1e12, 2)
        result["mfu"] = round(result["model_tflops"] / peak_tflops, 4)
    if answer_prompts:
        result["answers_s"], result["answer_prompts"] = round(time_answers(trainer, answer_prompts), 2), len(answer_prompts)
    if profiler:
        result["profile"] = profiler.summary
    print(f"{name}: {result['pairs_per_s']} pairs/s ({result['warm_pairs_per_s']} past warm-up), "
          f"{result['tokens_per_s']} tokens/s, padding "
          f"{result['padding_fraction']}, peak RSS {result['peak_rss_mb']} MB, CUDA peak {result['cuda_peak_mb']} MB,"
          f" final loss {result['final_loss']}", flush=True)
    del meters, trainer, meter
    free_memory()
    return result


def reference_cost(trainer) -> float | None:
    """Seconds a pair of computing reference log-probs (the splits the cache missed), or None if none was computed."""
    missed = [e for e in getattr(trainer, "ref_cache_events", []) if not e["hit"]]
    pairs = sum(e["pairs"] for e in missed)
    return round(sum(e["seconds"] for e in missed) / pairs, 5) if pairs else None


def project_sweep(shape: dict, tuned: dict, evaluated: dict, hit_build_s: float, batch: int) -> dict:
    """A sweep of `shape` (sweep_shape) from what was measured: each run's training at tuned's rate past warm-up plus
    its warm-up; the build of a run that finds its reference on disk; the first run's reference over its train and
    validation pairs; and each run's evaluations while training, held-out scoring and judged answers at the rates
    of the evaluated run. That run finds the base model's held-out log-probs that the earlier rows computed
    (evaluate.BASE_LOGPS), as every sweep run after the first does. The judge model's own forwards (a Hub model) are
    not in it."""
    if tuned["warm_pairs_per_s"]:  # a 1,000-step run trains at the warm rate, after the warm-up it measured
        warmup_s = sum(tuned["step_s"][:WARMUP_STEPS]) - WARMUP_STEPS * batch / tuned["warm_pairs_per_s"]
        train_s = shape["steps"] * shape["pairs_per_step"] / tuned["warm_pairs_per_s"] + max(warmup_s, 0.0)
    else:
        train_s = shape["steps"] * shape["pairs_per_step"] / tuned["pairs_per_s"]
    monitor = shape["validation_pairs"] or shape["test_pairs"]  # what a run evaluates on while training
    evaluating_s = 0.0  # when the evaluated run failed, the projection says so and counts training and build
    if "error" not in evaluated:
        t, evals = evaluated["timings_s"], max(evaluated["evaluations"], 1)
        per_evaluation = monitor * t["evaluations"] / (evals * evaluated["eval_pairs"]) + t["answers"] / evals
        evaluating_s = shape["evaluations"] * per_evaluation \
            + shape["test_pairs"] * t["held_out"] / evaluated["test_pairs"] \
            + shape["judge_prompts"] * evaluated.get("answers_s", 0.0) / max(evaluated.get("answer_prompts", 1), 1)
    first_reference_s = (tuned["reference_s_per_pair"] or 0.0) * (shape["steps"] * shape["pairs_per_step"] + monitor)
    total_s = shape["runs"] * (train_s + hit_build_s + evaluating_s) + first_reference_s
    return {**shape, "train_s_per_run": round(train_s, 1), "build_s_per_run": round(hit_build_s, 1),
            "evaluating_s_per_run": round(evaluating_s, 1), "first_reference_s": round(first_reference_s, 1),
            "training_only_minutes": round(shape["runs"] * (train_s + hit_build_s) / 60, 1),
            "evaluation_counted": "error" not in evaluated,
            "minutes": round(total_s / 60, 1)}


def machine() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    import trl

    return {"cpu": cpu.group(1).strip() if cpu else platform.processor(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "trl": trl.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "bf16_cpu_isa": cpu_has_native_bf16()}


def markdown(report: dict) -> str:
    head = ("setup", "pairs/s", f"past {WARMUP_STEPS} steps", "tokens/s", "padding", "peak RSS MB", "peak CUDA MB",
            "MFU", "final loss", "run s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*report["setups"].values(), *report.get("levers", {}).values()]:
        if "error" in r:
            lines.append(f"| {r['setup']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        lines.append(f"| {r['setup']} | {r['pairs_per_s']:.3f} | {r.get('warm_pairs_per_s') or '—'} | "
                     f"{r['tokens_per_s']:.0f} | "
                     f"{100 * r['padding_fraction']:.0f}% | {r['peak_rss_mb']} | {r['cuda_peak_mb'] or '—'} | "
                     f"{r.get('mfu', '—')} | {r['final_loss']:.4f} | {r['run_s']:.1f} |")
    for key, check in report["targets"].items():
        lines.append(f"target {key}: {check['value']} (want {check['want']}) {'MET' if check['met'] else 'NOT MET'}")
    if report.get("sweep"):
        s = report["sweep"]
        lines.append(f"4-run sweep: tuned {s['tuned_s']} s (cache hits {s['ref_cache_hits']}) vs 4 x TRL-default "
                     f"{s['trl_4x_s']} s")
        p = s["full_projection"]
        lines.append(f"sweep_full.yaml ({p['runs']} runs x {p['steps']} steps x {p['pairs_per_step']} pairs), projected"
                     f" from these rows: {p['minutes']} min ({p['train_s_per_run']} s training + {p['build_s_per_run']}"
                     f" s build + {p['evaluating_s_per_run']} s evaluating a run, {p['first_reference_s']} s for the"
                     f" first run's reference; the judge model's forwards not counted); training and build alone:"
                     f" {p['training_only_minutes']} min"
                     + ("" if p.get("evaluation_counted", True) else " (the evaluated run failed: no evaluation counted)"))
    profiled = report.get("levers", {}).get("tuned, profiled", {}).get("profile")
    if profiled:
        lines += ["", profile_markdown(profiled), ""]
    m = report["machine"]
    lines.append(f"machine: {m['gpu'] or m['cpu']}, {m['usable_cpus']} CPUs, torch {m['torch']}, trl {m['trl']}")
    return "\n".join(lines)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps; the sweep measures one cache-hit run")
    parser.add_argument("--gpu", action="store_true", help="the full setting on CUDA: 4-bit, 512 tokens, 16 pairs")
    parser.add_argument("--steps", type=int, help="optimizer steps per setup (default: 12 CPU, 4 quick, 30 GPU)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default: 4 CPU, 16 GPU)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ", ".join(SETUPS))
    parser.add_argument("--levers", nargs="?", const="all", help="also the lever table (tuned, one lever off or on);"
                        " optionally some of its rows, separated by ';' (row names hold commas)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also one tuned run profiled (torch.profiler) over "
                        f"{PROFILED_STEPS} steps past warm-up: GPU busy share, kernel launches, .item() calls, top ops")
    parser.add_argument("--model", default="offline:gpt2-124m", help="the model every setup trains (tests: a tiny one)")
    parser.add_argument("--out", default="results/bench")
    opts = parser.parse_args(argv)
    if opts.gpu and not torch.cuda.is_available():
        return fail("--gpu needs a CUDA GPU")
    # the lever rows, checked before anything runs: "all" is this machine's set; any row can be named (a GPU row on
    # a CPU runs the same code path, so a test can catch its errors before GPU time is spent)
    table = {**LEVERS, **CPU_LEVERS, **GPU_LEVERS}
    mine = [*LEVERS, *(GPU_LEVERS if opts.gpu else CPU_LEVERS)]
    chosen = mine if opts.levers == "all" else opts.levers.split(";") if opts.levers else []
    unknown = [name for name in chosen if name not in table]
    if unknown:
        return fail(f"--levers: unknown row {unknown[0]!r}; rows: {'; '.join(table)}")
    steps = opts.steps or (30 if opts.gpu else 4 if opts.quick else 12)
    batch = opts.batch_size or (16 if opts.gpu else 4)
    tmp = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    os.environ["DPO_REF_CACHE"] = str(tmp / "ref_cache")  # a private cache: the first tuned run is a miss
    micro = batch if opts.gpu else 1  # a CPU takes one pair a forward: no padding between pairs, least memory
    base = parse(dict(model_name_or_path=opts.model, load_in_4bit=opts.gpu, dataset_name=HH_SAMPLE, max_eval_pairs=8,
                      max_length=512 if opts.gpu else 256, per_device_train_batch_size=micro,
                      gradient_accumulation_steps=batch // micro, per_device_eval_batch_size=batch, max_steps=steps,
                      learning_rate=5e-5, eval_steps=steps + 1, logging_steps=1, eval_strategy="no",
                      report_to="none", log_completions=0))  # training alone is timed: no trackers, no answers
    data = prepare_data(base)
    if len(data.train) < steps * batch:
        return fail(f"{HH_SAMPLE} has {len(data.train)} clean training pairs; {steps * batch} needed")
    data = dataclasses.replace(data, train=data.train.select(range(steps * batch)))  # one epoch, the same pairs
    peak = matmul_peak_tflops()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results, levers, sweep = {}, {}, None

    def checkpoint() -> None:  # the rows so far, on disk: a run cut short (a time limit) keeps what it measured
        (out / "partial.json").write_text(json.dumps({"machine": machine(), "setups": results, "levers": levers,
                                                      "sweep": sweep}, indent=2))

    def config(name: str, pairs_per_forward: int = 0, **settings) -> Settings:
        if pairs_per_forward:  # the same optimizer step (batch pairs) in forwards of this many pairs
            per_forward = batch if pairs_per_forward == WHOLE else pairs_per_forward
            settings.update(per_device_train_batch_size=per_forward, gradient_accumulation_steps=batch // per_forward)
        return base.replace(output_dir=str(tmp / name.replace(" ", "_")), **settings)

    for name in opts.setups.split(","):
        settings = dict(SETUPS[name])
        if name == "seed-style" and not opts.gpu:
            settings["pairs_per_forward"] = 1  # 4 pairs x 1024 tokens need ~20 GB: the same step as micro-batches
        results[name] = run_setup(name, config(name, **settings), data, peak_tflops=peak)
        checkpoint()

    def lever_row(name: str, settings: dict, **measure) -> None:
        try:
            levers[name] = run_setup(name, config(name, **settings), data, peak_tflops=peak, **measure)
        except Exception as err:  # a lever that fails (out of memory, say) is a row, not the end
            print(f"{name}: failed: {type(err).__name__}: {err}", flush=True)
            if measure.get("profiler"):
                measure["profiler"].close()  # its run ended without on_train_end: stop recording
            free_memory()
            levers[name] = {"setup": name, "error": f"{type(err).__name__}: {err}"[:300]}
        checkpoint()

    for name in chosen:
        settings = dict(table[name])
        lean = settings.pop("lean_lm_head", True)
        lever_row(name, settings, lean_lm_head=lean)
    if opts.profile:  # its own run: the profiler slows the steps it records
        lever_row("tuned, profiled", dict(max_steps=WARMUP_STEPS + PROFILED_STEPS),
                  profiler=StepProfiler(skip=WARMUP_STEPS, steps=PROFILED_STEPS))
    if not opts.no_sweep and {"tuned", "TRL-default"} <= set(results):
        runs = [results["tuned"]["run_s"]]
        for lr in ([2e-5] if opts.quick else [2e-5, 1e-4, 2e-4]):
            again = run_setup(f"sweep lr {lr}", config(f"sweep{lr}", learning_rate=lr), data, peak_tflops=peak)
            runs.append(again["run_s"])
            results["tuned"]["ref_cache_hits"] += again["ref_cache_hits"]
            checkpoint()
        runs += [runs[-1]] * (4 - len(runs))  # --quick: the measured cache-hit run stands for the other two
        sweep = {"tuned_runs_s": runs, "tuned_s": round(sum(runs), 1), "trl_4x_s": 4 * results["TRL-default"]["run_s"],
                 "hit_build_s": round(again["run_s"] - again["train_s"], 2),  # a run that finds the reference
                 "ref_cache_hits": results["tuned"]["ref_cache_hits"][::2]}  # the train split of each run
        # One more run as a sweep_full.yaml run evaluates (on fewer pairs): once while training on a validation
        # slice, with the completion prompts answered, then the held-out test pairs, and judged answers generated.
        # Its rates scale to the sweep's pair counts in the projection.
        pairs = 64 if opts.gpu else 8
        evaluated = config("sweep_evaluated", eval_strategy="steps", max_eval_pairs=pairs,
                           validation_pairs=pairs, eval_steps=steps, log_completions=2)
        eval_data = prepare_data(evaluated)  # validation off the end of train: the same first pairs to train on
        eval_data = dataclasses.replace(eval_data, train=eval_data.train.select(range(steps * batch)))
        try:
            result = run_setup("sweep run, evaluated", evaluated, eval_data, peak_tflops=peak,
                               answer_prompts=eval_data.validation["prompt"][:pairs // 4])
            sweep["evaluated_run"] = {**result, "eval_pairs": len(eval_data.validation),
                                      "test_pairs": len(eval_data.test)}
        except Exception as err:  # the projection then counts training and build only (below)
            print(f"sweep run, evaluated: failed: {type(err).__name__}: {err}", flush=True)
            free_memory()
            sweep["evaluated_run"] = {"setup": "sweep run, evaluated", "error": f"{type(err).__name__}: {err}"[:300]}
    ratio = lambda a, b: round(results[a]["pairs_per_s"] / results[b]["pairs_per_s"], 2)
    targets = {}
    if "tuned" in results:
        targets["tuned_pairs_per_s"] = results["tuned"]["pairs_per_s"]
    if {"tuned", "seed-style"} <= set(results):
        targets["tuned_vs_seed"] = ratio("tuned", "seed-style")
    if {"tuned", "TRL-default"} <= set(results):
        tuned, trl = results["tuned"], results["TRL-default"]
        targets["tuned_vs_trl"] = ratio("tuned", "TRL-default")
        targets["loss_gap_vs_trl"] = round(max(abs(a - b) for a, b in zip(tuned["losses"], trl["losses"])), 4)
        if tuned["cuda_peak_mb"] and trl["cuda_peak_mb"]:
            targets["cuda_peak_vs_trl"] = round(tuned["cuda_peak_mb"] / trl["cuda_peak_mb"], 2)
    if sweep:
        targets["sweep_vs_4_trl_runs"] = round(sweep["tuned_s"] / sweep["trl_4x_s"], 3)
        sweep["full_projection"] = project_sweep(sweep_shape(SWEEP_FULL), results["tuned"], sweep["evaluated_run"],
                                                 sweep["hit_build_s"], batch)
        targets["sweep_full_minutes"] = sweep["full_projection"]["minutes"]
    wanted = GPU_TARGETS if opts.gpu else TARGETS
    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "steps": steps, "batch_size": batch, "max_length": base.dpo.max_length, "load_in_4bit": base.model.load_in_4bit,
        "matmul_peak_tflops": peak, "setups": results, "levers": levers, "sweep": sweep,
        "targets": {k: {"value": v, "want": f"{wanted[k][0]} {wanted[k][1]}",
                        "met": v >= wanted[k][1] if wanted[k][0] == ">=" else v <= wanted[k][1]}
                    for k, v in targets.items() if k in wanted},
    }
    text = json.dumps(report, indent=2)
    (out / f"bench-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json").write_text(text)
    (out / "latest.json").write_text(text)
    print("\n" + markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
