"""Hub stage: is the Hugging Face Hub reachable, and push a trained adapter (with a model card) to a model repo.

`push_adapter` never raises for the usual problems (no repo id, no token, no network, a bad repo id, an HTTP error):
it returns a `PushResult` whose `message` is one line, so a notebook can print it and carry on. The token is only
ever handed to huggingface_hub; it is never printed, logged or written into the card or the uploaded files.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants

from .runs import adapter_files

@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub (or the endpoint HF_ENDPOINT names) answers; False offline or with HF_HUB_OFFLINE=1."""
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except (OSError, ValueError):
        return False


@dataclass
class PushResult:
    """The outcome of `push_adapter`: status "pushed", "skipped" (nothing attempted) or "failed"; one-line message."""

    status: str
    message: str
    repo_id: str | None = None
    commit_url: str | None = None
    private: bool = False
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "pushed"

    def __str__(self) -> str:
        return self.message


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a valid Hub model repo id ("name" or "namespace/name"), or None when it is."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return " ".join(str(err).split())
    return None


def _one_line(err: BaseException, token: str | None) -> str:
    """A library error as one line, with the token scrubbed in case a message ever echoed it."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        text = "the Hub rejected the token (401): log in again with `hf auth login` or set a valid HF_TOKEN"
    elif isinstance(err, HfHubHTTPError) and status == 403:
        text = "the token has no write access to this namespace (403): use a write token or your own namespace"
    else:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return text.replace(token, "***") if token else text


def _files_with(folder: Path, secret: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if secret.encode() in p.read_bytes())


def push_adapter(
    adapter_dir: str | Path,
    repo_id: str | None,
    *,
    private: bool = False,
    token: str | None = None,
    sweep_rows: list[dict] | None = None,
    base_eval: dict | None = None,
    dataset: str | None = None,
    license: str = "mit",
    commit_message: str = "Upload DPO LoRA adapter",
) -> PushResult:
    """Push the adapter in `adapter_dir` (weights, config, tokenizer, run records) and a model card to `repo_id`.

    The repo is created when missing (public, or private with `private=True`). The token comes from `token`, else
    HF_TOKEN, else the saved login (`hf auth login`). The local folder is only read.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from .card import build_model_card

    folder = Path(adapter_dir)
    if not repo_id:
        return PushResult("skipped", f"Not pushing: no Hub repo id given (the adapter stays in {folder}).")
    problem = repo_id_problem(repo_id)
    if problem:
        return PushResult("failed", f"Not pushing: bad repo id {repo_id!r}: {problem}", repo_id)
    names = adapter_files(folder)
    if not names:
        return PushResult("failed", f"Not pushing: {folder} has no LoRA adapter (adapter_config.json + "
                                    "adapter_model.safetensors)", repo_id)
    token = token or get_token()
    if not token:
        return PushResult("skipped", f"Not pushing to {repo_id}: no Hugging Face token; log in with "
                                     f"`hf auth login` or set HF_TOKEN (the adapter stays in {folder}).", repo_id)
    if not hub_reachable():
        return PushResult("skipped", f"Not pushing to {repo_id}: the Hugging Face Hub ({constants.ENDPOINT}) cannot "
                                     f"be reached (the adapter stays in {folder}).", repo_id)

    api = HfApi(token=token)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one line in the notebook, not a progress display per file
    try:
        with tempfile.TemporaryDirectory(prefix="dpo-push-") as tmp:
            # Stage copies: only the chosen files go up, and the card is written beside them, not into the run.
            staging = Path(tmp)
            for name in names:
                shutil.copy2(folder / name, staging / name)
            if leaked := _files_with(staging, token):  # checked before anything is created on the Hub
                return PushResult("failed", f"Not pushing to {repo_id}: {', '.join(leaked)} contain(s) your HF "
                                            "token; remove it from the run files first", repo_id)
            if "/" not in repo_id:  # a bare name goes under the token owner's namespace, as on the website
                repo_id = f"{api.whoami()['name']}/{repo_id}"
            try:  # an existing repo keeps its visibility; report the real one
                private = bool(api.model_info(repo_id).private)
                created = False
            except RepositoryNotFoundError:
                api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
                created = True
            build_model_card(folder, repo_id, sweep_rows=sweep_rows, base_eval=base_eval, dataset=dataset,
                             license=license).save(staging / "README.md")
            if _files_with(staging, token):  # the token came in through sweep_rows or base_eval
                return PushResult("failed", f"Not pushing to {repo_id}: the model card would contain your HF "
                                            "token (from sweep_rows or base_eval)", repo_id)
            commit = api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="model",
                                       commit_message=commit_message)
    except Exception as err:  # any library or HTTP error: one line, the notebook carries on
        return PushResult("failed", f"Push to {repo_id} failed: {_one_line(err, token)}", repo_id, private=private)
    finally:
        if not quiet:
            enable_progress_bars()
    files = sorted([*names, "README.md"])
    where = f"{'new' if created else 'existing'} {'private' if private else 'public'} repo {repo_id}"
    return PushResult("pushed", f"Pushed {len(files)} files to {where}: {commit.commit_url}",
                      repo_id, commit.commit_url, private, files)
