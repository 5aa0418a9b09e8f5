"""Settings: TRL's `DPOConfig` and `ModelConfig` plus `RunArguments` (this project's own), parsed by TRL's `TrlParser`.
A run is one flat mapping of field names to values; every name belongs to exactly one of the three classes and keeps
that class's name everywhere (recipes, notebook parameters, flags, sweep files). Later layers win:

    TRL's defaults  <  PROJECT_DEFAULTS  <  recipe (configs/recipes/<profile>.yaml)  <  sweep file `base:`
                    <  grid value / notebook parameter / command-line flag

The profiles (`--profile`, the notebook's `profile`) are the recipes, each described at its top; `auto` is `full`
when CUDA and the Hub are both available, else `smoke`. Every value is checked here, before a model or a dataset is
loaded; a mistake is one line (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RunArguments:
    """What a run needs beyond TRL's two classes: the data, its cleaning and splits, the judge, the levers."""

    # data
    dataset_name: str = _option("Anthropic/hh-rlhf", "Hub dataset id, .jsonl(.gz)/.json/.parquet file, or 'synthetic'")
    data_dir: str | None = _option(None, "Hub subset, e.g. 'harmless-base'")
    max_pairs: int | None = _option(None, "keep the first N cleaned pairs (before the split)")
    max_eval_pairs: int | None = _option(None, "score the first N held-out test pairs (seeded order)")
    validation_pairs: int | None = _option(None, "hold out the last N train pairs to evaluate and pick settings on")
    test_fraction: float = _option(0.2, "test share for single-split sources")
    split_seed: int = _option(42, "seed of the train/test split and of the pairs drawn")
    prompt_format: str = _option("auto", "auto (the model's chat template, else Human/Assistant text) | text | chat")
    shuffled_labels: bool = _option(False, "the label control: swap chosen and rejected of each training pair with "
                                           "probability 1/2 (seeded by split_seed); evaluations keep the real labels")
    # after training
    judge: str | None = _option(None, "judged generations: a reward model (Hub id or folder), or 'none'")
    judge_prompts: int = _option(32, "judged prompts (validation, else test split)")
    log_completions: int = _option(2, "answers to this many fixed validation prompts at every evaluation (0: none)")
    # speed levers (speed/): opt-in
    trainer: str = _option("tuned", "tuned: reference log-probs cached on disk, the levers below | trl: TRL's own")
    packing: bool = _option(True, "tuned: each pair one sequence with its prompt once; pairs share rows, no padding")
    micro_batch_tokens: int = _option(0, "tuned + packing: > 0 splits each step into forwards of at most this many "
                                         "packed positions")


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
    "num_train_epochs": 1.0, "learning_rate": 5e-5,
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
# Bounds and choices TRL and transformers take without complaint but that cannot train, or that fail only after the
# model is loaded and the reference scored (check_values).
AT_LEAST = {"max_length": 1, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
            "gradient_accumulation_steps": 1, "lora_r": 1, "max_pairs": 1, "learning_rate": 0, "validation_pairs": 0,
            "judge_prompts": 0, "log_completions": 0, "micro_batch_tokens": 0}
CHOICES = {"trainer": ("tuned", "trl"), "prompt_format": ("auto", "text", "chat")}


def field_names() -> dict[str, str]:
    """Every setting's name -> the class it belongs to."""
    return {f.name: cls.__name__ for cls in _classes() for f in dataclasses.fields(cls) if f.init}


def check_names(values: dict, where: str = "settings", also: tuple[str, ...] = ()) -> None:
    """One line naming the first unknown setting, with the name that replaced it or the closest known one (`also`:
    names the caller knows besides the settings, such as a command's own flags)."""
    known = [*field_names(), *also]
    for name in values:
        if name not in known:
            close = [RENAMED[name]] if name in RENAMED else difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown setting '{name}'{hint}")


def check_notebook_names(names, where: str = "notebook parameters") -> None:
    """One line for a notebook variable that is close to a setting's name, or an old name: the notebook passes on only
    the variables that name settings, so `learning_rte = 1e-3` or `model = ...` would otherwise train with the
    recipe's value without a word."""
    known = field_names()
    for name in (n for n in names if n not in known):
        if name in RENAMED or difflib.get_close_matches(name, known, n=1, cutoff=0.85):
            check_names({name: None}, where)


def loss_types() -> set[str]:
    """The loss types TRL's DPOTrainer accepts, from DPOConfig's own documentation of the field (a new TRL that
    changes the list changes this; tests/test_args.py checks it still names sigmoid and ipo)."""
    help_text = next(f for f in dataclasses.fields(_classes()[1]) if f.name == "loss_type").metadata["help"]
    return set(re.findall(r"`'([a-z_]+)'`", help_text))


def tracker_names(report_to: list[str]) -> list[str]:
    """The trackers DPOConfig's report_to names (a list, of names or names joined by commas); "none" is none."""
    return [n.strip() for entry in report_to for n in entry.split(",") if n.strip() not in ("", "none")]


def tracker_problem(report_to: list[str]) -> str | None:
    """Why a tracker named in report_to cannot log: transformers does not know it, or its package is not installed
    (a missing TensorBoard is only left out, with a line: tracking.report_to). None when every one can."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    installed = get_available_reporting_integrations()
    for name in tracker_names(report_to):
        if name in ("all", "tensorboard", "flyte"):  # flyte: transformers does not say if it is there
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, [*INTEGRATION_TO_CALLBACK, "none"], n=1)
            return f"report_to: unknown tracker {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        if name not in installed:
            return f"report_to {name!r}: its package is not installed here; install it, or leave it out of report_to"
    return None


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:  # not Linux, or a sandbox that hides it: be conservative
        return False


def machine_defaults() -> dict:
    """The settings that depend on the machine, where nobody set them. On CUDA: bf16 weights and autocast where it is
    native (Ampere+), else fp16. On a CPU: fp32 weights, with bf16 autocast only where the CPU has native bf16 (faster
    than fp32, the same losses); emulated bf16, TRL's default, is ~3x slower. LoRA weights train in fp32 either way."""
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"use_cpu": False, "dtype": "bfloat16" if bf16 else "float16", "bf16": bf16, "fp16": not bf16}
    return {"use_cpu": True, "dtype": "float32", "bf16": cpu_has_native_bf16(), "fp16": False}


