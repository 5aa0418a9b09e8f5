"""Hub stage: push a trained adapter with its model card to a model repo (whether the Hub answers: hf.py), and
optionally its merged model to ``<repo_id>-merged``, files at its root, which plain transformers loads by repo id.

`push_adapter` never raises for the usual problems (no repo id, no token, no network, a bad repo id, an HTTP error):
its `PushResult` says what happened in one line, so a notebook can print it and carry on. The token is only ever
handed to huggingface_hub: never printed, logged, or written into a card or an uploaded file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from .card import build_model_card
from .errors import first_line
from .hf import hub_reachable, repo_id_problem
from .runs import adapter_files

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


def _one_line(err: BaseException, token: str) -> str:
    """A library error as one line, with the token scrubbed in case a message ever echoed it."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        text = "the Hub rejected the token (401): log in again with `hf auth login` or set a valid HF_TOKEN"
    elif isinstance(err, HfHubHTTPError) and status == 403:
        text = "the token has no write access to this namespace (403): use a write token or your own namespace"
    else:
        text = first_line(err)
    return text.replace(token, "***")


def _commit(api, repo_id: str, paths: list[Path], card: str, message: str, private: bool) -> tuple[str, str, bool]:
    """Create `repo_id` when missing, then one commit of `paths` (at its root, read in place) and `card` as README.md:
    (commit url, "new public repo <id>", private). An existing repo keeps its visibility, and the real one is said."""
    try:
        private, created = bool(api.model_info(repo_id).private), False
    except RepositoryNotFoundError:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        created = True
    operations = [CommitOperationAdd(path.name, str(path)) for path in paths]
    operations.append(CommitOperationAdd("README.md", card.encode()))
    url = api.create_commit(repo_id, operations, commit_message=message, repo_type="model").commit_url
    return url, f"{'new' if created else 'existing'} {'private' if private else 'public'} repo {repo_id}", private


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
    with `merged_dir` (export.merge_adapter's folder), that merged model and a short card to `<repo_id>-merged`.
    A missing repo is created (private with `private=True`; the merged one as the adapter's); the token comes from
    `token`, else HF_TOKEN, else the saved login (`hf auth login`). The local folders are only read."""
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
    merged = sorted(p.name for p in Path(merged_dir).iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.name != "README.md") if merged_dir and Path(merged_dir).is_dir() else []
    if merged_dir and not ("config.json" in merged and any(n.endswith(".safetensors") for n in merged)):
        return PushResult("failed", f"Not pushing: {merged_dir} is not a merged checkpoint (config.json + "
                                    f"*.safetensors); make one with `python -m dpo_pipeline export {folder}`", repo_id)
    if merged_dir and (problem := repo_id_problem(repo_id + MERGED_SUFFIX)):
        return PushResult("failed", f"Not pushing: bad repo id {repo_id + MERGED_SUFFIX!r}: {problem}", repo_id)
    token = token or get_token()
    if not token:
        return PushResult("skipped", f"Not pushing to {repo_id}: no Hugging Face token; log in with "
                                     f"`hf auth login` or set HF_TOKEN (the adapter stays in {folder}).", repo_id)
    if not hub_reachable():
        return PushResult("skipped", f"Not pushing to {repo_id}: the Hugging Face Hub ({constants.ENDPOINT}) cannot "
                                     f"be reached (the adapter stays in {folder}).", repo_id)

    api = HfApi(token=token)
    files, url = sorted([*names, "README.md"]), None
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one line in the notebook, not a progress display per file
    try:
        # Checked before anything goes to the Hub (the merged weights are save_pretrained's own output).
        checked = [folder / n for n in names] + [Path(merged_dir) / n for n in merged if not n.endswith(".safetensors")]
        leaked = sorted({path.name for path in checked if token.encode() in path.read_bytes()})
        if leaked:
            return PushResult("failed", f"Not pushing to {repo_id}: {', '.join(leaked)} contain(s) your HF "
                                        "token; remove it from the run files first", repo_id)
        if "/" not in repo_id:  # a bare name goes under the token owner's namespace, as on the website
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        merged_id = repo_id + MERGED_SUFFIX
        card = str(build_model_card(folder, repo_id, sweep_rows=sweep_rows, base_eval=base_eval, dataset=dataset,
                                    license=license))
        if token in card:  # the token came in through sweep_rows or base_eval
            return PushResult("failed", f"Not pushing to {repo_id}: the model card would contain your HF "
                                        "token (from sweep_rows or base_eval)", repo_id)
        url, where, private = _commit(api, repo_id, [folder / n for n in names], card, commit_message, private)
        message = f"Pushed {len(files)} files to {where}: {url}"
        if not merged_dir:
            return PushResult("pushed", message, repo_id, url, private, files)
        merged_card = str(build_model_card(folder, merged_id, license=license, merged_from=repo_id))
        merged_url, merged_where, _ = _commit(api, merged_id, [Path(merged_dir) / n for n in merged], merged_card,
                                              "Upload merged DPO model", private)  # the adapter repo's visibility
        return PushResult("pushed", f"{message}; the merged model ({len(merged) + 1} files) to {merged_where}: "
                                    f"{merged_url}", repo_id, url, private, files, merged_id, merged_url)
    except Exception as err:  # any library or HTTP error: one line, the notebook carries on
        if url is None:
            return PushResult("failed", f"Push to {repo_id} failed: {_one_line(err, token)}", repo_id,
                              private=private)
        return PushResult("failed", f"Pushed the adapter to {repo_id} ({url}) but the merged model's push to "
                                    f"{merged_id} failed: {_one_line(err, token)}", repo_id, url, private, files,
                          merged_id)
    finally:
        if not quiet:
            enable_progress_bars()
