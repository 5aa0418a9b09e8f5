"""Where a training step's time goes, for `bench.py --profile`: torch.profiler over a few steps past warm-up.

A 16-pair step of GPT-2 124M is short on a GPU, so it may be bound by the CPU launching kernels (and by the
`.item()` calls in TRL's metrics, each of which waits for the GPU) rather than by arithmetic. The summary says which:
per step, wall time, GPU busy time (the kernels' own durations), kernel launches and `.item()` calls, and the ops
that take the most time. The profiler slows the steps it records, so these steps are not used for pairs/s.
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class StepProfiler(TrainerCallback):
    """Records optimizer steps `skip + 1` to `skip + steps` (after `skip` warm-up steps); `summary` once done."""

    def __init__(self, skip: int = 2, steps: int = 3):
        assert skip >= 1, "the wall time of the first recorded step runs from the end of the one before"
        self.steps, self.summary, self.ends, self.running = steps, None, [], False
        cuda = torch.cuda.is_available()
        self.profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                                schedule=schedule(wait=skip - 1, warmup=1, active=steps, repeat=1),
                                on_trace_ready=self._summarize)

    def on_train_begin(self, args, state, control, **kwargs):
        self.profiler.start()
        self.running = True

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())  # a step's wall time: from the end of the step before (loading included)
        self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.running:
            self.profiler.stop()
            self.running = False

    def _summarize(self, prof) -> None:
        try:
            self.summary = self._summary(prof)
        except Exception as err:  # a profile is a diagnosis: it must not cost the benchmark its other numbers
            self.summary = {"error": f"{type(err).__name__}: {err}"}

    def _summary(self, prof) -> dict:
        events, steps = prof.events(), self.steps
        wall_s = self.ends[-1] - self.ends[-1 - steps]
        per_step = lambda x: round(x / steps, 1)
        device = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", 0)]
        busy_ms = sum(e.self_device_time_total for e in device) / 1000  # kernels on concurrent streams count twice
        # CPU-side ops, their kernels' time attributed to them (the kernels' own rows would count it twice), without
        # the steps' own markers
        ops = [e for e in prof.key_averages()
               if e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]
        by_op = sorted(ops, key=lambda e: e.self_device_time_total if device else e.self_cpu_time_total, reverse=True)
        return {
            "steps": steps, "wall_ms_per_step": per_step(1000 * wall_s),
            "gpu_busy_ms_per_step": per_step(busy_ms) if device else None,
            "gpu_busy_share": round(busy_ms / (1000 * wall_s), 3) if device else None,
            "kernel_launches_per_step": per_step(sum(e.name in LAUNCHES for e in events)) if device else None,
            "item_calls_per_step": per_step(sum(e.name == "aten::_local_scalar_dense" for e in events)),
            "cpu_ops_per_step": per_step(sum(e.name.startswith("aten::") for e in events)),
            "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
                         "self_gpu_ms": round(e.self_device_time_total / 1000, 2) if device else None}
                        for e in by_op[:12]],
        }


def markdown(summary: dict) -> str:
    if "error" in summary:
        return f"profile failed: {summary['error']}"
    gpu = summary["gpu_busy_ms_per_step"] is not None
    lines = [f"profiled {summary['steps']} steps: {summary['wall_ms_per_step']} ms a step"
             + (f", GPU busy {summary['gpu_busy_ms_per_step']} ms ({100 * summary['gpu_busy_share']:.0f}%), "
                f"{summary['kernel_launches_per_step']} kernel launches" if gpu else "")
             + f", {summary['item_calls_per_step']} .item() calls, {summary['cpu_ops_per_step']} aten ops a step",
             "", "| op | calls | self CPU ms | self GPU ms |", "|---|---|---|---|"]
    lines += [f"| {o['op'][:60]} | {o['calls']} | {o['self_cpu_ms']} | {o['self_gpu_ms'] if gpu else '—'} |"
              for o in summary["top_ops"]]
    return "\n".join(lines)
