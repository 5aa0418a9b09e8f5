"""Settings: TRL's `DPOConfig` and `ModelConfig` plus `RunArguments` (what is this project's own), parsed by TRL's
`TrlParser`. A run is one flat mapping of field names to values; every name belongs to exactly one of the three
classes, and keeps that class's name everywhere (recipes, notebook parameters, flags, sweep files). Later layers win:

    TRL's defaults  <  PROJECT_DEFAULTS  <  recipe (configs/recipes/<profile>.yaml)  <  sweep file `base:`
                    <  grid value / notebook parameter / command-line flag

Profiles (the notebook's `profile` parameter, `--profile`) are the recipes:
    full            Hub GPT-2 + Anthropic/hh-rlhf, 4-bit NF4, LoRA, on a CUDA GPU          (the real thing)
    cpu             offline GPT-2 124M shape (random weights) + the real hh-rlhf sample, a short run on a CPU
    pretrained-cpu  SmolLM2-135M-Instruct (a real pretrained model, offline) + the real hh-rlhf sample, on a CPU
    smoke           offline tiny GPT-2 + the synthetic preference set, a minute on a CPU
    auto            `full` when CUDA and the Hub are both available, else `smoke`

Every value is checked here, before a model or a dataset is loaded; a mistake is one line (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from offline_models import cache_dir  # noqa: F401 - the one definition; refcache and model import it from here

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECIPES = PROJECT_ROOT / "configs" / "recipes"


def shared_data_dir() -> Path:
    """The real data shared between checkouts: $DPO_SHARED_DATA, else <repo root>/../shared/data."""
    return Path(os.environ.get("DPO_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data")


HH_SAMPLE = str(shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz")


def results_dir() -> Path:
    return Path(os.environ.get("DPO_RESULTS_DIR", PROJECT_ROOT / "results"))


class ConfigError(ValueError):
    """A setting the user gave that cannot be used; the message is one line."""


@dataclass
class RunArguments:
    """What a run needs beyond TRL's two classes: the data, its cleaning and splits, the judge, the levers."""

    # data
    dataset_name: str = field(default="Anthropic/hh-rlhf", metadata={
        "help": "Hub dataset id, local .jsonl/.jsonl.gz/.json/.parquet file, or 'synthetic'"})
    data_dir: str | None = field(default=None, metadata={"help": "Hub subset, e.g. 'harmless-base'"})
    max_pairs: int | None = field(default=None, metadata={"help": "keep the first N cleaned pairs (before the split)"})
    max_eval_pairs: int | None = field(default=None, metadata={
        "help": "score the first N held-out test pairs (seeded order; evaluation passes cost time)"})
    validation_pairs: int | None = field(default=None, metadata={
        "help": "hold out the last N train pairs to evaluate on while training (settings are picked on these)"})
    test_fraction: float = field(default=0.2, metadata={"help": "test share for single-split sources"})
    split_seed: int = field(default=42, metadata={"help": "seed of the train/test split and of the pairs drawn"})
    prompt_format: str = field(default="auto", metadata={
        "help": "auto: the model's chat template if it has one, else Human/Assistant text | text | chat"})
    shuffled_labels: bool = field(default=False, metadata={
        "help": "the label control: swap chosen and rejected of each training pair with probability 1/2 (seeded by "
                "split_seed); validation and test pairs keep their real labels"})
    # after training
    judge: str | None = field(default=None, metadata={
        "help": "judged generations: 'proxy' (a reward model trained on the train split), a Hub reward model id, "
                "a folder, or 'none'"})
    judge_prompts: int = field(default=32, metadata={"help": "judged prompts (validation, else test split)"})
    log_completions: int = field(default=2, metadata={
        "help": "answers to this many fixed validation prompts at every evaluation (0: none)"})
    # speed levers (speed/): opt-in
    trainer: str = field(default="tuned", metadata={
        "help": "tuned: reference log-probs cached on disk across runs + the levers below | trl: TRL's DPOTrainer"})
    packing: bool = field(default=True, metadata={
        "help": "tuned: each pair one sequence with its prompt once; pairs share rows, no padding"})
    micro_batch_tokens: int = field(default=0, metadata={
        "help": "tuned + packing: > 0 splits each step into forwards of at most this many packed positions"})


