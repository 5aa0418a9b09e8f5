"""Benchmark: the same DPO training in three setups, in one process, on the same real hh-rlhf pairs.

    python -m dpo_pipeline.bench --quick        # 4 steps, one measured cache-hit sweep run: a few minutes
    python -m dpo_pipeline.bench                # 12 steps, all sweep runs, and the lever table

Every setup trains GPT-2 124M (`offline:gpt2-124m`: the real architecture and tokenizer, random weights, fp32
weights) with a LoRA adapter (r=16, alpha 32, dropout 0.05 on c_attn/c_proj/c_fc), for the same optimizer steps,
batch size, max_length, learning rate and seed, on the same pairs: the first steps x batch_size cleaned pairs of
`../shared/data/hh-rlhf/harmless-base.jsonl.gz`, so each run is exactly one epoch and every setup trains on the same
pairs and the same real (non-pad) tokens.

    seed-style   TRL's DPOTrainer in fp32, every sequence padded to 1024 tokens (pad_to_multiple_of=1024), the
                 reference forward pass again at every step, no gradient checkpointing; each batch runs as
                 micro-batches of --seed-micro-batch pairs (gradient accumulation: the same optimizer step) because
                 4 pairs = 8 x 1024 tokens need ~20 GB
    TRL-default  DPOConfig written the way a user would: output_dir, batch size, max_length, max_steps,
                 learning_rate, report_to (+ use_cpu=True, which TRL demands on a CPU, and logging_steps=1 / seed
                 for the measurement); TRL's defaults otherwise: bf16 autocast, gradient checkpointing, reference
                 forward every step, padding to the longest sequence in the batch
    tuned        this project's path, `train.build_trainer`: bf16 autocast on a CPU with native bf16 (else fp32;
                 bf16/fp16 on CUDA), no gradient checkpointing, reference log-probs computed once and cached on
                 disk, on a CPU one pair per forward pass (gradient accumulation to the same batch: no padding
                 between pairs; on a GPU whole batches grouped by length), the LM head scoring only completion
                 tokens (TRL does that only with Triton) (refcache.py)

Measured per setup: pairs/s and non-pad tokens/s over the training steps (first optimizer step to last, every step
timed, nothing excluded; a short warm-up forward/backward runs once before the first setup so no setup pays the
process's first-use costs), the same over steps 2..N, padding fraction of the batches actually trained on, peak RSS
(kernel high-water mark, reset before each setup; the RSS before the setup is reported too), per-step losses,
construction time (model load + tokenization + reference precompute) and the end-to-end time of the run.
The sweep cost compares 4 tuned runs that share the reference cache (the first one cold: it is the tuned run above,
then three more learning rates; --quick measures one of those and counts it three times) with 4 x the one measured
TRL-default run (a run's cost: construction + training, up to the end of the last step).

Writes `<out>/bench-<timestamp>.json` and `<out>/latest.json`, prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from . import model as model_lib
from . import train as train_mod
from .data import shared_data_dir
from .profiles import DataConfig, load_data
from .refcache import CachedRefDPOTrainer

MODEL = "offline:gpt2-124m"
LORA_R = 16
SEED_STYLE_PAD = 1024
TARGETS = {"tuned_vs_seed_pairs_per_s": 4.0, "tuned_vs_trl_pairs_per_s": 1.5, "sweep_cost_vs_4_trl_runs": 0.75}


# ---------------------------------------------------------------- measuring


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_mb() -> float:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Peak resident memory over a block: the kernel's high-water mark (reset on entry via /proc/self/clear_refs),
    cross-checked by sampling every 20 ms (the only measure where clear_refs is not available)."""

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is honest
        self.baseline_mb = rss_mb()
        self.hwm_reset = False
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        self.sampled_mb = self.baseline_mb
        self.phases: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.sampled_mb = max(self.sampled_mb, rss_mb())

    def phase(self) -> float:
        """The peak so far (MB), then start a new phase: tells construction apart from training."""
        hwm = _status_kib("VmHWM")
        peak = max(self.sampled_mb, hwm / 1024) if (self.hwm_reset and hwm) else self.sampled_mb
        if self.hwm_reset:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        self.sampled_mb = rss_mb()
        self.phases.append(peak)
        return peak

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.phase()
        self.peak_mb = max(self.phases)
        self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return False


