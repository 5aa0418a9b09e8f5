"""The notebook's named configurations, and turning one (plus overrides) into a data config and a run config.

    full   Hub GPT-2 + Anthropic/hh-rlhf, 4-bit NF4, LoRA, on a CUDA GPU          (the real thing)
    cpu    offline GPT-2 124M shape (random weights) + the real hh-rlhf sample, a short run on a CPU
    pretrained-cpu  SmolLM2-135M-Instruct (a real pretrained model, offline) + the real hh-rlhf sample, on a CPU
    smoke  offline tiny GPT-2 + the synthetic preference set, 1-2 minutes on a CPU
    auto   `full` when CUDA and the Hub are both available, else `smoke`
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import (PreferenceData, drop_truncation_ties, load_preferences, resolve_prompt_format, shared_data_dir,
                   to_chat_template)
from .hub import hub_reachable
from .synthetic import get_synthetic
from .train import RunConfig, write_json_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    return Path(os.environ.get("DPO_RESULTS_DIR", PROJECT_ROOT / "results"))


@dataclass
class DataConfig:
    source: str = "Anthropic/hh-rlhf"  # Hub dataset id, local file, or "synthetic"
    data_dir: str | None = None  # Hub subset, e.g. "harmless-base" for Anthropic/hh-rlhf
    max_pairs: int | None = None  # keep the first N cleaned pairs (before the split)
    max_eval_pairs: int | None = None  # evaluate on the first N held-out pairs (eval passes cost time)
    test_fraction: float = 0.2  # for single-split sources
    split_seed: int = 42
    prompt_format: str = "auto"  # "auto": the model's chat template if it has one, else Human/Assistant text
    validation_pairs: int | None = None  # hold out the last N train pairs to evaluate on while training


PROFILES: dict[str, dict] = {
    "full": dict(
        model="openai-community/gpt2", load_in_4bit=True, source="Anthropic/hh-rlhf", max_eval_pairs=2000,
        max_length=512, batch_size=8, grad_accum=2, learning_rate=5e-5, beta=0.1, max_steps=2000,
        eval_steps=250, logging_steps=25,
    ),
    "cpu": dict(
        model="offline:gpt2-124m", load_in_4bit=False,
        source=str(shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"), max_eval_pairs=32,
        max_length=256, batch_size=4, learning_rate=5e-5, beta=0.1, max_steps=12, eval_steps=6, logging_steps=2,
    ),
    "pretrained-cpu": dict(
        model="offline:smollm2-135m", load_in_4bit=False,  # 4-bit is slower than fp32 on this CPU; it saves memory
        source=str(shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"), validation_pairs=64,
        max_length=256, batch_size=4, learning_rate=1e-4, beta=0.1, epochs=1, eval_steps=50, logging_steps=10,
    ),
    "smoke": dict(
        model="offline:gpt2-tiny", load_in_4bit=True, source="synthetic", max_pairs=400,
        max_length=64, batch_size=8, learning_rate=1e-3, beta=0.1, max_steps=30, eval_steps=15, logging_steps=5,
    ),
}


def pick_profile(profile: str = "auto") -> tuple[str, str]:
    """(profile name, why it was picked)."""
    if profile != "auto":
        if profile not in PROFILES:
            raise ValueError(f"Unknown profile {profile!r}; choose one of auto, {', '.join(PROFILES)}")
        return profile, "asked for"
    cuda, hub = torch.cuda.is_available(), hub_reachable()
    if cuda and hub:
        return "full", "a CUDA GPU and the Hugging Face Hub are both available"
    missing = " and ".join(x for x, ok in (("no CUDA GPU", cuda), ("no Hub access", hub)) if not ok)
    return "smoke", f"{missing}: running the offline smoke profile (pass profile='cpu' for real data on a CPU)"


def build_configs(profile: str = "auto", **overrides) -> tuple[str, str, DataConfig, RunConfig]:
    """Profile defaults, then every non-None override (the notebook's papermill parameters) on top."""
    name, why = pick_profile(profile)
    values = {**PROFILES[name], **{k: v for k, v in overrides.items() if v is not None}}
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = set(values) - data_fields - run_fields
    if unknown:
        raise ValueError(f"Unknown parameter(s) {sorted(unknown)}; known: {sorted(data_fields | run_fields)}")
    values.setdefault("output_dir", str(results_dir() / f"run-{name}"))
    data_config = DataConfig(**{k: v for k, v in values.items() if k in data_fields})
    run_config = RunConfig(**{k: v for k, v in values.items() if k in run_fields})
    return name, why, data_config, run_config


def load_data(config: DataConfig, tokenizer, max_length: int) -> PreferenceData:
    """Cleaned train/test pairs for a data config, with the token-level cleaning for this tokenizer and length."""
    if config.source == "synthetic":
        data = get_synthetic(n_pairs=config.max_pairs or 600, split_seed=config.split_seed,
                             test_fraction=config.test_fraction)
    else:
        data = load_preferences(config.source, data_dir=config.data_dir, split_seed=config.split_seed,
                                test_fraction=config.test_fraction, max_pairs=config.max_pairs)
    if resolve_prompt_format(config.prompt_format, tokenizer) == "chat":
        data = to_chat_template(data, tokenizer)
    data = drop_truncation_ties(data, tokenizer, max_length)
    if config.max_eval_pairs is not None and len(data.test) > config.max_eval_pairs:
        data.test = data.test.select(range(config.max_eval_pairs))
        data.report.splits["test (evaluated)"] = config.max_eval_pairs
    if config.validation_pairs:  # settings are picked on these, never on the test split
        n = len(data.train) - config.validation_pairs
        data.validation, data.train = data.train.select(range(n, len(data.train))), data.train.select(range(n))
        data.report.splits.update({"train": len(data.train), "validation": len(data.validation)})
    return data


def save_cleaning_report(report, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "cleaning_report.json"
    write_json_atomic(path, report.as_dict())
    return path
