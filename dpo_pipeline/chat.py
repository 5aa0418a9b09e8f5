"""Chat stage: load a trained adapter (local folder or Hub repo) on its base model and stream answers from it.

One model is kept in memory: the base with the LoRA adapter on top; the base model answers from the same weights with
the adapter switched off (`disable_adapter()`), as the DPO reference did in training. Every user-facing failure is a
`ChatError` whose message is one line; the app shows it and never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from huggingface_hub import snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from .card import base_model_of
from .chat_template import ASSISTANT, HUMAN, format_name, with_prompt_format
from .hf import hub_reachable, repo_id_problem
from .runs import UPLOAD_FILES, adapter_files, read_run

MAX_CHARS = 2000  # one message; the chat box enforces it too
MAX_PROMPT_TOKENS = 768  # history beyond this is dropped from the left (also capped by the model's context)


class ChatError(RuntimeError):
    """An adapter or prompt the app cannot use; the message is one line that says what to do."""


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: int = 0


@dataclass
class LoadedAdapter:
    """The base model with the adapter on it, its tokenizer, and what was loaded (for the page to show)."""

    model: object  # a peft PeftModel
    tokenizer: object
    source: str  # what the user typed: a repo id or a folder
    folder: Path  # the local files (a Hub snapshot for a repo id)
    base: str
    load_in_4bit: bool
    run: dict  # runs.read_run(): adapter_config, run_config, record, cleaning_report
    card: str = ""  # the README.md model card, when there is one
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per model

    @property
    def prompt_format(self) -> str:
        """How training prompted the model: "text" (Human/Assistant) or "chat" (the model's own chat template)."""
        return format_name(self.tokenizer)


def default_source(results: str | Path | None = None) -> str:
    """$DPO_APP_ADAPTER, else results/best, else the newest results/**/ folder with an adapter; "" if none.
    `results` defaults to $DPO_RESULTS_DIR or the repo's results/ folder, as for the notebook."""
    if os.environ.get("DPO_APP_ADAPTER"):
        return os.environ["DPO_APP_ADAPTER"]
    results = Path(results or os.environ.get("DPO_RESULTS_DIR") or Path(__file__).resolve().parents[1] / "results")
    # peft saves extra adapters (e.g. TRL's "ref") in subfolders of the run folder: those are not runs.
    runs = [p.parent for p in sorted(results.glob("**/adapter_config.json"), key=lambda p: p.stat().st_mtime)
            if not adapter_files(p.parent.parent)]
    runs += [results / "best"] if adapter_files(results / "best") else []
    if not runs:
        return ""
    # shorter to read in the sidebar: relative to where the app was started, when inside it
    here = runs[-1].resolve()
    return str(here.relative_to(Path.cwd()) if here.is_relative_to(Path.cwd()) else runs[-1])


def resolve_adapter(source: str) -> Path:
    """The local folder holding the adapter `source` names: the folder itself, or a Hub repo's snapshot."""
    source = source.strip()
    if not source:
        raise ChatError("No adapter given: enter a Hub repo id (user/name) or a local folder with adapter_config.json")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not adapter_files(path):
            raise ChatError(f"{source} is not an adapter folder: it needs adapter_config.json and "
                            "adapter_model.safetensors (a run folder from the notebook, e.g. results/run-smoke)")
        return path
    path_like = source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)
    why = None if path_like else repo_id_problem(source)
    if path_like or why or "/" not in source:
        raise ChatError(f"No folder {source!r} here, and it is not a Hub repo id of the form user/name"
                        + (f" ({why})" if why else ""))
    online = hub_reachable()
    try:
        folder = Path(snapshot_download(source, allow_patterns=[*UPLOAD_FILES, "README.md"],
                                        local_files_only=not online))
    except RepositoryNotFoundError:
        raise ChatError(f"No model repo {source!r} on the Hub (if it is private, log in with `hf auth login` "
                        "or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ChatError(f"The Hub repo {source!r} has no main branch") from None
    except Exception as err:  # another Hub error or a dropped connection; offline: not in the cache
        if online:
            raise ChatError(f"Cannot fetch {source!r} from the Hub: {first_line(err)}") from None
        raise ChatError(f"No folder {source!r} here, and the Hugging Face Hub cannot be reached to fetch it as a "
                        "repo (nor is it in the local cache)") from None
    if not adapter_files(folder):
        raise ChatError(f"The Hub repo {source!r} holds no LoRA adapter (adapter_config.json + "
                        "adapter_model.safetensors)")
    return folder


def load_adapter(source: str, base_override: str | None = None) -> LoadedAdapter:
    """Resolve `source`, load its base model the way training did (4-bit when the run was) and put the adapter on."""
    # imported here so that the app draws its page before peft and model.py load
    from peft import PeftModel

    from .model import ModelLoadError, load_base_model, load_tokenizer

    folder = resolve_adapter(source)
    run = read_run(folder)
    config = run["run_config"]
    adapter_base, trained_on = run["adapter_config"].get("base_model_name_or_path"), config.get("model_name_or_path")
    if not base_override and adapter_base and trained_on and adapter_base != trained_on:
        raise ChatError(f"{source}: adapter_config.json names base {adapter_base!r} but run_config.json says it was "
                        f"trained on {trained_on!r}; this adapter belongs to another base model")
    base = base_override or base_model_of(run)
    if not base:
        raise ChatError(f"{source}: adapter_config.json names no base model; enter one as the base model override")
    load_in_4bit = bool(config.get("load_in_4bit", False))
    try:
        model = load_base_model(base, load_in_4bit=load_in_4bit)
        # the tokenizer and chat template saved with the adapter, else the base model's; a run that trained on the
        # Human/Assistant format says so in run_config.json (adapters of other trainers: the folder's template)
        tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else base)
        with_prompt_format(tokenizer, "text" if config.get("prompt_format") == "text" else "auto")
    except ModelLoadError as err:
        raise ChatError(str(err)) from None
    try:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        if "size mismatch" in str(err):
            raise ChatError(f"The adapter in {source} does not fit base model {base!r} (its tensor shapes differ): "
                            "it was trained on another base model") from None
        raise ChatError(f"Cannot put the adapter from {source} on {base!r}: {first_line(err)}") from None
    card = (folder / "README.md").read_text(errors="replace") if (folder / "README.md").exists() else ""
    return LoadedAdapter(model, tokenizer, source.strip(), folder, base, load_in_4bit, run, card)


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
