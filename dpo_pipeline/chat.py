"""Chat stage: load a trained adapter (local folder or Hub repo) on its base model and stream answers from it.

One model is kept in memory: the base with the LoRA adapter on top. The base model's answer to the same prompt comes
from the same weights with the adapter switched off (`disable_adapter()`), as the DPO reference did in training.
Every user-facing failure is a `ChatError` whose message is one line; the app shows it and never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .card import base_model_of
from .chat_template import ASSISTANT, HUMAN, format_name, with_prompt_format
from .hf import OFFLINE_PREFIX, hub_reachable, repo_id_problem
from .runs import UPLOAD_FILES, adapter_files, read_run

MAX_CHARS = 2000  # one message; the chat box enforces it too
MAX_PROMPT_TOKENS = 768  # history beyond this is dropped from the left (also capped by the model's context)


class ChatError(RuntimeError):
    """An adapter or prompt the app cannot use; the message is one line that says what to do."""


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

    model: object  # peft PeftModel
    tokenizer: object
    source: str  # what the user typed: a repo id or a folder
    folder: Path  # the local files (a Hub snapshot for a repo id)
    base: str
    load_in_4bit: bool
    run: dict  # runs.read_run(): adapter_config, run_config, record, cleaning_report
    card: str = ""  # the README.md model card, when there is one
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per model

    @property
    def offline_base(self) -> bool:
        return self.base.startswith(OFFLINE_PREFIX + "gpt2")  # random weights (offline:smollm2-135m is a real model)

    @property
    def prompt_format(self) -> str:
        """How training prompted the model: "text" (Human/Assistant) or "chat" (the model's own chat template)."""
        return format_name(self.tokenizer)


def default_source(results: str | Path | None = None) -> str:
    """$DPO_APP_ADAPTER, else results/best, else the newest results/**/ folder with an adapter; "" if none.

    `results` defaults to $DPO_RESULTS_DIR or the repo's results/ folder, as for the notebook.
    """
    if os.environ.get("DPO_APP_ADAPTER"):
        return os.environ["DPO_APP_ADAPTER"]
    results = Path(results or os.environ.get("DPO_RESULTS_DIR") or Path(__file__).resolve().parents[1] / "results")
    best = results / "best"
    # peft saves extra adapters (e.g. TRL's "ref") in subfolders of the run folder: those are not runs.
    runs = [p.parent for p in sorted(results.glob("**/adapter_config.json"), key=lambda p: p.stat().st_mtime)
            if not adapter_files(p.parent.parent)]
    found = [best] if adapter_files(best) else runs[-1:]
    if not found:
        return ""
    try:  # shorter to read in the sidebar: relative to where the app was started, when inside it
        return str(found[0].resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(found[0])


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)


def resolve_adapter(source: str) -> Path:
    """The local folder holding the adapter `source` names: the folder itself, or a Hub repo's snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    source = source.strip()
    if not source:
        raise ChatError("No adapter given: enter a Hub repo id (user/name) or a local folder with adapter_config.json")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not adapter_files(path):
            raise ChatError(f"{source} is not an adapter folder: it needs adapter_config.json and "
                            "adapter_model.safetensors (a run folder from the notebook, e.g. results/run-smoke)")
        return path
    why = None if _looks_like_path(source) else repo_id_problem(source)
    if why or _looks_like_path(source) or "/" not in source:
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
    except HfHubHTTPError as err:
        raise ChatError(f"Cannot fetch {source!r} from the Hub: {str(err).splitlines()[0]}") from None
    except Exception as err:  # offline and not cached, or the connection dropped
        if online:
            raise ChatError(f"Cannot fetch {source!r} from the Hub: {type(err).__name__}") from None
        raise ChatError(f"No folder {source!r} here, and the Hugging Face Hub cannot be reached to fetch it as a "
                        "repo (nor is it in the local cache)") from None
    if not adapter_files(folder):
        raise ChatError(f"The Hub repo {source!r} holds no LoRA adapter (adapter_config.json + "
                        "adapter_model.safetensors)")
    return folder


def load_adapter(source: str, base_override: str | None = None) -> LoadedAdapter:
    """Resolve `source`, load its base model the way training did (4-bit when the run was) and put the adapter on."""
    # Here for start-up speed: peft and model.py (~1.5 s) load with the first adapter, not before the app draws.
    from peft import PeftModel

    from .model import ModelLoadError, load_base_model, load_tokenizer

    folder = resolve_adapter(source)
    run = read_run(folder)
    adapter_base, trained_on = run["adapter_config"].get("base_model_name_or_path"), run["run_config"].get("model_name_or_path")
    if not base_override and adapter_base and trained_on and adapter_base != trained_on:
        raise ChatError(f"{source}: adapter_config.json names base {adapter_base!r} but run_config.json says it was "
                        f"trained on {trained_on!r}; this adapter belongs to another base model")
    base = base_override or base_model_of(run)
    if not base:
        raise ChatError(f"{source}: adapter_config.json names no base model; enter one as the base model override")
    load_in_4bit = bool(run["run_config"].get("load_in_4bit", False))
    try:
        model = load_base_model(base, load_in_4bit=load_in_4bit)
        # the tokenizer and chat template saved with the adapter, else the base model's; a run that trained on the
        # Human/Assistant format says so in run_config.json (adapters of other trainers: the folder's template)
        tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else base)
        with_prompt_format(tokenizer, "text" if run["run_config"].get("prompt_format") == "text" else "auto")
    except ModelLoadError as err:
        raise ChatError(str(err)) from None
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except RuntimeError as err:
        if "size mismatch" in str(err):
            raise ChatError(f"The adapter in {source} does not fit base model {base!r} (its tensor shapes differ): "
                            "it was trained on another base model") from None
        raise ChatError(f"Cannot put the adapter from {source} on {base!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, KeyError, OSError) as err:
        raise ChatError(f"Cannot put the adapter from {source} on {base!r}: {type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}") from None
    model.eval()
    card = (folder / "README.md").read_text(errors="replace") if (folder / "README.md").exists() else ""
    return LoadedAdapter(model, tokenizer, source.strip(), folder, base, load_in_4bit, run, card)


def build_prompt(tokenizer, turns: list[tuple[str, str]], user: str, *, max_chars: int = MAX_CHARS,
                 max_tokens: int = MAX_PROMPT_TOKENS) -> tuple[str, list[str]]:
    """The prompt for `user` after the earlier (user, answer) `turns`, rendered with the adapter's chat template
    (the one it was trained with), plus notes on what was cut to fit: the message to `max_chars`, then the
    oldest turns until it fits `max_tokens`, then, if still too long, all but its last tokens."""

    def render(history):
        messages = [{"role": role, "content": text} for u, a in history
                    for role, text in (("user", u), ("assistant", a))] + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    notes = []
    if len(user) > max_chars:
        user, notes = user[:max_chars], [f"Your message was cut to {max_chars} characters."]
    kept = list(turns)
    prompt = render(kept)
    while kept and len(tokenizer(prompt)["input_ids"]) > max_tokens:
        kept.pop(0)  # history goes from the left: the newest context matters most
        prompt = render(kept)
    dropped = len(turns) - len(kept)
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) > max_tokens:
        prompt = tokenizer.decode(ids[-max_tokens:])
        notes.append(f"The prompt was cut to its last {max_tokens} tokens.")
    return prompt, notes + ([f"{dropped} earlier turn(s) were left out to fit {max_tokens} tokens."] if dropped
                            else [])


def prompt_budget(loaded: LoadedAdapter, settings: GenerationSettings) -> int:
    """Prompt tokens the model has room for: its context minus the answer, and at most MAX_PROMPT_TOKENS."""
    context = getattr(loaded.model.config, "n_positions", None) or getattr(
        loaded.model.config, "max_position_embeddings", 1024)
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
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

    class Cancelled(StoppingCriteria):  # stops generate() when the reader goes away (page rerun, closed stream)
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

    model, tokenizer = loaded.model, loaded.tokenizer
    cancel, errors = threading.Event(), []
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    inputs = tokenizer(prompt, return_tensors="pt")
    sample = settings.temperature > 0
    kwargs = dict(
        **inputs, streamer=streamer, max_new_tokens=settings.max_new_tokens, do_sample=sample,
        repetition_penalty=settings.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
        stop_strings=[HUMAN, ASSISTANT], tokenizer=tokenizer, stopping_criteria=StoppingCriteriaList([Cancelled()]),
        **({"temperature": settings.temperature, "top_p": settings.top_p} if sample else {}),
    )

    def generate():
        try:
            with torch.no_grad(), (contextlib.nullcontext() if use_adapter else model.disable_adapter()):
                model.generate(**kwargs)
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
        err = errors[0]
        raise ChatError(f"Generation failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")


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
            "config": config, "metrics": metrics, "has_card": bool(loaded.card)}
