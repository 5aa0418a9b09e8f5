"""Model stage: the tokenizer, the base model (optionally 4-bit NF4), its random-weight twin (the control) and LoRA.

The policy is the base model plus a LoRA adapter; the DPO reference model is the same base with the adapter
disabled (TRL does this when it gets a PeftModel and no ``ref_model``), so only one copy of the weights is in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import offline_models
import torch
from offline_models.gpt2 import write_random_checkpoint
from offline_models.smollm2 import PretrainedError
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl import ModelConfig, get_peft_config, get_quantization_config

from .args import machine_defaults
from .chat_template import with_prompt_format
from .errors import first_line
from .hf import hub_reachable, load_source
from .runs import CONTROL_PREFIX

RANDOM_TWIN_PREFIX = CONTROL_PREFIX  # "random-twin:" + any model name: the control
# LoRA on every attention and MLP projection, by architecture; any other model gets peft's "all-linear".
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_ALIASES = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_target_modules"}
OFFLINE_HINT = ("To run without the Hub, set model_name_or_path to 'offline:smollm2-135m' (a real pretrained "
                "model), 'offline:gpt2-124m' (GPT-2 architecture, random weights) or a local checkpoint folder.")


class ModelLoadError(RuntimeError):
    """A model or tokenizer the user named cannot be loaded; the message is one line that says what to do."""


def resolve_model_path(name_or_path: str) -> str:
    """``offline:<name>`` (offline_models) and ``random-twin:<model>`` become local checkpoint folders; anything else
    is a Hub id or a local folder.

    The random twin is the control for a DPO result: the model's architecture and tokenizer with random weights. A
    random network trained with DPO also learns to separate chosen from rejected answers by their surface; what DPO
    did to the real model only counts beyond what it does to this twin."""
    if not name_or_path.startswith(RANDOM_TWIN_PREFIX):
        try:
            return offline_models.resolve(name_or_path) or name_or_path
        except (ValueError, OSError, PretrainedError) as err:  # an unknown offline: name, files that cannot be made
            raise ModelLoadError(" ".join(str(err).split())) from None
    real = name_or_path.removeprefix(RANDOM_TWIN_PREFIX)
    digest = hashlib.sha256(real.encode()).hexdigest()[:10]
    folder = offline_models.cache_dir() / "models" / f"random-twin-{digest}-seed1"
    config = _from_pretrained(AutoConfig, resolve_model_path(real))
    note = f"Random-weight twin of {real} (same architecture and tokenizer)."
    # seed 1: the twin of an offline GPT-2 (random weights, seed 0) must not be that model itself
    return str(write_random_checkpoint(folder, config, load_tokenizer(real), note, seed=1))


def _from_pretrained(loader, name: str, **kwargs):
    """Load from a local folder, the local HF cache, or the Hub; fail in one line instead of minutes of retries."""
    marks = ("config.json", "tokenizer_config.json", "tokenizer.json") if loader is AutoTokenizer else ("config.json",)
    try:
        source = load_source(name)
    except Exception:  # e.g. not a Hub id: from_pretrained below says why, when the Hub can be asked
        source = name if hub_reachable() else None
    if source is None:
        raise ModelLoadError(f"Cannot load model {name!r}: it is not cached and the Hugging Face Hub cannot be "
                             f"reached. {OFFLINE_HINT}")
    if Path(name).exists() and not any((Path(name) / mark).exists() for mark in marks):
        raise ModelLoadError(f"{name!r} is a folder without config.json: not a model checkpoint")
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"Cannot load model {name!r}: {str(err).splitlines()[0]}. {OFFLINE_HINT}") from None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token and a chat template (HUMAN_ASSISTANT for a model without one, e.g. GPT-2)."""
    tokenizer = _from_pretrained(AutoTokenizer, resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return with_prompt_format(tokenizer)


def load_base_model(name_or_path: str | ModelConfig, load_in_4bit: bool = False):
    """The base causal LM as ModelConfig describes it (a bare name: the project's defaults, as a run gets them),
    4-bit with bitsandbytes when asked (TRL's get_quantization_config: NF4, computing in the weights' dtype; on the
    GPU, or the CPU with bnb >= 0.45, where transformers places a quantized model without a device_map)."""
    args = name_or_path if isinstance(name_or_path, ModelConfig) else ModelConfig(
        model_name_or_path=name_or_path, load_in_4bit=load_in_4bit, dtype=machine_defaults()["dtype"], use_peft=True,
        bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    model = _from_pretrained(AutoModelForCausalLM, resolve_model_path(args.model_name_or_path),
                             dtype=args.dtype or "auto", revision=args.model_revision,
                             attn_implementation=args.attn_implementation,
                             quantization_config=get_quantization_config(args))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def lora_config(model, model_args: ModelConfig | None = None, **lora) -> LoraConfig:
    """TRL's get_peft_config(model_args), with the LoRA targets of the architecture when none are set (every
    attention and MLP projection; peft's own default for GPT-2 is c_attn alone). `lora` (r, alpha, dropout,
    targets) builds a ModelConfig for tests and inspection."""
    model_args = model_args or ModelConfig(use_peft=True, **{LORA_ALIASES.get(k, k): v for k, v in lora.items()})
    config = get_peft_config(model_args)
    config.target_modules = model_args.lora_target_modules or LORA_TARGETS.get(model.config.model_type, "all-linear")
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        # ModelConfig turns a one-name list into a string, which peft would read as a regex over whole module paths
        config.target_modules = [config.target_modules]
    # GPT-2 stores weights as Conv1D (in x out); peft needs fan_in_fan_out for those, not for Linear/Linear4bit.
    config.fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    return config


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """Ready a (4-bit) base model for LoRA training; TRL then wraps it with the LoRA config it is given."""
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        # bitsandbytes 0.50 repacks 4-bit weights for CPU inference on the first no-grad forward in eval mode (an
        # evaluation mid-training), and training on the repacked layout then fails: keep the trainable layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def add_lora(model, config: LoraConfig, gradient_checkpointing: bool = False):
    """The base wrapped with a LoRA adapter (what TRL builds from a peft_config); for tests and inspection."""
    return get_peft_model(prepare_for_training(model, gradient_checkpointing), config)


def attach_adapter(model, folder: str | Path, base: str, source: str | Path | None = None):
    """The LoRA adapter saved in `folder` put on `model` (peft's PeftModel), failing in one line; `base` and `source`
    (what the user named, else the folder) name them in the message."""
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        if "size mismatch" in str(err):
            raise ModelLoadError(f"The adapter in {source or folder} does not fit base model {base!r} (its tensor "
                                 "shapes differ): it was trained on another base model") from None
        raise ModelLoadError(f"Cannot put the adapter from {source or folder} on {base!r}: {first_line(err)}") from None


def describe_model(model, name: str) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 4-bit weights are packed two to a byte (uint8): count their real size
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return {
        "model": name,
        "architecture": model.config.model_type,
        "quantized_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 3),
    }
