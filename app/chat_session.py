"""The app's side of a chat: the prompt from the turns so far, cut to fit the model; answers streamed until the model
starts the next human turn; what is loaded, for the page. The adapter itself is loaded by dpo_pipeline.chat."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dpo_pipeline.args import results_dir
from dpo_pipeline.chat import ChatError, LoadedAdapter
from dpo_pipeline.errors import first_line
from dpo_pipeline.chat_template import ASSISTANT, HUMAN
from dpo_pipeline.runs import adapter_files

MAX_CHARS = 2000  # one message; the chat box enforces it too
MAX_PROMPT_TOKENS = 768  # history beyond this is dropped from the left (also capped by the model's context)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int = 0


def default_source(results: str | Path | None = None) -> str:
    """$DPO_APP_ADAPTER, else results/best, else the newest results/**/ folder with an adapter; "" if none.
    `results` defaults to $DPO_RESULTS_DIR or the repo's results/ folder, as for the notebook."""
    if os.environ.get("DPO_APP_ADAPTER"):
        return os.environ["DPO_APP_ADAPTER"]
    results = Path(results or results_dir())
    # peft saves extra adapters (e.g. TRL's "ref") in subfolders of the run folder: those are not runs.
    runs = [p.parent for p in sorted(results.glob("**/adapter_config.json"), key=lambda p: p.stat().st_mtime)
            if not adapter_files(p.parent.parent)]
    runs += [results / "best"] if adapter_files(results / "best") else []
    if not runs:
        return ""
    # shorter to read in the sidebar: relative to where the app was started, when inside it
    here = runs[-1].resolve()
    return str(here.relative_to(Path.cwd()) if here.is_relative_to(Path.cwd()) else runs[-1])


def build_prompt(tokenizer, turns: list[tuple[str, str]], user: str, *, max_chars: int = MAX_CHARS,
                 max_tokens: int = MAX_PROMPT_TOKENS) -> tuple[str, list[str]]:
    """The prompt for `user` after the earlier (user, answer) `turns`, rendered with the adapter's chat template
    (the one it was trained with), and notes on what was cut to fit: the message to `max_chars`, then the oldest
    turns until it fits `max_tokens`, then, if still too long, all but its last tokens."""
    notes = []
    if len(user) > max_chars:
        user, notes = user[:max_chars], [f"Your message was cut to {max_chars} characters."]
    for dropped in range(len(turns) + 1):  # history goes from the left: the newest context matters most
        messages = [{"role": role, "content": text} for turn in turns[dropped:]
                    for role, text in zip(("user", "assistant"), turn)] + [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) <= max_tokens:
            break
    if len(ids) > max_tokens:
        prompt = tokenizer.decode(ids[-max_tokens:])
        notes.append(f"The prompt was cut to its last {max_tokens} tokens.")
    if dropped:
        notes.append(f"{dropped} earlier turn(s) were left out to fit {max_tokens} tokens.")
    return prompt, notes


def prompt_budget(loaded: LoadedAdapter, settings: GenerationSettings) -> int:
    """Prompt tokens the model has room for: its context minus the answer, and at most MAX_PROMPT_TOKENS."""
    config = loaded.model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
    return max(16, min(MAX_PROMPT_TOKENS, context - settings.max_new_tokens))


def until_human_turn(pieces: Iterator[str]) -> Iterator[str]:
    """Pass text through until the model starts the next "\\n\\nHuman:" turn; hold back what may be its start."""
    buffer = ""
    for piece in pieces:
        buffer += piece
        cut = buffer.find(HUMAN)
        if cut < 0:
            cut = buffer.find(ASSISTANT)  # a second assistant cue is no better
        if cut >= 0:
            if buffer[:cut]:
                yield buffer[:cut]
            return
        keep = max((k for k in range(1, len(ASSISTANT)) if buffer.endswith((HUMAN[:k], ASSISTANT[:k]))), default=0)
        if len(buffer) > keep:
            yield buffer[:len(buffer) - keep]
            buffer = buffer[len(buffer) - keep:]
    if buffer:
        yield buffer


def stream_reply(loaded: LoadedAdapter, prompt: str, settings: GenerationSettings,
                 use_adapter: bool = True) -> Iterator[str]:
    """Yield the answer to `prompt` as it is generated (adapter on, or off for the base model's answer)."""
    import torch
    from transformers import StoppingCriteria, TextIteratorStreamer, set_seed

    class Cancelled(StoppingCriteria):  # stops generate() when the reader goes away (page rerun, closed stream)
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

    model, tokenizer = loaded.model, loaded.tokenizer
    cancel, errors = threading.Event(), []
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.temperature > 0 else {}

    def generate():
        try:
            with torch.no_grad(), (contextlib.nullcontext() if use_adapter else model.disable_adapter()):
                model.generate(**tokenizer(prompt, return_tensors="pt"), streamer=streamer, tokenizer=tokenizer,
                               max_new_tokens=settings.max_new_tokens, do_sample=bool(sampling), **sampling,
                               repetition_penalty=settings.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                               stop_strings=[HUMAN, ASSISTANT], stopping_criteria=[Cancelled()])
        except Exception as err:  # reported by the reader below, as one line
            errors.append(err)
            streamer.end()

    with loaded.lock:  # disable_adapter() and the seed are model-wide: one generation at a time
        set_seed(settings.seed)
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            yield from until_human_turn(iter(streamer))
        finally:
            cancel.set()
            worker.join()
    if errors:
        raise ChatError(f"Generation failed: {first_line(errors[0])}")


def reply(loaded: LoadedAdapter, prompt: str, settings: GenerationSettings, use_adapter: bool = True) -> str:
    """The whole answer at once (for scripts and tests)."""
    return "".join(stream_reply(loaded, prompt, settings, use_adapter)).strip()


def describe(loaded: LoadedAdapter) -> dict:
    """What is loaded, for the page: where from, the base, the training config and the eval metrics."""
    config = {k: v for k, v in loaded.run["run_config"].items() if k != "output_dir"}
    record = loaded.run["record"]
    metrics = {name: record[key] for name, key in (("final", "final_eval"), ("best", "best_eval"),
                                                   ("base model", "base_evaluation")) if record.get(key)}
    return {"source": loaded.source, "folder": str(loaded.folder), "base": loaded.base,
            "quantization": "4-bit NF4" if loaded.load_in_4bit else "full precision",
            "config": config, "metrics": metrics}
