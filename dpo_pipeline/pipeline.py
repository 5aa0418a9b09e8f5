"""One run, start to end: `run(settings)` prepares the data (prepare.py), builds TRL's DPOTrainer over a
LoRA-wrapped (optionally 4-bit) base model, trains, evaluates on held-out pairs and writes the run folder (runs.py).
Every entry point (notebook, `python -m dpo_pipeline train`, sweep, benchmark) comes through here.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import xxhash  # comes with datasets
from transformers import TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from . import model as model_lib
from . import speed
from .args import Settings
from .chat_template import as_text, with_prompt_format
from .data import PreferenceData
from .doctor import diagnose
from .evaluate import preference_eval
from .judge import JudgeError, judged_generations, load_judge, pairwise_accuracy
from .prepare import prepare_data
from .runs import RunRecord, remove_checkpoints, resume_point, write_json_atomic, write_run_start
from .tracking import CompletionsCallback, report_to

EVAL_KEYS = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
             "logps/rejected"]  # TRL's eval metrics that a record keeps (prefix "eval_")


def training_args(settings: Settings) -> DPOConfig:
    """The run's DPOConfig as TRL gets it: the reference precompute batched like the evaluations, the trackers that
    are installed. A new DPOConfig, not the parsed one: building it sets up the devices and resets accelerate's
    process-wide state, which the previous run of this process (another precision, say) left behind."""
    dpo = settings.dpo
    batch = dpo.precompute_ref_batch_size or dpo.per_device_eval_batch_size
    return dataclasses.replace(dpo, report_to=report_to(dpo.report_to), precompute_ref_batch_size=batch)


def pairs_to_train(train, args: DPOConfig, split_seed: int):
    """The pairs a `max_steps` run trains on (max_steps x pairs per step), as the reference precompute scores every
    pair the trainer is given. Drawn with the split's seed, not the training seed, so runs that differ in seed,
    learning rate or beta train on the same pairs and share one cached reference."""
    if args.max_steps <= 0:
        return train
    needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if needed >= len(train):
        return train
    return train.shuffle(seed=split_seed).select(range(needed)).flatten_indices()


class StopOnNonFiniteLoss(TrainerCallback):
    """Fail fast on a NaN/inf loss (a too-high learning rate, say) instead of training on garbage."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss}) at step {state.global_step}")


def build_trainer(settings: Settings, data: PreferenceData, tokenizer=None) -> DPOTrainer:
    """A DPOTrainer for these settings over the base model (4-bit when asked) with LoRA from a peft_config, so TRL's
    reference is the same model with the adapter disabled: one copy of the weights. `trainer: tuned` adds the
    reference cache and the speed levers the settings ask for (speed/)."""
    run, args, model_args = settings.run, training_args(settings), settings.model
    set_seed(args.seed)
    tokenizer = tokenizer or model_lib.load_tokenizer(model_args.model_name_or_path)
    base = model_lib.prepare_for_training(model_lib.load_base_model(model_args), args.gradient_checkpointing)
    trainer_class, levers = speed.trainer_for(run)
    trainer = trainer_class(
        model=base, ref_model=None, args=args, train_dataset=pairs_to_train(data.train, args, run.split_seed),
        eval_dataset=data.monitor, processing_class=tokenizer, callbacks=[StopOnNonFiniteLoss()],
        peft_config=model_lib.lora_config(base, model_args), **levers,
    )
    if run.log_completions > 0:
        trainer.add_callback(CompletionsCallback(trainer, data.monitor["prompt"][:run.log_completions],
                                                 max_new_tokens=48, run_config=settings.to_dict()))
    return trainer


