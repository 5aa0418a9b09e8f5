"""Train one DPO run from the command line; the same code runs data-parallel under `accelerate launch`.

    python -m dpo_pipeline train --profile cpu --max_steps 20 --learning_rate 1e-4
    python -m dpo_pipeline train --config my_run.yaml                # a recipe of one's own, as `trl dpo --config`
    accelerate launch --multi_gpu --num_processes 2 -m dpo_pipeline train --profile cpu   # 2 GPUs

Every field of DPOConfig, ModelConfig and RunArguments is an option under its own name (`--max_steps 4` or
`--max-steps 4`; booleans take true/false); unset options keep the recipe's value. `--config FILE` is a recipe of
one's own, on top of `--profile` when both are given. Under a distributed launcher every rank trains on its shard of
each batch and prints one line (its pairs counted from the batches it trained on):

    rank 1/2: trained 4 steps, 16 pairs seen, eval_loss=0.692993, lora_checksum=1.234567

Rank 0 alone writes the run folder and prints the run summary. A user mistake (bad data file, unknown setting,
unreachable model) is one line on stderr and exit code 2. Two CPU processes: `--multi_gpu --num_processes 2` with
CUDA_VISIBLE_DEVICES="" (accelerate's `--cpu --num_processes 2` starts one), or `torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import _classes, check_names, load_recipe, profiles, resolve, results_dir
from .errors import UsageError, one_line_errors
from .stats import with_ci


def parse_command_line(argv: list[str] | None = None):
    """(settings, profile name, why, --json) from the flags: the recipe (--profile), --config, then the flags."""
    from trl import TrlParser

    parser = one_line_errors(TrlParser(_classes(), prog="python -m dpo_pipeline train", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False))
    for action in parser._actions:  # unset options stay None, so the recipe's value is kept (args.resolve)
        if action.dest != "help":
            action.default = None
    parser.add_argument("--profile", choices=["auto", *profiles()], help="the recipe to start from (default: auto, "
                        "or none with --config)")
    parser.add_argument("--config", help="a recipe file of one's own (YAML, every key a setting)")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON (rank 0)")
    args, unknown = parser.parse_known_args(argv)
    # an unknown flag is answered as an unknown setting in a recipe is: its name, and the one it may have meant
    check_names({flag.lstrip("-").split("=")[0].replace("-", "_"): None for flag in unknown if flag.startswith("--")},
                "command line", also=("profile", "config", "json"))
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    args = vars(args)
    profile, recipe, as_json = args.pop("profile"), args.pop("config"), args.pop("json")
    layers = [{"output_dir": str(results_dir() / f"run-{Path(recipe).stem}"), **load_recipe(recipe)}] if recipe else []
    return *resolve(profile or (None if recipe else "auto"), *layers, args, where="command line"), as_json


def main(argv: list[str] | None = None) -> int:
    settings, name, why, as_json = parse_command_line(argv)
    import torch

    from .pipeline import run

    trainers, seen = [], []

    def count_pairs(trainer):  # the pairs of the batches this rank trains on (not of evaluation batches)
        compute_loss = trainer.compute_loss

        def counting(model, inputs, *args, **kwargs):
            if model.training:
                seen.append(len(inputs["input_ids"]) // 2)  # a batch is [chosen..., rejected...]
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counting
        trainers.append(trainer)
        if trainer.is_world_process_zero():
            print(f"profile {name} ({why}); {trainer.args.world_size} process(es); output {trainer.args.output_dir}",
                  flush=True)

    record = run(settings, setup=count_pairs)
    trainer = trainers[0]
    lora = [p.detach().double().abs().sum() for n, p in trainer.model.named_parameters() if "lora_" in n]
    # one write with its newline: the ranks share stdout, and an unbuffered print writes the newline apart
    print(f"rank {trainer.args.process_index}/{trainer.args.world_size}: trained {record.train_steps} steps, "
          f"{sum(seen)} pairs seen, eval_loss={record.final_eval.get('loss', float('nan')):.6f}, "
          f"lora_checksum={float(torch.stack(lora).sum()):.6f}\n", end="", flush=True)
    if trainer.is_world_process_zero():
        print(json.dumps(record.to_dict(), default=str) if as_json else summary(record), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank leaves together and shuts its process group down, rather than at interpreter exit, where a
        # rank still holding the group's threads can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def summary(record) -> str:
    held_out, base = record.evaluation, record.base_evaluation
    return "\n".join([
        f"status {record.status}: {record.train_steps} steps, {record.train_pairs} train pairs, "
        f"{record.eval_pairs} eval pairs, {record.wall_time_s} s, {record.pairs_per_second} pairs/s",
        f"final train loss {record.final_train_loss}",
        "final eval: " + ", ".join(f"{k}={v:.4g}" for k, v in record.final_eval.items()),
        # the base is the reference, with no implicit reward of its own: it is compared on log-prob accuracy
        *([f"held-out reward accuracy {with_ci(held_out, 'reward_accuracy')} over {held_out['pairs']} pairs (pick "
           f"the shorter {held_out['shorter_accuracy']:.3f}); log-prob accuracy {held_out['logp_accuracy']:.3f}, "
           f"base {base.get('logp_accuracy', float('nan')):.3f}"] if held_out else []),
        f"adapter: {record.adapter_path}",
    ])


if __name__ == "__main__":  # python -m dpo_pipeline.cli, the same as python -m dpo_pipeline train
    from .errors import command

    raise SystemExit(command(main))