def _classes():
    from trl import DPOConfig, ModelConfig  # here, so a bad flag or recipe is answered before TRL loads

    return RunArguments, DPOConfig, ModelConfig


# Where this project departs from TRL's defaults, and why. A recipe or any later layer can set them back.
PROJECT_DEFAULTS = {
    "use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,  # LoRA: the reference is the base model
    "lora_task_type": "CAUSAL_LM",  # with the adapter switched off, so one copy of the weights is in memory
    "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,  # with load_in_4bit: QLoRA's NF4, double-quantized
    "gradient_checkpointing": False,  # TRL turns it on; models this small train faster without it
    "precompute_ref_log_probs": True,  # reference log-probs once per (base, data), kept on disk (refcache.py)
    "eval_strategy": "steps", "eval_steps": 50, "logging_steps": 10,
    # a checkpoint (adapter, optimizer, scheduler, RNG states) every 50 steps, the last 2 kept: a killed run goes on
    # from the last one (pipeline.run); a finished run keeps only its adapter
    "save_strategy": "steps", "save_steps": 50, "save_total_limit": 2,
    "report_to": "tensorboard",  # event files in the run folder: `tensorboard --logdir results`, no account
    "logging_nan_inf_filter": False,  # let a NaN loss show (pipeline.StopOnNonFiniteLoss fails the run)
    "ddp_find_unused_parameters": False,  # every LoRA weight is used each step: skip DDP's extra graph walk
    "num_train_epochs": 1.0,
    "learning_rate": 5e-5,
    "optim": "adamw_torch",  # plain AdamW: fused AdamW has no measured gain (benchmarks/README.md)
}
# Old names (before the settings were TRL's own) and what replaced them, for "did you mean".
RENAMED = {
    "model": "model_name_or_path", "source": "dataset_name", "lora_targets": "lora_target_modules",
    "epochs": "num_train_epochs", "optimizer": "optim", "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
    "eval_batch_size": "per_device_eval_batch_size", "precision": "bf16", "precompute_ref": "precompute_ref_log_probs",
    "trl_args": "the DPOConfig field's own name",
}


def field_names() -> dict[str, str]:
    """Every setting's name -> the class it belongs to."""
    return {f.name: cls.__name__ for cls in _classes() for f in dataclasses.fields(cls) if f.init}


def check_names(values: dict, where: str = "settings") -> None:
    """One line naming the first unknown setting, with the name that replaced it or the closest known one."""
    known = field_names()
    for name in values:
        if name not in known:
            close = [RENAMED[name]] if name in RENAMED else difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown setting '{name}'{hint}")


def loss_types() -> set[str]:
    """The loss types TRL's DPOTrainer accepts, from DPOConfig's own documentation of the field (a new TRL that
    changes the list changes this; tests/test_args.py checks it still names sigmoid and ipo)."""
    help_text = next(f for f in dataclasses.fields(_classes()[1]) if f.name == "loss_type").metadata["help"]
    return set(re.findall(r"`'([a-z_]+)'`", help_text))


# Written with every run (run_config.json, the record) whether or not a layer set them: what the workbook, the card
# and the plots show.
HEADLINE = ("model_name_or_path", "load_in_4bit", "learning_rate", "per_device_train_batch_size",
            "gradient_accumulation_steps", "beta", "optim", "loss_type", "lora_r", "lora_alpha", "lora_dropout",
            "num_train_epochs", "max_steps", "max_length", "seed")


@dataclass
class Settings:
    """One run's settings: ours, TRL's DPOConfig and ModelConfig; `values` are the settings given (every layer
    above TRL's and the project's defaults), which define the run (runs.run_id)."""

    run: RunArguments
    dpo: object  # trl.DPOConfig
    model: object  # trl.ModelConfig
    values: dict

    def replace(self, **changes) -> "Settings":
        return parse({**self.values, **changes})

    def get(self, name: str):
        """A setting's value, from whichever of the three objects has it (enums as their text)."""
        for part in (self.run, self.dpo, self.model):
            if hasattr(part, name):
                value = getattr(part, name)
                return getattr(value, "value", value)
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The given settings and the HEADLINE ones, as the objects hold them (typed: `5e-5` from YAML is a number
        here): parse(to_dict()) gives the same settings."""
        return {name: self.get(name) for name in dict.fromkeys([*HEADLINE, *self.values])}


def _raise(message: str):
    raise ConfigError(" ".join(message.split()))


def _as_default(value):
    """Scalars as text, so argparse converts them with the field's own type (YAML 1.1 reads `5e-5` as text;
    `max_steps: 2.0` is refused): the conversion and its one-line error are TrlParser's, not ours."""
    return value if value is None or isinstance(value, (list, dict)) else str(value)