class CountingCollator:
    """Wraps the trainer's collator: counts pairs, non-pad tokens and padded positions of the training batches."""

    def __init__(self, collator):
        self.collator, self.active, self.steps = collator, False, []

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.active:
            mask = batch["attention_mask"]
            self.steps.append({"pairs": int(mask.shape[0]) // 2, "tokens": int(mask.sum()),
                               "positions": int(mask.numel()), "width": int(mask.shape[1])})
        return batch


class StepClock(TrainerCallback):
    """Wall time of every optimizer step, from the start of training to the end of the last step."""

    def __init__(self, counter: CountingCollator):
        self.counter, self.start, self.ends = counter, None, []
        self.cpu_start, self.cpu_end = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.counter.active = True
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.cpu_end = time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.counter.active = False


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else platform.processor() or "unknown"
    ram = None
    with contextlib.suppress(OSError, AttributeError):
        ram = round(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20, 1)
    import peft
    import transformers
    import trl

    info = {
        "cpu": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "ram_gib": ram, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "peft": peft.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16_cpu_isa": model_lib.cpu_has_native_bf16(),
    }
    return info


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------- the setups


def _lora(base):
    return model_lib.lora_config(base, r=LORA_R, alpha=32, dropout=0.05)


def build_seed_style(ctx) -> object:
    """The seed's way: fp32, every example padded to 1024 tokens, reference forward at every step."""
    base = model_lib.load_base_model(MODEL, load_in_4bit=False)
    micro = ctx.seed_micro_batch  # 8 sequences x 1024 tokens need ~20 GB: the same batch, as micro-batches
    args = DPOConfig(
        output_dir=str(ctx.tmp / "seed-style"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=ctx.batch_size // micro, max_length=ctx.max_length, max_steps=ctx.steps,
        learning_rate=ctx.learning_rate, report_to="none",
        use_cpu=not torch.cuda.is_available(), logging_steps=1, seed=ctx.seed, save_strategy="no",
        bf16=False, fp16=False, gradient_checkpointing=False, precompute_ref_log_probs=False,
        pad_to_multiple_of=SEED_STYLE_PAD,
    )
    return DPOTrainer(model=base, args=args, train_dataset=ctx.data.train, eval_dataset=ctx.data.test,
                      processing_class=ctx.tokenizer, peft_config=_lora(base))


def build_trl_default(ctx) -> object:
    """TRL's defaults, written the way a user would (plus use_cpu, which TRL insists on without a GPU)."""
    model = AutoModelForCausalLM.from_pretrained(model_lib.resolve_model_path(MODEL))
    args = DPOConfig(
        output_dir=str(ctx.tmp / "trl-default"), per_device_train_batch_size=ctx.batch_size,
        max_length=ctx.max_length, max_steps=ctx.steps, learning_rate=ctx.learning_rate, report_to="none",
        **({} if torch.cuda.is_available() else {"use_cpu": True}),
        logging_steps=1, seed=ctx.seed,  # for the measurement: per-step losses, the same seed as the others
    )
    return DPOTrainer(model=model, args=args, train_dataset=ctx.data.train, eval_dataset=ctx.data.test,
                      processing_class=ctx.tokenizer, peft_config=_lora(model))


def build_tuned(ctx, learning_rate: float | None = None, **overrides) -> object:
    """This project's path: train.build_trainer with a RunConfig; `overrides` switch single levers off."""
    lean = overrides.pop("_lean", True)
    config = train_mod.RunConfig(
        model=MODEL, load_in_4bit=False, lora_r=LORA_R, lora_alpha=32, lora_dropout=0.05,
        learning_rate=learning_rate or ctx.learning_rate, batch_size=ctx.batch_size, max_steps=ctx.steps,
        max_length=ctx.max_length, eval_steps=ctx.steps + 1, logging_steps=1, seed=ctx.seed,
        output_dir=str(ctx.tmp / "tuned"), **overrides,
    )
    # No evaluation (transformers 5 evaluates at the end of training under eval_strategy="steps"): the benchmark
    # times training; the other setups do not evaluate either.
    trainer = train_mod.build_trainer(config, ctx.data, tokenizer=ctx.tokenizer, eval_strategy="no")
    trainer.LEAN_LM_HEAD = lean  # the lever table's "TRL's CPU LM head" row (the construction used the lean one)
    return trainer


def run_setup(ctx, name: str, build) -> dict:
    """Construct (timed), train (timed per step), and measure one setup; frees everything afterwards."""
    print(f"\n=== {name} ===", flush=True)
    _free_memory()
    set_seed(ctx.seed)  # the same LoRA initialisation and data order for every setup
    load_before = _load_average()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        trainer = build()
        constructed = time.perf_counter()
        construct_rss = rss_mb()
        mem.phase()
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        clock = StepClock(counter)
        trainer.add_callback(clock)
        trainer.train()
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e and "step" in e]
    events = getattr(trainer, "ref_cache_events", [])
    prepare = getattr(trainer, "prepare_seconds", {})
    args = trainer.args
    steps = counter.steps
    pairs, tokens, positions = (sum(s[k] for s in steps) for k in ("pairs", "tokens", "positions"))
    train_s = clock.ends[-1] - clock.start
    later = steps[1:]
    later_s = clock.ends[-1] - clock.ends[0] if len(clock.ends) > 1 else float("nan")
    result = {
        "setup": name,
        "settings": {"bf16": bool(args.bf16), "fp16": bool(args.fp16),
                     "gradient_checkpointing": bool(args.gradient_checkpointing),
                     "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
                     "pad_to_multiple_of": args.pad_to_multiple_of,
                     "train_sampling_strategy": str(getattr(args, "train_sampling_strategy", "random")),
                     "optim": str(args.optim), "learning_rate": args.learning_rate},
        "steps": trainer.state.global_step,
        "pairs": pairs,
        "non_pad_tokens": tokens,
        "padded_positions": positions,
        "padding_fraction": round(1 - tokens / positions, 4) if positions else None,
        "batch_widths": [s["width"] for s in steps],
        "train_s": round(train_s, 2),
        "pairs_per_s": round(pairs / train_s, 4),
        "tokens_per_s": round(tokens / train_s, 1),
        "steady_pairs_per_s": round(sum(s["pairs"] for s in later) / later_s, 4) if later else None,
        "step_s": [round(b - a, 2) for a, b in zip([clock.start, *clock.ends[:-1]], clock.ends)],
        "construct_s": round(constructed - t0, 2),
        "precompute_ref_s": round(sum(e["seconds"] for e in events if not e["hit"]), 2) if events else 0.0,
        "ref_cache": [{k: e[k] for k in ("split", "mode", "hit", "pairs", "cached", "computed", "seconds")}
                      for e in events],
        "ref_rows_computed_in_steps": getattr(trainer, "ref_rows_computed_in_steps", None),
        "tokenize_s": round(sum(prepare.values()), 2) if prepare else None,
        "run_s": round(clock.ends[-1] - t0, 2),  # construction + training; the final save/eval is left out
        "end_to_end_pairs_per_s": round(pairs / (clock.ends[-1] - t0), 4),
        # CPU time of the process over the training steps (all threads): less sensitive to other jobs than wall time
        "train_cpu_s": round(clock.cpu_end - clock.cpu_start, 2),
        "pairs_per_cpu_s": round(pairs / (clock.cpu_end - clock.cpu_start), 4),
        "baseline_rss_mb": round(mem.baseline_mb),
        "peak_rss_mb": round(mem.peak_mb),
        "peak_rss_above_baseline_mb": round(mem.peak_mb - mem.baseline_mb),
        "construct_peak_rss_mb": round(mem.phases[0]), "rss_after_construct_mb": round(construct_rss),
        "train_peak_rss_mb": round(mem.phases[1]),
        "peak_rss_source": "VmHWM (reset per setup)" if mem.hwm_reset else "sampled every 20 ms",
        "cuda_peak_mb": round(mem.cuda_peak_mb) if mem.cuda_peak_mb is not None else None,
        "losses": [round(x, 6) for x in losses],
        "final_loss": round(losses[-1], 6) if losses else None,
        "mean_loss": round(sum(losses) / len(losses), 6) if losses else None,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
    }
    print(f"{name}: {result['pairs_per_s']} pairs/s, {result['tokens_per_s']} tokens/s, padding "
          f"{result['padding_fraction']}, peak RSS {result['peak_rss_mb']} MB, final loss {result['final_loss']}, "
          f"construct {result['construct_s']} s, train {result['train_s']} s", flush=True)
    del trainer, counter, clock
    _free_memory()
    return result


