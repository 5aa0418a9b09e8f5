"""Settings: one `RunConfig` defines one run (data, model, LoRA, DPO, training), and one rule says where values come
from. Later layers win:

    RunConfig defaults  <  profile  <  sweep file `base:`  <  grid values / notebook parameters / CLI flags

Profiles (the notebook's `profile` parameter):
    full            Hub GPT-2 + Anthropic/hh-rlhf, 4-bit NF4, LoRA, on a CUDA GPU          (the real thing)
    cpu             offline GPT-2 124M shape (random weights) + the real hh-rlhf sample, a short run on a CPU
    pretrained-cpu  SmolLM2-135M-Instruct (a real pretrained model, offline) + the real hh-rlhf sample, on a CPU
    smoke           offline tiny GPT-2 + the synthetic preference set, a minute on a CPU
    auto            `full` when CUDA and the Hub are both available, else `smoke`
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real data shared between checkouts: $DPO_SHARED_DATA, else <repo root>/../shared/data."""
    return Path(os.environ.get("DPO_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")


HH_SAMPLE = str(shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz")


class ConfigError(ValueError):
    """A setting the user gave that cannot be used; the message is one line."""


@dataclass
class RunConfig:
    """Everything that defines one run. One config = one run; a sweep varies these fields."""

    # data
    source: str = "Anthropic/hh-rlhf"  # Hub dataset id, local .jsonl/.jsonl.gz/.json/.parquet file, or "synthetic"
    data_dir: str | None = None  # Hub subset, e.g. "harmless-base" for Anthropic/hh-rlhf
    max_pairs: int | None = None  # keep the first N cleaned pairs (before the split)
    max_eval_pairs: int | None = None  # score the first N held-out pairs (seeded order; eval passes cost time)
    validation_pairs: int | None = None  # hold out the last N train pairs to evaluate on while training
    test_fraction: float = 0.2  # for single-split sources
    split_seed: int = 42
    prompt_format: str = "auto"  # "auto": the model's chat template if it has one, else Human/Assistant text
    # model
    model: str = "openai-community/gpt2"  # Hub id, local checkpoint folder, or offline:<name>
    load_in_4bit: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: every attention and MLP projection of the architecture
    # DPO and training
    beta: float = 0.1
    loss_type: str = "sigmoid"  # passed through to TRL: sigmoid, ipo, hinge, robust, ...
    learning_rate: float = 5e-5
    optimizer: str = "adamw"  # adamw | rmsprop (or any transformers optimizer name)
    batch_size: int = 4  # pairs per optimizer step and device (x grad_accum)
    grad_accum: int = 1
    micro_batch_size: int = 0  # pairs per forward pass; 0: auto (1 on a CPU: no padding between pairs; batch on GPU)
    micro_batch_tokens: int = 0  # > 0: each forward takes whole packed rows up to this many positions (packing;
    # a row holds up to 2 x max_length), however many pairs that is, in place of micro_batch_size
    eval_batch_size: int = 0  # pairs per no-grad forward (reference, evaluations, held-out scoring); 0: batch_size
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    max_length: int = 512  # prompt + completion tokens
    eval_steps: int = 50
    logging_steps: int = 10
    seed: int = 42
    gradient_checkpointing: bool = False  # TRL turns it on by default; small models train faster without it
    precision: str = "auto"  # fp32 | bf16 | fp16 autocast; auto picks by hardware (model.mixed_precision)
    precompute_ref: bool = True  # reference log-probs computed once, cached on disk and shared (refcache.py)
    packing: bool = True  # each pair one sequence, its prompt once; pairs share rows, no padding (packing.py)
    compile_model: bool = False  # torch.compile the transformer stack while training: one graph for all shapes
    judge: str | None = None  # judged generations after training: "proxy" (a reward model trained here on the train
    judge_prompts: int = 32  # split), a Hub reward model id, a folder, or "none"; on this many validation (else
    # test) prompts
    report_to: str = "tensorboard"  # trackers, comma-separated: tensorboard | trackio | wandb | mlflow | none
    log_completions: int = 2  # answers to this many fixed validation prompts at every evaluation (0: none)
    trainer: str = "tuned"  # tuned: refcache.CachedRefDPOTrainer + the CPU levers | trl: TRL's DPOTrainer as is
    trl_args: dict = field(default_factory=dict)  # any other DPOConfig field, passed to TRL as is
    output_dir: str = "results/run"

    def __post_init__(self):
        for name in FIELDS:
            setattr(self, name, checked_value(name, getattr(self, name)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f.type for f in dataclasses.fields(RunConfig)}  # name -> annotation, as text

PROFILES: dict[str, dict] = {
    "full": dict(
        model="openai-community/gpt2", load_in_4bit=True, source="Anthropic/hh-rlhf", max_eval_pairs=2000,
        validation_pairs=2000,  # evaluated while training and picked on; the 2,000 test pairs only at the end
        max_length=512, batch_size=16, learning_rate=5e-5,  # 16 pairs a forward: 135 pairs/s on an H100 unpacked
        judge="OpenAssistant/reward-model-deberta-v3-large-v2", judge_prompts=64, beta=0.1, max_steps=2000,
        eval_steps=250, logging_steps=25,
    ),
    "cpu": dict(
        model="offline:gpt2-124m", load_in_4bit=False, source=HH_SAMPLE, max_eval_pairs=32, validation_pairs=32,
        max_length=256, batch_size=4, learning_rate=5e-5, beta=0.1, max_steps=12, eval_steps=6, logging_steps=2,
    ),
    "pretrained-cpu": dict(
        model="offline:smollm2-135m", load_in_4bit=False,  # 4-bit is slower than fp32 on this CPU; it saves memory
        source=HH_SAMPLE, validation_pairs=64, judge="proxy", judge_prompts=32,
        max_length=256, batch_size=4, learning_rate=1e-4, beta=0.1, epochs=1, eval_steps=50, logging_steps=10,
    ),
    "smoke": dict(
        model="offline:gpt2-tiny", load_in_4bit=True, source="synthetic", max_pairs=400, judge="proxy", judge_prompts=8,
        max_length=64, batch_size=8, learning_rate=1e-3, beta=0.1, max_steps=30, eval_steps=15, logging_steps=5,
    ),
}
# The sweep the notebook runs for each profile (its `sweep_spec` parameter overrides it): the CPU-sized SmolLM2 sweep
# for pretrained-cpu (configs/sweep_smollm2.yaml is its GPU-sized version).
PROFILE_SWEEPS = {"full": "sweep_full.yaml", "cpu": "sweep_cpu.yaml", "pretrained-cpu": "sweep_smollm2_cpu.yaml",
                  "smoke": "sweep_smoke.yaml"}


def sweep_file(profile: str) -> Path:
    return PROJECT_ROOT / "configs" / PROFILE_SWEEPS[profile]


def results_dir() -> Path:
    return Path(os.environ.get("DPO_RESULTS_DIR", PROJECT_ROOT / "results"))


def cache_dir() -> Path:
    """Where offline checkpoints and cached reference log-probs are written (override with DPO_PIPELINE_CACHE)."""
    return Path(os.environ.get("DPO_PIPELINE_CACHE", Path.home() / ".cache" / "dpo_pipeline"))


def pick_profile(profile: str = "auto") -> tuple[str, str]:
    """(profile name, why it was picked)."""
    if profile != "auto":
        if profile not in PROFILES:
            raise ConfigError(f"Unknown profile {profile!r}; choose one of auto, {', '.join(PROFILES)}")
        return profile, "asked for"
    import torch

    from .hf import hub_reachable

    cuda, hub = torch.cuda.is_available(), hub_reachable()
    if cuda and hub:
        return "full", "a CUDA GPU and the Hugging Face Hub are both available"
    missing = " and ".join(x for x, ok in (("no CUDA GPU", cuda), ("no Hub access", hub)) if not ok)
    return "smoke", f"{missing}: running the offline smoke profile (pass profile='cpu' for real data on a CPU)"


def check_fields(values: dict, where: str = "settings") -> None:
    """One line naming the first unknown field, with the closest known name."""
    import difflib

    for name in values:
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(sorted(FIELDS))}"
            raise ConfigError(f"{where}: unknown setting '{name}'{hint}")


def checked_value(name: str, value, where: str = "settings"):
    """The value with the field's type, or one line naming the field. Written by hand because PyYAML reads YAML 1.1,
    where `5e-5` (no dot) is the string '5e-5', the commonest way to write a learning rate; dataclasses check
    nothing, and the mistake would surface minutes later inside TRL."""
    kind = FIELDS[name]
    if value is None and "None" in kind:
        return None
    try:
        if kind.startswith("float") and not isinstance(value, bool):
            return float(value)  # also '5e-5' and '1.0e-4' as text
        if kind.startswith("int") and not isinstance(value, bool):
            number = float(value)
            if number.is_integer():
                return int(number)
        if kind == "bool" and isinstance(value, bool) or kind == "dict" and isinstance(value, dict):
            return value
        if kind.startswith("str") and isinstance(value, (str, os.PathLike)):
            return str(value)
        if kind.startswith("list[str]") and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    except (TypeError, ValueError):
        pass
    wanted = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text",
              "list[str]": "a list of names", "dict": "a mapping"}[kind.split(" ")[0]]
    raise ConfigError(f"{where}: setting '{name}' must be {wanted}, got {value!r}")


def resolve(profile: str = "auto", *layers: dict) -> tuple[RunConfig, str, str]:
    """(config, profile name, why): the profile's values, then each layer in order; a None value keeps what is
    there (the notebook's parameters cell leaves unset parameters at None)."""
    name, why = pick_profile(profile)
    values = dict(PROFILES[name], output_dir=str(results_dir() / f"run-{name}"))
    for layer in layers:
        check_fields(layer)
        values.update({k: v for k, v in layer.items() if v is not None})
    return RunConfig(**values), name, why