def machine_defaults(values: dict) -> dict:
    """The settings that depend on the machine, where nobody set them: precision by hardware (TRL's bf16 default is
    ~3x slower on a CPU without native bf16), the CPU when there is no GPU, the run's name from its folder."""
    import torch

    defaults = {"use_cpu": not torch.cuda.is_available(), "dtype": weight_dtype()}
    if "bf16" not in values and "fp16" not in values:
        defaults["bf16"], defaults["fp16"] = mixed_precision()
    output_dir = values.get("output_dir", str(results_dir() / "run"))
    defaults.update(output_dir=output_dir, run_name=Path(output_dir).name)
    return defaults


def weight_dtype() -> str:
    """ModelConfig.dtype where nobody set it: bf16 where CUDA has it natively (Ampere+), else fp16 on CUDA; fp32
    weights on a CPU (training autocasts to bf16 there when the CPU has it natively: mixed_precision)."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:  # not Linux: be conservative
        return False


def mixed_precision() -> tuple[bool, bool]:
    """(bf16, fp16) autocast where nobody set them: CUDA -> bf16 where supported, else fp16; a CPU -> bf16 where it
    has native bf16 (measured 1.5-1.8x faster than fp32 on a 2-core AVX512-BF16 EPYC, the same losses within
    0.002), else fp32 (emulated bf16 is ~3x slower). The trainable LoRA weights stay fp32 either way."""
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return bf16, not bf16
    return cpu_has_native_bf16(), False


def parse(values: dict, where: str = "settings") -> Settings:
    """Settings from one flat mapping (None keeps the default); checked before anything is loaded."""
    from trl import TrlParser

    values = {k: v for k, v in values.items() if v is not None}
    check_names(values, where)
    given = {**PROJECT_DEFAULTS, **values}
    given = {**machine_defaults(given), **given}
    given.setdefault("data_seed", given.get("seed", 42))  # the same pairs whatever the seed does elsewhere
    if int(given.get("micro_batch_tokens") or 0) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # before DPOConfig, which joins the process group; TRL gathers every forward's metrics across processes,
        # and ranks would split their steps into different forwards
        _raise(f"{where}: micro_batch_tokens trains in one process; use per_device_train_batch_size")
    parser = TrlParser(_classes())
    parser.error = lambda message: _raise(f"{where}: {message}")  # argparse's own messages, as one line
    parser.set_defaults_with_config(**{k: _as_default(v) for k, v in given.items()})
    try:
        run, dpo, model = parser.parse_args_into_dataclasses(args=[])
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a dataclass's own check (TRL's, transformers')
        _raise(f"{where}: {err}")
    settings = Settings(run, dpo, model, values)
    check_values(settings, where)
    return settings


def check_values(s: Settings, where: str = "settings") -> None:
    """The values TRL and transformers take without complaint but that cannot train, or fail only after the model
    is loaded and the reference scored."""
    run, dpo, model = s.run, s.dpo, s.model
    problems = [
        (dpo.beta <= 0, f"beta must be > 0 (a negative beta reverses the objective), got {dpo.beta}"),
        (dpo.max_length is not None and dpo.max_length < 1, f"max_length must be a positive number of tokens, "
                                                            f"got {dpo.max_length}"),
        (dpo.learning_rate < 0, f"learning_rate must be >= 0, got {dpo.learning_rate}"),
        (dpo.per_device_train_batch_size < 1, "per_device_train_batch_size must be at least 1"),
        (dpo.per_device_eval_batch_size < 1, "per_device_eval_batch_size must be at least 1"),
        (dpo.gradient_accumulation_steps < 1, "gradient_accumulation_steps must be at least 1"),
        (dpo.max_steps <= 0 and dpo.num_train_epochs <= 0, "set max_steps or num_train_epochs above 0"),
        (not model.use_peft, "use_peft must be true: this pipeline trains LoRA adapters"),
        (model.lora_r < 1, f"lora_r must be at least 1, got {model.lora_r}"),
        (not model.model_name_or_path, "model_name_or_path is not set"),
        (not 0 <= run.test_fraction < 1, f"test_fraction must be in [0, 1), got {run.test_fraction}"),
        (run.max_pairs is not None and run.max_pairs < 1, f"max_pairs must be at least 1, got {run.max_pairs}"),
        (run.validation_pairs is not None and run.validation_pairs < 0, "validation_pairs must be >= 0"),
        (run.judge_prompts < 0 or run.log_completions < 0, "judge_prompts and log_completions must be >= 0"),
        (run.trainer not in ("tuned", "trl"), f"trainer must be 'tuned' or 'trl', got {run.trainer!r}"),
        (run.prompt_format not in ("auto", "text", "chat"), f"prompt_format must be auto, text or chat, "
                                                            f"got {run.prompt_format!r}"),
        (run.micro_batch_tokens < 0, f"micro_batch_tokens must be >= 0, got {run.micro_batch_tokens}"),
        (run.micro_batch_tokens > 0 and (not run.packing or run.trainer != "tuned"
                                         or dpo.gradient_accumulation_steps != 1),
         "micro_batch_tokens sizes the packed forwards of the tuned trainer: it needs packing, trainer 'tuned' and "
         "gradient_accumulation_steps 1 (per_device_train_batch_size is then the pairs of a step)"),
        (run.packing and run.trainer == "tuned" and dpo.truncation_mode != "keep_start",
         "packing keeps the start of long pairs: set truncation_mode keep_start or packing false"),
    ]
    known = loss_types()
    unknown = [t for t in dpo.loss_type if t not in known]
    problems.append((bool(unknown), f"unknown loss_type {unknown[0] if unknown else ''!r}; TRL knows "
                                    f"{', '.join(sorted(known))}"))
    for failed, message in problems:
        if failed:
            _raise(f"{where}: {message}")


def load_recipe(path: str | Path) -> dict:
    """A recipe: one flat YAML mapping of settings. `${DPO_SHARED_DATA}` in a value is the shared data folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        _raise(f"{path}: cannot read the recipe ({str(err).splitlines()[0]})")
    if not isinstance(raw, dict):
        _raise(f"{path}: a recipe is a mapping of settings, one per line")
    os.environ.setdefault("DPO_SHARED_DATA", str(shared_data_dir()))
    values = {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in raw.items()}
    check_names(values, str(path))
    return values