def free_memory() -> None:
    """Hand a finished or failed run's memory back (a CUDA OOM must not starve the next run of a sweep)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _eval_metrics(metrics: dict) -> dict:
    return {k: metrics[f"eval_{k}"] for k in EVAL_KEYS if f"eval_{k}" in metrics}


# (judge, held-out pairs) -> the judge's accuracy on them: the same for every run of a sweep that shares its data
# and judge, and on the full profile 2 x 2,000 DeBERTa-large forwards a run
JUDGE_ACCURACY: dict[tuple[str, str], dict] = {}


def judge_policy(settings: Settings, data: PreferenceData, trainer, tokenizer, folder: Path) -> dict:
    """Judged generations of the trained policy against its base on the first `judge_prompts` prompts of the split
    settings are picked on, written to judged.json; the summary, with the judge's own accuracy on the held-out test
    pairs (what its verdicts are worth), or {"error": why} (the trained run is kept)."""
    if trainer.args.world_size > 1:  # rank 0 alone would generate inside the process group
        return {"error": "not judged in a data-parallel run: run python -m dpo_pipeline evaluate on the adapter"}
    run = settings.run
    try:
        judge = load_judge(run.judge)
        prompts = list(data.monitor["prompt"][:run.judge_prompts])
        result = judged_generations(trainer.model, tokenizer, prompts, judge, seed=settings.dpo.seed)
        pairs = as_text(data.test, tokenizer)  # the held-out pairs as the model reads them, which the judge scores
        key = (run.judge, xxhash.xxh3_128(json.dumps(pairs).encode()).hexdigest())
        if key not in JUDGE_ACCURACY:
            JUDGE_ACCURACY[key] = pairwise_accuracy(judge, pairs)
    except JudgeError as err:
        print(f"judged generations skipped: {err}", flush=True)
        return {"error": str(err)}
    check = JUDGE_ACCURACY[key]
    result["summary"].update(judge_accuracy=check["accuracy"], judge_accuracy_ci=check["accuracy_ci"],
                             judge_pairs=check["pairs"], judge_shorter_accuracy=check["shorter_accuracy"])
    write_json_atomic(folder / "judged.json", result)
    return result["summary"]


def run(settings: Settings, data: PreferenceData | None = None, *,
        setup: Callable[[DPOTrainer], None] | None = None, search: dict | None = None) -> RunRecord:
    """Train one run and write its folder; returns its record. `data` defaults to `prepare_data(settings)`; `setup` is
    called with the trainer before training (the CLI and the benchmark count and time through it); `search`: which
    search made the run (a sweep's), written in the record with it, and "pruned_at_step" there once a pruner stopped
    it (search.PruneLaggingRun)."""
    from accelerate.utils import get_int_from_env

    began = time.perf_counter()
    dpo, name = settings.dpo, settings.model.model_name_or_path
    out = Path(dpo.output_dir)
    tokenizer = with_prompt_format(model_lib.load_tokenizer(name), settings.run.prompt_format)  # saved with it
    data = data or prepare_data(settings, tokenizer)
    # Data-parallel (accelerate launch, torchrun): every rank trains, only rank 0 writes and evaluates.
    main = get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0
    # A run killed part way goes on from its last checkpoint (adapter, optimizer, scheduler, RNG states) when its
    # folder holds the same settings; the reference log-probs come from the disk cache.
    checkpoint = resume_point(out, settings.to_dict())
    if checkpoint:
        print(f"{out.name}: resuming from {checkpoint.name}", flush=True)
    if main:
        write_run_start(out, settings.to_dict(), data.prompt_format, data.report.as_dict())
    trainer = build_trainer(settings, data, tokenizer)
    if setup:
        setup(trainer)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.perf_counter() - start
    history, steps, args = trainer.state.log_history, trainer.state.global_step, trainer.args
    answering = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CompletionsCallback)), None)
    answer_time = answering.seconds if answering else 0.0
    # throughput of training, not of evaluations or answers to the completion prompts (taken before the evaluation
    # below, which logs its own runtime into the same history)
    train_time = wall - sum(e.get("eval_runtime", 0.0) for e in history) - answer_time
    # Reuse the evaluation the trainer logged at the last step, if any, rather than run the same one twice.
    last_eval = next((e for e in reversed(history) if "eval_loss" in e and e.get("step") == steps), None)
    final_eval = _eval_metrics(last_eval or trainer.evaluate())
    evals = [e for e in history if "eval_loss" in e and math.isfinite(e["eval_loss"])]
    best = min(evals, key=lambda e: e["eval_loss"], default=None)

    # Name the base as the user did ("offline:gpt2-tiny", a Hub id), not as a machine-specific cache path.
    for peft_config in getattr(trainer.model, "peft_config", {}).values():
        peft_config.base_model_name_or_path = name
    with warnings.catch_warnings():  # peft looks for a config.json under that name to check the vocabulary
        warnings.filterwarnings("ignore", message="Could not find a config file")
        trainer.save_model(str(out))  # adapter (safetensors) + tokenizer; the base weights stay where they were
    if main:
        remove_checkpoints(out)  # a finished run keeps only its adapter
    pairs_seen = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    scoring = time.perf_counter()
    evaluation = preference_eval(trainer.model, tokenizer, data.test, dpo.beta, dpo.max_length,
                                 dpo.per_device_eval_batch_size) if main else {"adapter": {}, "base": {}}
    judging = time.perf_counter()
    judged = {}
    if main and settings.run.judge not in (None, "", "none"):  # "none" turns off a profile's judge from a file or flag
        judged = judge_policy(settings, data, trainer, tokenizer, out)
    # where the run's time went (a sweep's cost is more than its training: README, "Faster training")
    timings = dict(build=start - began, reference=sum(e["seconds"] for e in getattr(trainer, "ref_cache_events", [])),
                   training=train_time, evaluations=sum(e.get("eval_runtime", 0.0) for e in history),
                   answers=answer_time, held_out=judging - scoring, judged=time.perf_counter() - judging,
                   total=time.perf_counter() - began)
    record = RunRecord(
        config=settings.to_dict(), status="pruned" if (search or {}).get("pruned_at_step") else "finished",
        search=dict(search or {}), train_pairs=len(trainer.train_dataset),
        eval_pairs=len(trainer.eval_dataset), train_steps=steps,
        final_train_loss=next((e["loss"] for e in reversed(history) if "loss" in e), result.training_loss),
        final_eval=final_eval, best_eval={"step": best.get("step"), **_eval_metrics(best)} if best else {},
        log_history=history, wall_time_s=round(wall, 2),
        pairs_per_second=round(pairs_seen / train_time, 3) if train_time > 0 else 0.0,
        adapter_path=str(out.resolve()), model_info=model_lib.describe_model(trainer.model, name),
        run_id=out.name, evaluation=evaluation["adapter"], base_evaluation=evaluation["base"], judged=judged,
        completions=answering.rows() if answering else [], timings_s={k: round(v, 2) for k, v in timings.items()},
        resumed_from_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None,
    )
    record.findings = diagnose(record.to_dict())
    if main:
        report_findings(record.findings, trainer)
        record.save(out / "record.json")
    return record


def report_findings(findings: list[str], trainer) -> None:
    """The doctor's findings printed, and as text in the run's TensorBoard log (its writer closed with training)."""
    from transformers.integrations import TensorBoardCallback

    for finding in findings:
        print(f"doctor: {finding}", flush=True)
    board = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None)
    if findings and board is not None and board.logging_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=board.logging_dir) as writer:
            writer.add_text("doctor", "\n\n".join(f"- {finding}" for finding in findings))
