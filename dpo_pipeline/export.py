"""Export stage: merge a LoRA adapter into its base model and write an ordinary `transformers` checkpoint folder.

The merged folder (config.json, model.safetensors, generation_config.json, the adapter folder's tokenizer and chat
template) loads with ``AutoModelForCausalLM.from_pretrained(folder)``: no peft, no base model to fetch. It goes to
``<adapter_dir>-merged`` beside the adapter (results/best -> results/best-merged) unless `out_dir` says otherwise; a
sibling, not a subfolder, because publish_best replaces the adapter folder as a whole. It is written to a staging
folder and renamed into place, so a crash never leaves half a checkpoint.

The base is always loaded unquantized, in `dtype`: merging into 4-bit NF4 weights would round the merged weights to
NF4 again (lossy), so a run trained on a 4-bit base is merged into the 16/32-bit base. float32 reproduces base+adapter
logits to ~1e-6; bfloat16 halves the size at bf16 rounding.

    python -m dpo_pipeline export results/best [--out DIR] [--dtype float32|bfloat16|float16]
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import model as model_lib
from .card import base_model_of
from .runs import adapter_files, read_run, replace_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merged_dir_for(adapter_dir: str | Path) -> Path:
    """Where `merge_adapter` writes by default: the sibling ``<adapter_dir>-merged``."""
    adapter_dir = Path(adapter_dir).resolve()
    return adapter_dir.with_name(adapter_dir.name + "-merged")


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path | None = None, dtype: str = "float32") -> Path:
    """Merge the adapter in `adapter_dir` into its base model (peft merge_and_unload) and save the result, with the
    adapter folder's tokenizer, to `out_dir` (default ``<adapter_dir>-merged``). Returns the merged folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(adapter_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not folder.is_dir() or not adapter_files(folder):
        raise model_lib.ModelLoadError(f"{folder} is not an adapter folder: it needs adapter_config.json and "
                                       "adapter_model.safetensors (a run folder, e.g. results/best)")
    out = Path(out_dir).resolve() if out_dir else merged_dir_for(folder)
    if out == folder.resolve() or out in folder.resolve().parents:
        raise ValueError(f"The merged model cannot be written to {out}: it holds the adapter {folder}")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())):
        raise ValueError(f"Not overwriting {out}: it exists and is not a model checkpoint; choose another --out")
    base = base_model_of(read_run(folder))
    if not base:
        raise model_lib.ModelLoadError(f"{folder}: neither adapter_config.json nor run_config.json names a base model")

    # The base unquantized in the asked dtype, on the CPU (model.load_base_model picks the dtype by device).
    model = model_lib._from_pretrained(AutoModelForCausalLM, model_lib.resolve_model_path(base), dtype=DTYPES[dtype])
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        why = "its tensor shapes differ" if "size mismatch" in str(err) else (str(err).splitlines() or [""])[0]
        raise model_lib.ModelLoadError(f"The adapter in {folder} does not fit base model {base!r}: {why}") from None
    merged = model.merge_and_unload()
    if merged.config.pad_token_id is None:
        merged.config.pad_token_id = merged.config.eos_token_id
    tokenizer = (AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists()
                 else model_lib.load_tokenizer(base))

    def fill(staging: Path) -> None:
        merged.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        if (folder / "chat_template.jinja").exists() and not (staging / "chat_template.jinja").exists():
            shutil.copy2(folder / "chat_template.jinja", staging / "chat_template.jinja")
    return replace_folder(out, fill)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from transformers.utils import logging as hf_logging

    from .errors import one_line_errors

    parser = one_line_errors(argparse.ArgumentParser(prog="python -m dpo_pipeline export", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("adapter", help="an adapter folder (a run folder, results/best)")
    parser.add_argument("--out", help="the merged checkpoint folder (default: <adapter>-merged beside it)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype (default float32)")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # one line out, not a bar per file
    out = merge_adapter(args.adapter, args.out, args.dtype)
    print(f"Merged {args.adapter} into its base model ({args.dtype}): {out}")
    return 0


if __name__ == "__main__":
    import sys

    from .errors import command

    sys.exit(command(main))
