"""Experiment tracking: where a run's live logs go (`report_to`: "tensorboard", the default, "trackio", "wandb",
"mlflow", several joined by commas, or "none") and the answers it gives while it trains (`CompletionsCallback`).
"""

from __future__ import annotations

import json
import time

from transformers import GenerationConfig
from transformers.integrations import TensorBoardCallback, is_tensorboard_available
from trl.trainer.callbacks import LogCompletionsCallback

from .args import tracker_names


def report_to(setting: list[str]) -> list[str]:
    """DPOConfig's report_to (a list, of names or names joined by commas) as names. TensorBoard is dropped, with one
    line saying so, when its package is missing: training must not fail for want of a log viewer. No tracker is [],
    not ["none"], which transformers refuses once TrainingArguments exist (pipeline.training_args sets it after)."""
    names = tracker_names(setting)
    if "tensorboard" in names and not is_tensorboard_available():
        print("tracking: tensorboard is not installed (pip install tensorboard): not logging to it", flush=True)
        names.remove("tensorboard")
    return names


def tensorboard_writer(trainer):
    """The SummaryWriter of the trainer's TensorBoard callback, once training has begun (else None)."""
    return next((cb.tb_writer for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)),
                None)


class CompletionsCallback(LogCompletionsCallback):
    """TRL's LogCompletionsCallback (W&B and Comet only) extended to TensorBoard and trackio: greedy answers to a few
    fixed `prompts` at every evaluation step; `self.table` holds (step, prompt, completion) rows for the run record."""

    def __init__(self, trainer, prompts: list[str], max_new_tokens: int, run_config: dict):
        super().__init__(trainer, GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                                   pad_token_id=trainer.processing_class.pad_token_id))
        self.eval_dataset = {"prompt": list(prompts)}  # TRL reads only the "prompt" column: the raw text
        self.run_config = run_config
        self.seconds = 0.0  # spent answering: not training time (the record's pairs/s leaves it out)

    def on_train_begin(self, args, state, control, **kwargs):
        # Transformers' TensorBoard callback logs TRL's DPOConfig; the project's own settings (model, LoRA, data)
        # are what a reader of the logs looks for first.
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            writer.add_text("run_config", f"```\n{json.dumps(self.run_config, indent=2, default=str)}\n```")

    def on_step_end(self, args, state, control, **kwargs):
        # TRL's own check, made first so that the steps in between do not switch the model to eval and back.
        if state.global_step == self._last_logged_step or state.global_step % (self.freq or state.eval_steps):
            return
        tokenizer, model = kwargs["processing_class"], self.trainer.model
        padding_side, training = tokenizer.padding_side, model.training
        logged, start = len(self.table), time.perf_counter()
        model.eval()  # no LoRA dropout while answering
        try:
            super().on_step_end(args, state, control, **kwargs)  # generates, and logs to W&B / Comet
        finally:
            tokenizer.padding_side = padding_side  # TRL leaves it on "left"; training collates on the right
            model.train(training)
            self.seconds += time.perf_counter() - start
        new = self.table[logged:]
        if not new or not state.is_world_process_zero:
            return
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            for i, (step, prompt, completion) in enumerate(new):
                writer.add_text(f"completions/prompt_{i}", f"**prompt** …{prompt[-300:]}\n\n**answer** {completion}",
                                int(step))
            writer.flush()
        if "trackio" in args.report_to:
            import trackio

            trackio.log({"completions": trackio.Table(columns=["step", "prompt", "completion"], data=self.table)})

    def rows(self) -> list[dict]:
        return [{"step": int(step), "prompt": prompt, "completion": completion}
                for step, prompt, completion in self.table]
