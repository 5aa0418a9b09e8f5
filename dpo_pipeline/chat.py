"""Chat stage: load a trained adapter (local folder or Hub repo) on its base model, the way training did; the app
(app/chat_session.py) and the evaluation answer with it.

One model is kept in memory: the base with the LoRA adapter on top; the base model answers from the same weights with
the adapter switched off (`disable_adapter()`), as the DPO reference did in training. Every user-facing failure is a
`ChatError` whose message is one line; the app shows it and never a traceback.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from .card import base_model_of
from .chat_template import format_name, with_prompt_format
from .errors import first_line
from .hf import hub_reachable, repo_id_problem
from .runs import UPLOAD_FILES, adapter_files, read_run

class ChatError(RuntimeError):
    """An adapter or prompt the app cannot use; the message is one line that says what to do."""


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
    from .model import ModelLoadError, attach_adapter, load_base_model, load_tokenizer

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
        model = attach_adapter(model, folder, base, source).eval()
    except ModelLoadError as err:
        raise ChatError(str(err)) from None
    card = (folder / "README.md").read_text(errors="replace") if (folder / "README.md").exists() else ""
    return LoadedAdapter(model, tokenizer, source.strip(), folder, base, load_in_4bit, run, card)
