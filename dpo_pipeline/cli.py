"""Train one DPO run from the command line; the same code runs data-parallel under `accelerate launch`.

    python -m dpo_pipeline.cli --profile cpu --max_steps 20 --learning_rate 1e-4
    accelerate launch --multi_gpu --num_processes 2 -m dpo_pipeline.cli --profile cpu   # 2 GPUs (or 2 CPU processes
                                                                                        # without CUDA)

Every RunConfig field is an option (`--max_steps 4` or `--max-steps 4`; booleans take true/false; `--trl_args` takes
JSON); unset options keep the profile's value. Under a distributed launcher every rank trains on its shard of each
batch and only rank 0 writes the run folder. Each rank prints one line:

    rank 1/2: trained 4 steps, 16 pairs seen, eval_loss=0.692993, lora_checksum=1.234567

(pairs counted from the batches that rank actually trained on). Rank 0 then prints the run summary.
A user mistake (bad data file, unknown setting, unreachable model) is one line on stderr and exit code 2.

Note: `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15 needs mpirun for several CPU
processes); for two CPU processes use `--multi_gpu --num_processes 2` on a machine without CUDA (or with
CUDA_VISIBLE_DEVICES=""), or `torchrun --nproc_per_node 2 -m dpo_pipeline.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from .config import PROFILES, RunConfig, resolve
from .errors import command, one_line_errors


def build_parser():
    from transformers import HfArgumentParser

    parser = one_line_errors(HfArgumentParser(RunConfig, prog="python -m dpo_pipeline.cli", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    for action in parser._actions:  # unset options stay None, so the profile's value is kept (config.resolve)
        if action.dest == "trl_args":
            action.type = json.loads
        if action.dest != "help":
            action.default = None
    parser.add_argument("--profile", default="auto", choices=["auto", *PROFILES], help="starting configuration")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON (rank 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    profile, as_json = args.pop("profile"), args.pop("json")
    config, name, why = resolve(profile, args)
    import torch  # after the flags are checked: a mistyped flag is answered before torch loads

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
            print(f"profile {name} ({why}); {trainer.args.world_size} process(es); output {config.output_dir}",
                  flush=True)

    record = run(config, setup=count_pairs)
    trainer = trainers[0]
    lora = [p.detach().double().abs().sum() for n, p in trainer.model.named_parameters() if "lora_" in n]
    print(f"rank {trainer.args.process_index}/{trainer.args.world_size}: trained {record.train_steps} steps, "
          f"{seen[0]} pairs seen, eval_loss={record.final_eval.get('loss', float('nan')):.6f}, "
          f"lora_checksum={float(torch.stack(lora).sum()) if lora else 0.0:.6f}", flush=True)
    if trainer.is_world_process_zero():
        print(json.dumps(record.to_dict(), default=str) if as_json else summary(record, trainer), flush=True)
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
