"""Export stage: merge a LoRA adapter into its base model and write an ordinary `transformers` checkpoint folder.

The merged folder (config.json, model.safetensors, the adapter folder's tokenizer and chat template) loads with
``AutoModelForCausalLM.from_pretrained(folder)``, without peft. It goes to the sibling ``<adapter_dir>-merged``
(results/best -> results/best-merged: not a subfolder, because publish_best replaces the adapter folder as a whole)
unless `out_dir` says otherwise, written to a staging folder and renamed into place.

Which base weights (`base_weights`): "full", the base loaded unquantized in `dtype` (merging into 4-bit NF4 weights
would round the merged weights to NF4 again); or, for a run trained on a 4-bit base, "dequantized": the NF4 weights
training and the app saw, dequantized to `dtype` (``<adapter>-merged-dequantized``), which reproduces the adapter as
served. The command prints how far each merge is from the adapter as served (`logit_gaps`).

    python -m dpo_pipeline export results/best [--out DIR] [--dtype float32|bfloat16|float16]
                                               [--base-weights full|dequantized|both]
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import model as model_lib
from .card import base_model_of
from .runs import adapter_files, read_run, replace_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_plan(adapter_dir: str | Path, out_dir: str | Path | None = None, dtype: str = "float32",
               base_weights: str = "full") -> tuple[Path, Path, str]:
    """(adapter folder, merged folder, base model) of a merge: every check merge_adapter makes before it loads a
    model or writes a file, so a command asking for two merges refuses before it writes the first."""
    folder = Path(adapter_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not folder.is_dir() or not adapter_files(folder):
        raise model_lib.ModelLoadError(f"{folder} is not an adapter folder: it needs adapter_config.json and "
                                       "adapter_model.safetensors (a run folder, e.g. results/best)")
    if base_weights not in ("full", "dequantized"):
        raise ValueError(f"base_weights must be full or dequantized, got {base_weights!r}")
    run = read_run(folder)
    if base_weights == "dequantized" and not run["run_config"].get("load_in_4bit"):
        raise ValueError(f"{folder} was not trained on a 4-bit base: its full-precision merge is the one to use")
    suffix = "-merged-dequantized" if base_weights == "dequantized" else "-merged"
    out = Path(out_dir).resolve() if out_dir else folder.resolve().with_name(folder.resolve().name + suffix)
    if out == folder.resolve() or out in folder.resolve().parents:
        raise ValueError(f"The merged model cannot be written to {out}: it holds the adapter {folder}")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())):
        raise ValueError(f"Not overwriting {out}: it exists and is not a model checkpoint; choose another --out")
    base = base_model_of(run)
    if not base:
        raise model_lib.ModelLoadError(f"{folder}: neither adapter_config.json nor run_config.json names a base model")
    return folder, out, base


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path | None = None, dtype: str = "float32",
                  base_weights: str = "full") -> Path:
    """Merge the adapter in `adapter_dir` into its base model (peft merge_and_unload) and save it with the adapter
    folder's tokenizer to `out_dir` (default: beside the adapter, see above). Returns the merged folder."""
    from transformers import AutoTokenizer
    from trl import ModelConfig

    folder, out, base = merge_plan(adapter_dir, out_dir, dtype, base_weights)
    # The base unquantized in the asked dtype (a bare name would get the machine's), on the CPU.
    model = model_lib.load_base_model(ModelConfig(model_name_or_path=base, dtype=dtype))
    if base_weights == "dequantized":  # its weights replaced by the NF4 ones training and the app saw, dequantized
        quantized = model_lib.load_base_model(base, load_in_4bit=True).dequantize(dtype=DTYPES[dtype]).state_dict()
        conv1d = {f"{name}.weight" for name, module in model.named_modules() if type(module).__name__ == "Conv1D"}
        with torch.no_grad():
            for name, param in model.named_parameters():  # GPT-2's Conv1D holds (in, out): the 4-bit Linear (out, in)
                param.copy_(quantized[name].T if name in conv1d else quantized[name])
    merged = model_lib.attach_adapter(model, folder, base).merge_and_unload()
    tokenizer = (AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists()
                 else model_lib.load_tokenizer(base))

    def fill(staging: Path) -> None:
        merged.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)  # with the chat template it loaded (chat_template.jinja)
    return replace_folder(out, fill)


PROBES = ["Tell me about owls.", "How do I bake bread?", "What is the capital of France?", "Write a haiku about rain."]


@torch.no_grad()
def logit_gaps(adapter_dir: str | Path, merged: dict[str, str | Path], prompts: list[str] = PROBES) -> dict:
    """How far each merged model's next-token logits are from the adapter as served (chat.load_adapter: the 4-bit
    base + adapter for a 4-bit run), over every position of `prompts` in the adapter's prompt format: max and mean
    absolute difference, and the share of positions whose top token agrees."""
    from transformers import AutoModelForCausalLM

    from .chat import load_adapter
    from .chat_template import prompt_text

    served = load_adapter(str(adapter_dir))
    texts = [prompt_text(served.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    batches = [served.tokenizer(t, return_tensors="pt") for t in texts]
    device = next(served.model.parameters()).device
    reference = [served.model(**b.to(device)).logits.float().cpu() for b in batches]
    gaps = {}
    for name, folder in merged.items():
        model = model_lib._from_pretrained(AutoModelForCausalLM, str(folder)).eval()
        logits = [model(**b.to("cpu")).logits.float() for b in batches]
        diff = torch.cat([(a - r).abs().flatten() for a, r in zip(logits, reference)])
        agree = torch.cat([(a.argmax(-1) == r.argmax(-1)).flatten() for a, r in zip(logits, reference)])
        gaps[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "top1_agreement": float(
            agree.float().mean())}
    return gaps


def main(argv: list[str] | None = None) -> int:
    import argparse

    from transformers.utils import logging as hf_logging

    from .errors import one_line_errors

    parser = one_line_errors(argparse.ArgumentParser(prog="python -m dpo_pipeline export", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("adapter", help="an adapter folder (a run folder, results/best)")
    parser.add_argument("--out", help="the merged checkpoint folder (default: <adapter>-merged beside it)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype (default float32)")
    parser.add_argument("--base-weights", choices=["full", "dequantized", "both"], default="full",
                        help="merge into the full-precision base, the dequantized 4-bit one (4-bit runs), or both")
    args = parser.parse_args(argv)
    if args.out and args.base_weights == "both":
        parser.error("--out takes one folder: give --base-weights full or dequantized with it")
    hf_logging.disable_progress_bar()  # one line out, not a bar per file
    kinds = ["full", "dequantized"] if args.base_weights == "both" else [args.base_weights]
    for kind in kinds:  # each merge checked before the first is written
        merge_plan(args.adapter, args.out, args.dtype, kind)
    merged = {kind: merge_adapter(args.adapter, args.out, args.dtype, kind) for kind in kinds}
    for kind, out in merged.items():
        print(f"Merged {args.adapter} into its {'dequantized 4-bit' if kind == 'dequantized' else 'full-precision'} "
              f"base model ({args.dtype}): {out}")
    for kind, gap in logit_gaps(args.adapter, merged).items():
        print(f"  {kind} merge vs the adapter as served: max |logit gap| {gap['max_abs']:.2e}, mean "
              f"{gap['mean_abs']:.2e}, top-1 token agreement {gap['top1_agreement']:.1%}")
    return 0


if __name__ == "__main__":  # python -m dpo_pipeline.export, the same as python -m dpo_pipeline export
    from .errors import command

    raise SystemExit(command(main))