class Context:
    def __init__(self, opts):
        self.steps, self.batch_size, self.max_length = opts.steps, opts.batch_size, opts.max_length
        self.learning_rate, self.seed = opts.learning_rate, opts.seed
        self.seed_micro_batch = opts.seed_micro_batch
        self.tmp = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
        self.data = self.tokenizer = self.full_train = None


def load_pairs(ctx, eval_pairs: int):
    """The first steps x batch_size cleaned hh-rlhf training pairs (one epoch), and a few held-out pairs."""
    source = shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"
    ctx.tokenizer = model_lib.load_tokenizer(MODEL)
    data = load_data(DataConfig(source=str(source), max_eval_pairs=eval_pairs), ctx.tokenizer, ctx.max_length)
    n = ctx.steps * ctx.batch_size
    if len(data.train) < n:
        raise SystemExit(f"error: {source} has {len(data.train)} clean training pairs; {n} needed")
    ctx.full_train = data.train
    data.train = data.train.select(range(n))
    ctx.data = data
    return source


def warm_up(ctx):
    """One small forward/backward in fp32 and under bf16 autocast, so no setup pays first-use kernel costs."""
    model = model_lib.load_base_model(MODEL, load_in_4bit=False)
    ids = torch.randint(0, 50000, (2, 64), device=model.device)
    for dtype in (None, torch.bfloat16):
        ctx_mgr = torch.autocast(model.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx_mgr:
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    del model
    _free_memory()


def tokenization_cost(ctx) -> dict:
    """TRL's dataset preparation (eos, tokenize, filter) of the full training split, timed once."""
    args = DPOConfig(output_dir=str(ctx.tmp / "tok"), max_length=ctx.max_length, report_to="none",
                     **({} if torch.cuda.is_available() else {"use_cpu": True}))
    probe = CachedRefDPOTrainer.__new__(CachedRefDPOTrainer)  # only _prepare_dataset is used: no model needed
    probe._tokenizer = ctx.tokenizer
    t0 = time.perf_counter()
    try:
        CachedRefDPOTrainer._prepare_dataset(probe, ctx.full_train, ctx.tokenizer, args, "train")
    except Exception as err:  # noqa: BLE001 - a side measurement must not lose the benchmark
        return {"pairs": len(ctx.full_train), "seconds": None, "error": f"{type(err).__name__}: {err}"}
    return {"pairs": len(ctx.full_train), "seconds": round(time.perf_counter() - t0, 2)}


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def summarize(results: dict, sweep: dict | None) -> dict:
    s, t, u = (results.get(k) for k in ("seed-style", "TRL-default", "tuned"))
    ratios = {}
    if u and s:
        ratios.update(tuned_vs_seed_pairs_per_s=_ratio(u["pairs_per_s"], s["pairs_per_s"]),
                      tuned_vs_seed_tokens_per_s=_ratio(u["tokens_per_s"], s["tokens_per_s"]),
                      tuned_vs_seed_peak_rss=_ratio(u["peak_rss_mb"], s["peak_rss_mb"]))
    if u and t:
        ratios.update(tuned_vs_trl_pairs_per_s=_ratio(u["pairs_per_s"], t["pairs_per_s"]),
                      tuned_vs_trl_tokens_per_s=_ratio(u["tokens_per_s"], t["tokens_per_s"]),
                      tuned_vs_trl_end_to_end=_ratio(u["end_to_end_pairs_per_s"], t["end_to_end_pairs_per_s"]),
                      tuned_vs_trl_peak_rss=_ratio(u["peak_rss_mb"], t["peak_rss_mb"]),
                      tuned_vs_trl_peak_rss_above_baseline=_ratio(u["peak_rss_above_baseline_mb"],
                                                                   t["peak_rss_above_baseline_mb"]))
    if t and s:
        ratios["trl_vs_seed_pairs_per_s"] = _ratio(t["pairs_per_s"], s["pairs_per_s"])
    if sweep:
        ratios["sweep_cost_vs_4_trl_runs"] = sweep.get("ratio")
    checks = {}
    for key, bound in TARGETS.items():
        value = ratios.get(key)
        if value is not None:
            checks[key] = {"value": value, "target": (f"<= {bound}" if key.startswith("sweep") else f">= {bound}"),
                           "met": value <= bound if key.startswith("sweep") else value >= bound}
    if u and t:
        checks["peak_rss_not_above_trl_default"] = {"value": u["peak_rss_mb"], "target": f"<= {t['peak_rss_mb']}",
                                                    "met": u["peak_rss_mb"] <= t["peak_rss_mb"]}
    return {"ratios": ratios, "targets": checks}


def loss_agreement(results: dict) -> dict:
    """Per-step loss differences: setups that train on the same batches (random order) should agree to noise."""
    out = {}
    ref = results.get("seed-style")
    for name, r in results.items():
        if ref is None or name == "seed-style" or not r.get("losses"):
            continue
        same_batches = r["settings"]["train_sampling_strategy"] == "random"
        diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
        out[name] = {"same_batches_as_seed_style": same_batches,
                     "max_abs_step_loss_diff": round(max(diffs), 6) if diffs else None,
                     "mean_loss_diff": round(r["mean_loss"] - ref["mean_loss"], 6)}
    return out


def markdown(report: dict) -> str:
    rows = [("setup", "pairs/s", "tokens/s", "padding", "peak RSS MB (above start)", "final loss", "mean loss",
             "train s", "construct s (ref precompute)", "run s")]
    for r in [*report["setups"].values(), *report.get("levers", {}).values()]:
        rows.append((r["setup"], f"{r['pairs_per_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{100 * r['padding_fraction']:.0f}%", f"{r['peak_rss_mb']} (+{r['peak_rss_above_baseline_mb']})",
                     f"{r['final_loss']:.4f}", f"{r['mean_loss']:.4f}", f"{r['train_s']:.1f}",
                     f"{r['construct_s']:.1f} ({r['precompute_ref_s']:.1f})", f"{r['run_s']:.1f}"))
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows[1:]]
    ratios = report["summary"]["ratios"]
    lines.append("")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    sweep = report.get("sweep")
    if sweep:
        lines.append(f"4-config sweep: tuned {sweep['tuned_s']} s (runs {sweep['tuned_runs_s']}, reference cache "
                     f"{'/'.join('hit' if h else 'miss' for h in sweep['ref_cache_hits'])}) vs 4 x TRL-default "
                     f"{sweep['trl_default_4x_s']} s (4 x one measured run): ratio {sweep['ratio']}")
    for key, check in report["summary"]["targets"].items():
        lines.append(f"target {key}: {check['value']} (want {check['target']}) {'MET' if check['met'] else 'NOT MET'}")
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, {m['torch_threads']} torch threads, "
                 f"{m['ram_gib']} GiB RAM" + (f", GPU {m['cuda']}" if m["cuda"] else "")
                 + f"; load average before/after {report['load_average_start']} / {report['load_average_end']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="4 steps, one measured cache-hit sweep run, no lever table: a few minutes on 2 cores")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per setup (default 12; quick 4)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-pairs", type=int, default=8, help="held-out pairs given to every trainer")
    parser.add_argument("--seed-micro-batch", type=int, default=2,
                        help="seed-style runs each batch as micro-batches of this many pairs (gradient accumulation, "
                             "the same optimizer step): 4 pairs = 8 x 1024-token sequences need ~20 GB (default 2)")
    parser.add_argument("--setups", default="seed-style,TRL-default,tuned",
                        help="comma-separated subset of seed-style,TRL-default,tuned")
    parser.add_argument("--no-sweep", action="store_true", help="skip the 4-config sweep cost")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=None,
                        help="the lever table (default: on, off with --quick)")
    parser.add_argument("--out", default="results/bench")
    opts = parser.parse_args(argv)
    opts.steps = opts.steps or (4 if opts.quick else 12)
    opts.seed_micro_batch = min(opts.seed_micro_batch, opts.batch_size)
    if opts.batch_size % opts.seed_micro_batch:
        parser.error("--batch-size must be a multiple of --seed-micro-batch")
    levers = (not opts.quick) if opts.levers is None else opts.levers
    if opts.max_length > SEED_STYLE_PAD:
        parser.error(f"--max-length must be <= {SEED_STYLE_PAD} (GPT-2's context)")
    names = [n.strip() for n in opts.setups.split(",") if n.strip()]
    unknown = set(names) - {"seed-style", "TRL-default", "tuned"}
    if unknown:
        parser.error(f"unknown setup(s) {sorted(unknown)}")

    os.environ.setdefault("TQDM_DISABLE", "1")
    ctx = Context(opts)
    ref_cache = ctx.tmp / "ref_cache"  # private and empty: the tuned run's reference precompute is a cold miss
    os.environ["DPO_REF_CACHE"] = str(ref_cache)
    started = dt.datetime.now()
    report = {"command": " ".join(["python -m dpo_pipeline.bench", *(argv if argv is not None else sys.argv[1:])]),
              "started": started.isoformat(timespec="seconds"), "machine": machine(),
              "load_average_start": _load_average()}
    try:
        source = load_pairs(ctx, opts.eval_pairs)
        report["settings"] = {
            "model": MODEL, "lora_r": LORA_R, "steps": ctx.steps, "batch_size": ctx.batch_size,
            "max_length": ctx.max_length, "learning_rate": ctx.learning_rate, "seed": ctx.seed,
            "data": str(source), "train_pairs": len(ctx.data.train), "eval_pairs": len(ctx.data.test),
            "timing": "every optimizer step, training start to last step end; warm-up forward/backward before the "
                      "first setup; model load, tokenization and reference precompute are in construct_s",
        }
        print(f"{len(ctx.data.train)} training pairs ({ctx.steps} steps x batch {ctx.batch_size}), max_length "
              f"{ctx.max_length}, {len(ctx.data.test)} eval pairs; machine {report['machine']['cpu']}, "
              f"{report['machine']['torch_threads']} torch threads", flush=True)
        warm_up(ctx)
        builders = {"seed-style": lambda: build_seed_style(ctx), "TRL-default": lambda: build_trl_default(ctx),
                    "tuned": lambda: build_tuned(ctx)}
        results = {name: run_setup(ctx, name, builders[name]) for name in names}
        report["setups"] = results

        sweep = None
        if not opts.no_sweep and "tuned" in results and "TRL-default" in results:
            factors = (2.0, 0.5, 4.0)
            runs = [results["tuned"]]
            for factor in factors[:1] if opts.quick else factors:
                lr = ctx.learning_rate * factor
                runs.append(run_setup(ctx, f"sweep lr={lr:g}", lambda lr=lr: build_tuned(ctx, learning_rate=lr)))
            measured = [r["run_s"] for r in runs]
            # --quick measures one cache-hit run and counts it for the three runs that hit the cache
            run_costs = measured + [measured[-1]] * (4 - len(measured))
            tuned_s = sum(run_costs)
            trl_s = 4 * results["TRL-default"]["run_s"]
            sweep = {"tuned_runs_s": run_costs, "measured_runs": len(measured), "tuned_s": round(tuned_s, 1),
                     "learning_rates": [ctx.learning_rate * f for f in (1.0, *factors)],
                     "ref_cache_hits": [any(e["hit"] for e in r["ref_cache"] if e["split"] == "train")
                                        for r in runs],
                     "trl_default_4x_s": round(trl_s, 1), "ratio": round(tuned_s / trl_s, 3),
                     "note": "tuned: 4 runs sharing the reference cache (the first is the tuned run above, cold "
                             "cache; the others hit it" + ("; --quick measures one of them and counts it 3 times"
                                                           if opts.quick else "") + "); TRL-default: 4 x the one "
                             "measured TRL-default run; a run's cost is construction + training",
                     "runs": runs[1:]}
            report["sweep"] = sweep

        if levers and "tuned" in results:
            lever_builds = {
                "tuned + gradient checkpointing": lambda: build_tuned(ctx, gradient_checkpointing=True),
                "tuned - ref cache (ref forward every step)": lambda: build_tuned(ctx, precompute_ref=False),
                "tuned, whole batch per forward (no micro-batches)":
                    lambda: build_tuned(ctx, micro_batch_size=ctx.batch_size, group_by_length=False),
                "tuned, whole batch per forward + length grouping":
                    lambda: build_tuned(ctx, micro_batch_size=ctx.batch_size, group_by_length=True),
                "tuned - lean LM head (TRL's CPU LM head)": lambda: build_tuned(ctx, _lean=False),
            }
            if results["tuned"]["settings"]["bf16"]:
                lever_builds["tuned in fp32 (no bf16 autocast)"] = lambda: build_tuned(ctx, precision="fp32")
            elif not torch.cuda.is_available():
                lever_builds["tuned + bf16 autocast"] = lambda: build_tuned(ctx, precision="bf16")
            report["levers"] = {name: run_setup(ctx, name, build) for name, build in lever_builds.items()}

        report["tokenization"] = tokenization_cost(ctx)
        report["loss_agreement"] = loss_agreement({**results, **report.get("levers", {})})
        report["summary"] = summarize(results, sweep)
        report["load_average_end"] = _load_average()
        report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
    for path in (out / name, out / "latest.json"):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, path)
    table = markdown(report)
    print("\n" + table)
    print(f"\nTRL tokenization of the full {report['tokenization']['pairs']}-pair train split: "
          f"{report['tokenization']['seconds']} s")
    print(f"wrote {out / name} and {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
