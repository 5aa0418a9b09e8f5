"""Hub stage: is the Hugging Face Hub reachable (checked once, quickly, without the client's minutes of retries)."""

from __future__ import annotations

import functools
import os
import urllib.request

from huggingface_hub import constants


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
