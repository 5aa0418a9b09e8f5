"""Train one DPO run from the command line; the same code runs data-parallel under `accelerate launch`.

    python -m dpo_pipeline.cli --profile cpu --max_steps 20 --learning_rate 1e-4
    accelerate launch --multi_gpu --num_processes 2 -m dpo_pipeline.cli --profile cpu      # 2 GPUs (or 2 CPU
                                                                                           # processes without CUDA)

Every DataConfig and RunConfig field is an option (`--max_steps 4` or `--max-steps 4`; booleans take true/false);
unset options keep the profile's value. Under a distributed launcher every rank trains on its shard of each batch,
gradients are averaged across ranks, evaluation metrics are gathered across ranks, and only rank 0 writes the
adapter, run_config.json, record.json and cleaning_report.json. Each rank prints one line:

    rank 1/2: trained 4 steps, 16 pairs seen, eval_loss=0.692993, lora_checksum=1.234567

(pairs counted from the batches that rank actually trained on). Rank 0 then prints the run summary.

Note: `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15 needs mpirun for several CPU
processes); for two CPU processes use `--multi_gpu --num_processes 2` on a machine without CUDA (or with
CUDA_VISIBLE_DEVICES=""), or `torchrun --nproc_per_node 2 -m dpo_pipeline.cli ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from .profiles import PROFILES, DataConfig, build_configs, load_data, save_cleaning_report
from .train import RunConfig


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _option_kwargs(hint) -> dict:
    """argparse settings for a dataclass field's type (X | None is X: None overrides are not taken)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _option_kwargs(args[0]) if len(args) == 1 else {"type": str}
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        return {"nargs": "+", "type": item}
    if hint is bool:
        return {"type": _parse_bool, "metavar": "{true,false}"}
    return {"type": hint if hint in (int, float, str) else str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_pipeline.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                        help="starting configuration (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON (rank 0)")
    seen = {"profile", "json"}
    for cls, title in ((DataConfig, "data (DataConfig)"), (RunConfig, "run (RunConfig)")):
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            group.add_argument(*flags, dest=f.name, default=None, help=f"dataclass default: {default!r}",
                               **_option_kwargs(hints[f.name]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("profile", "json") and v is not None}
    try:
        name, why, data_config, run_config = build_configs(args.profile, **overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from . import model as model_lib
    from .train import build_trainer, train_dpo

    tokenizer = model_lib.load_tokenizer(run_config.model)
    data = load_data(data_config, tokenizer, run_config.max_length)
    trainer = build_trainer(run_config, data, tokenizer=tokenizer)
    rank, world = trainer.args.process_index, trainer.args.world_size
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(f"profile {name} ({why}); {world} process(es); output {run_config.output_dir}", flush=True)

    pairs_seen = [0]  # counted from the batches this rank trains on (not evaluation batches)
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **kw):
        if model.training:
            pairs_seen[0] += int(inputs["input_ids"].shape[0]) // 2  # a batch is [chosen..., rejected...]
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting_compute_loss
    record = train_dpo(run_config, data, trainer=trainer)
    if main_process:
        save_cleaning_report(data.report, run_config.output_dir)

    lora = [p.detach().double().abs().sum() for n, p in trainer.model.named_parameters() if "lora_" in n]
    checksum = float(torch.stack(lora).sum()) if lora else 0.0
    eval_loss = record.final_eval.get("loss", float("nan"))
    print(f"rank {rank}/{world}: trained {record.train_steps} steps, {pairs_seen[0]} pairs seen, "
          f"eval_loss={eval_loss:.6f}, lora_checksum={checksum:.6f}", flush=True)
    if main_process:
        if args.json:
            print(json.dumps(record.to_dict(), default=str))
        else:
            print(summary(record, getattr(trainer, "ref_cache_events", []),
                          getattr(trainer, "ref_rows_computed_in_steps", None)), flush=True)
    return 0


def summary(record, ref_events: list[dict] | None = None, ref_rows_in_steps: int | None = None) -> str:
    ev, adapter = record.final_eval, record.evaluation
    lines = [
        f"status {record.status}: {record.train_steps} steps, {record.train_pairs} train pairs, "
        f"{record.eval_pairs} eval pairs, {record.wall_time_s} s, {record.pairs_per_second} pairs/s",
        f"final train loss {record.final_train_loss}",
        "final eval: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()),
    ]
    if adapter:
        lines.append(f"held-out reward accuracy {adapter.get('reward_accuracy'):.3f} over {adapter.get('pairs')} "
                     f"pairs (base {record.base_evaluation.get('reward_accuracy', float('nan')):.3f})")
    for e in ref_events or []:
        lines.append(f"reference log-probs ({e['split']}): {e['cached']}/{e['pairs']} cached at the start, "
                     f"{e['computed']} computed up front ({e['mode']}, {e['seconds']} s)")
    if ref_rows_in_steps:
        lines.append(f"reference log-probs computed during the steps (this rank): {ref_rows_in_steps} pairs")
    lines.append(f"adapter: {record.adapter_path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
