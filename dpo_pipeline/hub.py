"""Hub stage: push a trained adapter (with a model card) to a model repo (whether the Hub answers: hf.py).

`push_adapter` never raises for the usual problems (no repo id, no token, no network, a bad repo id, an HTTP error):
it returns a `PushResult` whose `message` is one line, so a notebook can print it and carry on. The token is only
ever handed to huggingface_hub; it is never printed, logged or written into the card or the uploaded files.

With `merged_dir` (a folder export.merge_adapter wrote) the merged model goes to its own repo ``<repo_id>-merged``,
files at its root, so ``AutoModelForCausalLM.from_pretrained("<repo_id>-merged")`` loads it without peft.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from .card import base_model_of, build_model_card
from .hf import hub_reachable, is_hub_id, repo_id_problem
from .runs import adapter_files, read_run

MERGED_SUFFIX = "-merged"  # the merged model's repo: <repo_id>-merged


@dataclass
class PushResult:
    """The outcome of `push_adapter`: status "pushed", "skipped" (nothing attempted) or "failed"; one-line message."""

    status: str
    message: str
    repo_id: str | None = None
    commit_url: str | None = None
    private: bool = False
    files: list[str] = field(default_factory=list)
    merged_repo_id: str | None = None  # where the merged model went (push_adapter(merged_dir=...))
    merged_commit_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "pushed"

    def __str__(self) -> str:
        return self.message


def _one_line(err: BaseException, token: str | None) -> str:
    """A library error as one line, with the token scrubbed in case a message ever echoed it."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        text = "the Hub rejected the token (401): log in again with `hf auth login` or set a valid HF_TOKEN"
    elif isinstance(err, HfHubHTTPError) and status == 403:
        text = "the token has no write access to this namespace (403): use a write token or your own namespace"
    else:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return text.replace(token, "***") if token else text


def _files_with(folder: Path, secret: str, names: list[str] | None = None) -> list[str]:
    names = [p.name for p in folder.iterdir()] if names is None else names
    return sorted(n for n in names if secret.encode() in (folder / n).read_bytes())


def merged_files(folder: str | Path) -> list[str]:
    """The files of a merged checkpoint folder to upload (all but README.md); empty when it is not a checkpoint."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != "README.md") if folder.is_dir() else []
    return names if "config.json" in names and any(n.endswith(".safetensors") for n in names) else []


def merged_card(repo_id: str, adapter_repo_id: str, base: str | None, license: str) -> str:
    """A short card for the merged repo: what it is and how to load it; the adapter's card has the details."""
    data = ModelCardData(library_name="transformers", license=license, base_model=base if is_hub_id(base) else None,
                         tags=["trl", "dpo", "text-generation", "preference-tuning", "merged"])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n# {repo_id.split('/')[-1]}\n\nThe DPO LoRA adapter "
                         f"`{adapter_repo_id}` merged into its base model `{base}` (peft `merge_and_unload`): an "
                         "ordinary transformers checkpoint, no peft needed. Training settings and metrics are on the "
                         f"adapter's card.\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer"
                         f'\n\nmodel = AutoModelForCausalLM.from_pretrained("{repo_id}")\ntokenizer = '
                         f'AutoTokenizer.from_pretrained("{repo_id}")\n```\n'))


