"""Where a name points: a local path, the local Hugging Face cache, or the Hub (and whether the Hub answers).

The bottom layer under model, judge, data, chat, card and hub: it imports nothing from dpo_pipeline and no torch
(offline_models, below it, only for the `offline:` prefix).
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from offline_models import OFFLINE_PREFIX


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


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a valid Hub model repo id ("name" or "namespace/name"), or None when it is."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return " ".join(str(err).split())
    return None


def is_hub_id(name: str | None) -> bool:
    """A "namespace/name" Hub id, not an offline shape or a local path."""
    if not name or name.startswith(OFFLINE_PREFIX) or name.count("/") != 1 or Path(name).exists():
        return False
    return repo_id_problem(name) is None


def load_source(name: str) -> str | None:
    """What from_pretrained should load for `name`, without minutes of retries offline: the local path itself, else
    the folder of its snapshot in the local Hugging Face cache (no round-trips), else the Hub id when the Hub answers;
    None when it is neither cached nor reachable. A name that is not a Hub repo id raises HFValidationError."""
    if Path(name).exists():
        return name
    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        return name if hub_reachable() else None