def profiles() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def pick_profile(profile: str = "auto") -> tuple[str, str]:
    """(profile name, why it was picked)."""
    if profile != "auto":
        if profile not in profiles():
            _raise(f"Unknown profile {profile!r}; choose one of auto, {', '.join(profiles())}")
        return profile, "asked for"
    import torch

    from .hf import hub_reachable

    cuda, hub = torch.cuda.is_available(), hub_reachable()
    if cuda and hub:
        return "full", "a CUDA GPU and the Hugging Face Hub are both available"
    missing = " and ".join(x for x, ok in (("no CUDA GPU", cuda), ("no Hub access", hub)) if not ok)
    return "smoke", f"{missing}: running the offline smoke profile (pass profile='cpu' for real data on a CPU)"


def resolve(profile: str | None = "auto", *layers: dict, where: str = "settings") -> tuple[Settings, str, str]:
    """(settings, profile name, why): the profile's recipe (none: profile None), then each layer in order; a None
    value keeps what is there (the notebook's parameters cell leaves unset parameters at None)."""
    name, why = pick_profile(profile) if profile else ("custom", "no profile")
    values = load_recipe(RECIPES / f"{name}.yaml") if profile else {}
    values["output_dir"] = str(results_dir() / f"run-{name}")
    for layer in layers:
        check_names(layer, where)
        values.update({k: v for k, v in layer.items() if v is not None})
    return parse(values, where), name, why


# The sweep the notebook runs for each profile (its `sweep_spec` parameter overrides it): the CPU-sized SmolLM2 sweep
# for pretrained-cpu (configs/sweeps/smollm2.yaml is its GPU-sized version).
PROFILE_SWEEPS = {"full": "full.yaml", "cpu": "cpu.yaml", "pretrained-cpu": "smollm2_cpu.yaml", "smoke": "smoke.yaml"}


def sweep_file(profile: str) -> Path:
    return PROJECT_ROOT / "configs" / "sweeps" / PROFILE_SWEEPS[profile]