def _ensure_repo(api, repo_id: str, private: bool) -> tuple[bool, bool]:
    """(private, created): an existing repo keeps its visibility (the real one is reported), a missing one is made."""
    try:
        return bool(api.model_info(repo_id).private), False
    except RepositoryNotFoundError:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return private, True


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
    merged_dir: str | Path | None = None,
) -> PushResult:
    """Push the adapter in `adapter_dir` (weights, config, tokenizer, run records) and a model card to `repo_id`;
    with `merged_dir` (export.merge_adapter's folder), push that merged model and a short card to `<repo_id>-merged`.

    The repo is created when missing (public, or private with `private=True`); the merged repo gets the adapter
    repo's visibility. The token comes from `token`, else HF_TOKEN, else the saved login (`hf auth login`). The
    local folders are only read.
    """
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
    merged = merged_files(merged_dir) if merged_dir else []
    if merged_dir and not merged:
        return PushResult("failed", f"Not pushing: {merged_dir} is not a merged checkpoint (config.json + "
                                    f"*.safetensors); make one with `python -m dpo_pipeline export {folder}`", repo_id)
    if merged and (problem := repo_id_problem(repo_id + MERGED_SUFFIX)):
        return PushResult("failed", f"Not pushing: bad repo id {repo_id + MERGED_SUFFIX!r}: {problem}", repo_id)
    token = token or get_token()
    if not token:
        return PushResult("skipped", f"Not pushing to {repo_id}: no Hugging Face token; log in with "
                                     f"`hf auth login` or set HF_TOKEN (the adapter stays in {folder}).", repo_id)
    if not hub_reachable():
        return PushResult("skipped", f"Not pushing to {repo_id}: the Hugging Face Hub ({constants.ENDPOINT}) cannot "
                                     f"be reached (the adapter stays in {folder}).", repo_id)

    api = HfApi(token=token)
    commit = merged_commit = merged_id = None
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one line in the notebook, not a progress display per file
    try:
        with tempfile.TemporaryDirectory(prefix="dpo-push-") as tmp:
            # Stage copies: only the chosen files go up, and the card is written beside them, not into the run.
            staging = Path(tmp)
            for name in names:
                shutil.copy2(folder / name, staging / name)
            # Checked before anything is created on the Hub (merged weights are save_pretrained's own output).
            leaked = _files_with(staging, token) + (_files_with(Path(merged_dir), token, [
                n for n in merged if not n.endswith(".safetensors")]) if merged else [])
            if leaked:
                return PushResult("failed", f"Not pushing to {repo_id}: {', '.join(leaked)} contain(s) your HF "
                                            "token; remove it from the run files first", repo_id)
            if "/" not in repo_id:  # a bare name goes under the token owner's namespace, as on the website
                repo_id = f"{api.whoami()['name']}/{repo_id}"
            private, created = _ensure_repo(api, repo_id, private)
            build_model_card(folder, repo_id, sweep_rows=sweep_rows, base_eval=base_eval, dataset=dataset,
                             license=license).save(staging / "README.md")
            if _files_with(staging, token):  # the token came in through sweep_rows or base_eval
                return PushResult("failed", f"Not pushing to {repo_id}: the model card would contain your HF "
                                            "token (from sweep_rows or base_eval)", repo_id)
            commit = api.upload_folder(folder_path=staging, repo_id=repo_id, repo_type="model",
                                       commit_message=commit_message)
            if merged:  # one commit of the files in place (no copy of the weights) plus the card
                merged_id = repo_id + MERGED_SUFFIX
                merged_private, merged_created = _ensure_repo(api, merged_id, private)
                card = merged_card(merged_id, repo_id, base_model_of(read_run(folder)), license)
                operations = [CommitOperationAdd(n, str(Path(merged_dir) / n)) for n in merged]
                operations.append(CommitOperationAdd("README.md", card.encode()))
                merged_commit = api.create_commit(merged_id, operations, commit_message="Upload merged DPO model",
                                                  repo_type="model")
    except Exception as err:  # any library or HTTP error: one line, the notebook carries on
        if commit is None:
            return PushResult("failed", f"Push to {repo_id} failed: {_one_line(err, token)}", repo_id,
                              private=private)
        return PushResult("failed", f"Pushed the adapter to {repo_id} ({commit.commit_url}) but the merged model's "
                                    f"push to {merged_id} failed: {_one_line(err, token)}", repo_id, commit.commit_url,
                          private, sorted([*names, "README.md"]), merged_id)
    finally:
        if not quiet:
            enable_progress_bars()
    files = sorted([*names, "README.md"])
    where = f"{'new' if created else 'existing'} {'private' if private else 'public'} repo {repo_id}"
    message = f"Pushed {len(files)} files to {where}: {commit.commit_url}"
    if merged_commit is not None:
        message += (f"; the merged model ({len(merged) + 1} files) to {'new' if merged_created else 'existing'} "
                    f"{'private' if merged_private else 'public'} repo {merged_id}: {merged_commit.commit_url}")
    return PushResult("pushed", message, repo_id, commit.commit_url, private, files, merged_id,
                      getattr(merged_commit, "commit_url", None))
