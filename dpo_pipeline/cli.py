"""Train one DPO run from the command line; the same code runs data-parallel under `accelerate launch`.

    python -m dpo_pipeline train --profile cpu --max_steps 20 --learning_rate 1e-4
    python -m dpo_pipeline train --config my_run.yaml                # a recipe of one's own, as `trl dpo --config`
    accelerate launch --multi_gpu --num_processes 2 -m dpo_pipeline train --profile cpu   # 2 GPUs (or 2 CPU
                                                                                          # processes without CUDA)

Every field of DPOConfig, ModelConfig and RunArguments is an option under its own name (`--max_steps 4` or
`--max-steps 4`; booleans take true/false); unset options keep the recipe's value. `--config FILE` is a recipe of
one's own, on top of `--profile` when both are given. Under a distributed launcher every rank trains on its shard of each
batch and only rank 0 writes the run folder. Each rank prints one line:

    rank 1/2: trained 4 steps, 16 pairs seen, eval_loss=0.692993, lora_checksum=1.234567

(pairs counted from the batches that rank actually trained on). Rank 0 then prints the run summary.
A user mistake (bad data file, unknown setting, unreachable model) is one line on stderr and exit code 2.

Note: `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15 needs mpirun for several CPU
processes); for two CPU processes use `--multi_gpu --num_processes 2` on a machine without CUDA (or with
CUDA_VISIBLE_DEVICES=""), or `torchrun --nproc_per_node 2 -m dpo_pipeline train ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .args import _classes, load_recipe, profiles, resolve, results_dir
from .errors import command, one_line_errors


def build_parser():
    from trl import TrlParser

    parser = one_line_errors(TrlParser(_classes(), prog="python -m dpo_pipeline train", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    for action in parser._actions:  # unset options stay None, so the recipe's value is kept (args.resolve)
        if action.dest != "help":
            action.default = None
    parser.add_argument("--profile", choices=["auto", *profiles()], help="the recipe to start from (default: auto, "
                        "or none with --config)")
    parser.add_argument("--config", help="a recipe file of one's own (YAML, every key a setting)")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON (rank 0)")
    return parser


def parse_command_line(argv: list[str] | None = None):
    """(settings, profile name, why, --json) from the flags: the recipe (--profile), --config, then the flags."""
    args = vars(build_parser().parse_args(argv))
    profile, recipe, as_json = args.pop("profile"), args.pop("config"), args.pop("json")
    layers = [{"output_dir": str(results_dir() / f"run-{Path(recipe).stem}"), **load_recipe(recipe)}] if recipe else []
    return *resolve(profile or (None if recipe else "auto"), *layers, args, where="command line"), as_json


def main(argv: list[str] | None = None) -> int:
    settings, name, why, as_json = parse_command_line(argv)
    import torch

    from .pipeline import run

    seen, trainers = [0], []

    def count_pairs(trainer):  # counted from the batches this rank trains on (not evaluation batches)
        compute_loss = trainer.compute_loss

        def counting(model, inputs, *a, **kw):
            if model.training:
                seen[0] += int(inputs["input_ids"].shape[0]) // 2  # a batch is [chosen..., rejected...]
            return compute_loss(model, inputs, *a, **kw)

        trainer.compute_loss = counting
        trainers.append(trainer)
        if trainer.is_world_process_zero():
            print(f"profile {name} ({why}); {trainer.args.world_size} process(es); output {trainer.args.output_dir}",
                  flush=True)

    record = run(settings, setup=count_pairs)
    trainer = trainers[0]
    lora = [p.detach().double().abs().sum() for n, p in trainer.model.named_parameters() if "lora_" in n]
    print(f"rank {trainer.args.process_index}/{trainer.args.world_size}: trained {record.train_steps} steps, "
          f"{seen[0]} pairs seen, eval_loss={record.final_eval.get('loss', float('nan')):.6f}, "
          f"lora_checksum={float(torch.stack(lora).sum()) if lora else 0.0:.6f}", flush=True)
    if trainer.is_world_process_zero():
        print(json.dumps(record.to_dict(), default=str) if as_json else summary(record, trainer), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank leaves together and shuts its process group down, rather than at interpreter exit, where a
        # rank still holding the group's threads can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def summary(record, trainer=None) -> str:
    adapter, base = record.evaluation, record.base_evaluation
    lines = [
        f"status {record.status}: {record.train_steps} steps, {record.train_pairs} train pairs, "
        f"{record.eval_pairs} eval pairs, {record.wall_time_s} s, {record.pairs_per_second} pairs/s",
        f"final train loss {record.final_train_loss}",
        "final eval: " + ", ".join(f"{k}={v:.4g}" for k, v in record.final_eval.items()),
    ]
    if adapter:
        lines.append(f"held-out reward accuracy {adapter['reward_accuracy']:.3f} over {adapter['pairs']} pairs "
                     f"(base {base.get('reward_accuracy', float('nan')):.3f})")
    for e in getattr(trainer, "ref_cache_events", []):
        lines.append(f"reference log-probs ({e['split']}): {'hit' if e['hit'] else 'computed'}, {e['pairs']} pairs, "
                     f"{e['seconds']} s")
    return "\n".join(lines + [f"adapter: {record.adapter_path}"])


if __name__ == "__main__":
    sys.exit(command(main))