def parse(values: dict, where: str = "settings") -> Settings:
    """Settings from one flat mapping (None keeps the default); checked before anything is loaded."""
    values = {k: v for k, v in values.items() if v is not None}
    check_names(values, where)
    from trl import TrlParser

    given = {**PROJECT_DEFAULTS, **values}
    output_dir = given.setdefault("output_dir", str(results_dir() / "run"))
    # data_seed: the same pairs whatever the seed does elsewhere
    derived = {**machine_defaults(), "run_name": Path(output_dir).name, "data_seed": given.get("seed", 42)}
    if "bf16" in given or "fp16" in given:  # the one not set keeps TRL's default
        del derived["bf16"], derived["fp16"]
    given = {**derived, **given}
    if int(given.get("micro_batch_tokens") or 0) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # before DPOConfig, which joins the process group; TRL gathers every forward's metrics across processes,
        # and ranks would split their steps into different forwards
        _raise(f"{where}: micro_batch_tokens trains in one process; use per_device_train_batch_size")
    # each field's declared type, from the classes' annotations (TrlParser rewrites the fields' own .type)
    types = {n: str(a).lower() for cls in _classes() for k in reversed(cls.__mro__)
             for n, a in vars(k).get("__annotations__", {}).items()}
    for name, value in given.items():  # a YAML list or mapping where the field takes one value: argparse lets it by
        if isinstance(value, (list, dict)) and ("list" if isinstance(value, list) else "dict") not in types[name]:
            _raise(f"{where}: {name} takes one value, got {value!r}")
    parser = TrlParser(_classes())
    parser.error = _raise  # argparse's own messages, as one line
    # Scalars as text, so argparse converts them with the field's own type (YAML 1.1 reads `5e-5` as text;
    # `max_steps: 2.0` is refused): the conversion and its one-line error are TrlParser's, not ours.
    parser.set_defaults_with_config(**{k: v if isinstance(v, (list, dict)) else str(v) for k, v in given.items()})
    try:
        run, dpo, model = parser.parse_args_into_dataclasses(args=[])
    except (TypeError, ValueError) as err:  # argparse's, or a dataclass's own check (TRL's, transformers')
        _raise(f"{where}: {err}")
    settings = Settings(run, dpo, model, values)
    check_values(settings, where)
    return settings


def parse_stored(config: dict, where: str, **changes) -> Settings:
    """Settings from a run's stored config (run_config.json, a record's config), perhaps written by an older version:
    keys that are no longer settings are left out, and judge 'proxy' (removed) is no judge; then `changes`."""
    known = field_names()
    kept = {k: v for k, v in config.items() if k in known and (k, v) != ("judge", "proxy")}
    return parse({**kept, **changes}, where)


def check_values(s: Settings, where: str = "settings") -> None:
    run, dpo = s.run, s.dpo
    problems = [f"{name} must be {'a positive number' if low else '>= 0'}, got {s.get(name)}"
                for name, low in AT_LEAST.items() if s.get(name) is not None and s.get(name) < low]
    problems += [f"{name} must be {' or '.join(map(repr, options))}, got {s.get(name)!r}"
                 for name, options in CHOICES.items() if s.get(name) not in options]
    known = loss_types()
    problems += [f"unknown loss_type {name!r}; TRL knows {', '.join(sorted(known))}"
                 for name in dpo.loss_type if name not in known]
    rules = [
        (dpo.beta <= 0, f"beta must be > 0 (a negative beta reverses the objective), got {dpo.beta}"),
        (dpo.max_steps <= 0 and dpo.num_train_epochs <= 0, "set max_steps or num_train_epochs above 0"),
        (not s.model.use_peft, "use_peft must be true: this pipeline trains LoRA adapters"),
        (not s.model.model_name_or_path, "model_name_or_path is not set"),
        (Path(dpo.output_dir).is_file(), f"output_dir {dpo.output_dir} is a file; name a folder for the run"),
        (not 0 < run.test_fraction < 1, f"test_fraction must be in (0, 1): runs are evaluated on held-out pairs, "
                                           f"got {run.test_fraction}"),
        (run.judge == "proxy", "judge 'proxy' is gone: on held-out pairs it did no better than picking the shorter "
                               "answer (docs/evaluation.md); name a reward model (Hub id or folder), or 'none'"),
        (run.micro_batch_tokens > 0 and (not run.packing or run.trainer != "tuned"
                                         or dpo.gradient_accumulation_steps != 1),
         "micro_batch_tokens sizes the packed forwards of the tuned trainer: it needs packing, trainer 'tuned' and "
         "gradient_accumulation_steps 1 (per_device_train_batch_size is then the pairs of a step)"),
        (run.packing and run.trainer == "tuned" and dpo.truncation_mode != "keep_start",
         "packing keeps the start of long pairs: set truncation_mode keep_start or packing false"),
    ]
    tracker = tracker_problem(dpo.report_to)
    problems += [message for failed, message in rules if failed] + ([tracker] if tracker else [])
    if problems:
        _raise(f"{where}: {problems[0]}")


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
