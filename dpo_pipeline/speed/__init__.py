"""Everything that exists only for speed, switched on through `trainer_for(run)` (pipeline.build_trainer).

`trainer: tuned` (the default) gets SpeedDPOTrainer (trainer.py): the reference cache (refcache.py) plus `packing`
(packing.py: each pair one sequence, its prompt once, no padding between pairs), `micro_batch_tokens` (forwards of
at most that many packed positions: the memory lever) and, on a CPU, `lean_lm_head`. Each has a measured gain in
benchmarks/README.md; levers without one were removed (their numbers stay there). `trainer: trl`: TRL's own."""

from __future__ import annotations


def trainer_for(run) -> tuple[type, dict]:
    """(trainer class, its lever arguments) for a run's RunArguments."""
    if run.trainer != "tuned":
        from trl import DPOTrainer

        return DPOTrainer, {}
    from .trainer import SpeedDPOTrainer

    return SpeedDPOTrainer, dict(packing=run.packing, micro_batch_tokens=run.micro_batch_tokens)
