"""Training stage: one DPO run with TRL's DPOTrainer over a LoRA-wrapped (optionally 4-bit) base model.

`train_dpo(config, data)` returns a `RunRecord` and leaves in `config.output_dir`:
    adapter_model.safetensors, adapter_config.json   the LoRA adapter (peft)
    tokenizer files                                   so the folder is self-contained for inference
    run_config.json                                   the RunConfig that produced it
    record.json                                       the RunRecord (metrics, log history, timing)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from . import model as model_lib
from .data import PreferenceData
from .evaluate import preference_eval

OPTIMIZERS = {"adamw": "adamw_torch", "rmsprop": "rmsprop"}  # short names -> transformers' optimizer names
EVAL_KEYS = [  # TRL's eval metrics that a record keeps (prefix "eval_")
    "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
    "logps/rejected",
]


@dataclass
class RunConfig:
    """Everything that defines one training run. One config = one run; the sweep varies these fields."""

    model: str = "openai-community/gpt2"  # Hub id, local checkpoint folder, or offline:<shape>
    load_in_4bit: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: every attention and MLP projection of the architecture
    beta: float = 0.1
    loss_type: str = "sigmoid"  # passed through to TRL: sigmoid, ipo, hinge, robust, ...
    learning_rate: float = 5e-5
    optimizer: str = "adamw"  # adamw | rmsprop (or any transformers optimizer name)
    batch_size: int = 4  # pairs per optimizer step and device (x grad_accum)
    grad_accum: int = 1
    micro_batch_size: int = 0  # pairs per forward pass; 0: auto (1 on a CPU: no padding between pairs; batch on GPU)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    max_length: int = 512  # prompt + completion tokens
    eval_steps: int = 50
    logging_steps: int = 10
    seed: int = 42
    gradient_checkpointing: bool = False  # TRL turns it on by default; small models train faster without it
    output_dir: str = "results/runs/default"
    precompute_ref: bool = True  # reference log-probs computed once, cached on disk and shared (refcache.py)
    group_by_length: bool = True  # micro-batches of similar length: less padding (only when they hold > 1 pair)
    precision: str = "auto"  # fp32 | bf16 | fp16 autocast; auto picks by hardware (model.mixed_precision)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunRecord:
    """What one run produced: enough to compare runs, plot them and reload the adapter."""

    config: dict
    status: str  # "finished" | "failed"
    train_pairs: int
    eval_pairs: int
    train_steps: int
    final_train_loss: float | None
    final_eval: dict  # eval metrics after the last step, keys without the "eval_" prefix
    best_eval: dict  # the logged evaluation with the lowest eval loss (includes its "step")
    log_history: list[dict]
    wall_time_s: float  # training including its evaluations
    pairs_per_second: float  # training pairs per second, evaluation time excluded
    adapter_path: str
    model_info: dict = field(default_factory=dict)
    error: str | None = None  # one line, for a failed run
    run_id: str = ""  # the output folder's name (in a sweep, a hash of the config)
    evaluation: dict = field(default_factory=dict)  # held-out per-pair metrics of the adapter (evaluate.py)
    base_evaluation: dict = field(default_factory=dict)  # the same for the base model (adapter disabled)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        return cls(**json.loads(Path(path).read_text()))


def write_json_atomic(path: str | Path, obj) -> None:
    """Write to a temp file then rename, so a reader never sees half a file (even after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def micro_batch_size(config: RunConfig) -> int:
    """Pairs per forward pass. On a CPU one pair at a time pays for no padding between pairs and holds the least
    activation memory at no cost in speed (measured: 1.4x faster than 4-pair forwards, half the peak RSS); a GPU
    wants the whole batch. Gradient accumulation keeps the optimizer step (and the loss) the same."""
    micro = config.micro_batch_size or (config.batch_size if torch.cuda.is_available() else 1)
    if micro < 1 or config.batch_size % micro:
        raise ValueError(f"micro_batch_size {config.micro_batch_size} must divide batch_size {config.batch_size}")
    return micro


def dpo_args(config: RunConfig, **overrides) -> DPOConfig:
    """Map a RunConfig onto TRL's DPOConfig."""
    cuda = torch.cuda.is_available()
    bf16, fp16 = model_lib.mixed_precision(config.precision)
    micro = micro_batch_size(config)
    return DPOConfig(**dict(
        output_dir=config.output_dir,
        beta=config.beta,
        loss_type=[config.loss_type],
        learning_rate=config.learning_rate,
        optim=OPTIMIZERS.get(config.optimizer, config.optimizer),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum * config.batch_size // micro,  # the same optimizer step
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        max_length=config.max_length,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        logging_steps=config.logging_steps,
        save_strategy="no",  # the adapter is saved once at the end; no optimizer-state checkpoints
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,  # TRL defaults bf16 on, which is ~3x slower on a CPU without native bf16 (mixed_precision)
        fp16=fp16,
        gradient_checkpointing=config.gradient_checkpointing,
        report_to="none",
        logging_nan_inf_filter=False,  # let a NaN loss show (and StopOnNonFiniteLoss fail the run)
        use_cpu=not cuda,
        precompute_ref_log_probs=config.precompute_ref,  # once per (base, data, max_length, precision), on disk
        precompute_ref_batch_size=config.batch_size,  # rows sorted by length: whole batches pad little
        train_sampling_strategy="group_by_length" if config.group_by_length and micro > 1 else "random",
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step: skip DDP's extra graph walk
    ) | overrides)


def _eval_metrics(metrics: dict) -> dict:
    return {k: metrics[f"eval_{k}"] for k in EVAL_KEYS if f"eval_{k}" in metrics}


def _best_eval(log_history: list[dict]) -> dict:
    evals = [e for e in log_history if "eval_loss" in e and math.isfinite(e["eval_loss"])]
    if not evals:
        return {}
    best = min(evals, key=lambda e: e["eval_loss"])
    return {"step": best.get("step"), **_eval_metrics(best)}


class StopOnNonFiniteLoss(TrainerCallback):
    """Fail fast on a NaN/inf loss (a too-high learning rate, say) instead of training on garbage."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss}) at step {state.global_step}")


def build_trainer(config: RunConfig, data: PreferenceData, base_model=None, tokenizer=None,
                  **dpo_overrides) -> DPOTrainer:
    """A DPOTrainer for this config; pass an already loaded base model to reuse it."""
    set_seed(config.seed)
    args = dpo_args(config, **dpo_overrides)  # overrides: DPOConfig fields, e.g. for the benchmark's levers
    tokenizer = tokenizer or model_lib.load_tokenizer(config.model)
    base = base_model or model_lib.load_base_model(config.model, load_in_4bit=config.load_in_4bit)
    base = model_lib.prepare_for_training(base, config.gradient_checkpointing)
    from .refcache import CachedRefDPOTrainer  # DPOTrainer + on-disk reference log-probs + length grouping

    trainer = CachedRefDPOTrainer(
        model=base,
        ref_model=None,  # with a peft_config, TRL's reference is this model with the adapter disabled
        peft_config=model_lib.lora_config(base, config.lora_r, config.lora_alpha, config.lora_dropout,
                                          config.lora_targets),
        args=args,
        train_dataset=data.train,
        eval_dataset=data.monitor,
        processing_class=tokenizer,
        callbacks=[StopOnNonFiniteLoss()],
    )
    if not torch.cuda.is_available():
        # TRL casts 4-bit (QLoRA) adapters to bf16, the GPU recipe; a CPU without native bf16 runs it ~3x slower.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def train_dpo(config: RunConfig, data: PreferenceData, trainer: DPOTrainer | None = None) -> RunRecord:
    """Train one DPO run (on `trainer` if given, else a new one), evaluate it, save the adapter, return its record."""
    out = Path(config.output_dir)
    # Data-parallel (accelerate launch, torchrun): every rank trains, only rank 0 writes and runs preference_eval.
    from accelerate.utils import get_int_from_env

    main = get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # The prompt format travels with the adapter: the app must prompt the way training did.
        write_json_atomic(out / "run_config.json", {**config.to_dict(), "prompt_format": data.prompt_format})
    trainer = trainer or build_trainer(config, data)
    main = trainer.is_world_process_zero()
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    history, steps = trainer.state.log_history, trainer.state.global_step
    # Reuse the evaluation the trainer logged at the last step, if any, rather than run the same one twice.
    last_eval = [e for e in history if "eval_loss" in e and e.get("step") == steps]
    final_eval = _eval_metrics(last_eval[-1] if last_eval else trainer.evaluate())

    # Name the base as the user did ("offline:gpt2-tiny", a Hub id), not as a machine-specific cache path.
    for peft_config in getattr(trainer.model, "peft_config", {}).values():
        peft_config.base_model_name_or_path = config.model
    with warnings.catch_warnings():  # peft looks for a config.json under that name to check the vocabulary
        warnings.filterwarnings("ignore", message="Could not find a config file")
        trainer.save_model(str(out))  # adapter (safetensors) + tokenizer; the base weights stay where they were
    train_losses = [e["loss"] for e in history if "loss" in e]
    pairs_seen = steps * config.batch_size * config.grad_accum * trainer.args.world_size  # all ranks
    train_time = wall - sum(e.get("eval_runtime", 0.0) for e in history)  # throughput of training, not eval
    evaluation = preference_eval(trainer.model, trainer.processing_class, data.test, config.beta, config.max_length,
                                 config.batch_size) if main else {"adapter": {}, "base": {}}
    record = RunRecord(
        config=config.to_dict(),
        status="finished",
        train_pairs=len(trainer.train_dataset),
        eval_pairs=len(trainer.eval_dataset),
        train_steps=steps,
        final_train_loss=train_losses[-1] if train_losses else result.training_loss,
        final_eval=final_eval,
        best_eval=_best_eval(history),
        log_history=history,
        wall_time_s=round(wall, 2),
        pairs_per_second=round(pairs_seen / train_time, 3) if train_time > 0 else 0.0,
        adapter_path=str(out.resolve()),
        model_info=model_lib.describe_model(trainer.model, config.model),
        run_id=out.name,
        evaluation=evaluation["adapter"],
        base_evaluation=evaluation["base"],
    )
    if main:
        record.save(out / "record.json")
    return record
