"""Sweep stage: a grid (or random draws from it) of run configs, each run once, with a durable record per run.

    python -m dpo_pipeline.sweep configs/sweep_smoke.yaml     # run or resume a sweep, then rebuild the report

Each run lives in `results/runs/<run-id>/`, the id a hash of its config. Its `record.json` is written atomically
(temp file, then rename) when the run ends, finished or failed, so a sweep killed at any moment and started again
skips the runs that have a record and redoes the one that was cut off. A lock file per run lets several sweep
processes share one results folder: a run locked by a live process is waited for, a dead process's lock is taken
over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .hub import UPLOAD_FILES
from .train import RunConfig, RunRecord, train_dpo

BEST_RULE = ("highest reward accuracy (TRL eval rewards/accuracies) on the evaluated split (the validation slice "
             "when the profile has one, else the held-out test split), then lowest eval loss")
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


@dataclass
class SweepSpec:
    grid: dict[str, list] = field(default_factory=dict)  # RunConfig field -> values; every combination is a run
    base: dict = field(default_factory=dict)  # RunConfig fields every run of the sweep shares
    random_samples: int = 0  # > 0: draw this many combinations at random instead of taking them all
    sample_seed: int = 0
    profile: str = "auto"  # the notebook profile the sweep starts from (data, model, defaults)
    data: dict = field(default_factory=dict)  # DataConfig overrides (used by the command line)

    @classmethod
    def from_file(cls, path: str | Path) -> "SweepSpec":
        """A sweep from a YAML or JSON file; a mistake is one line naming the file and the field."""
        try:
            raw = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read the sweep file ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with 'grid' (and optionally 'base', 'profile', 'data')")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise ValueError(f"{path}: unknown key '{key}'; expected one of {sorted(known)}")
        spec = cls(**raw)
        spec.validate(str(path))
        return spec

    def validate(self, where: str = "sweep") -> None:
        for name, values in {**self.grid, **{k: [v] for k, v in self.base.items()}}.items():
            if name not in RUN_FIELDS:
                raise ValueError(f"{where}: field '{name}' is not a run setting; known: {sorted(RUN_FIELDS)}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}: field '{name}' needs a non-empty list of values")

    def configs(self, base: RunConfig, runs_dir: str | Path) -> list[RunConfig]:
        """The sweep's run configs: `base`, then the spec's base, then each grid combination; output in runs_dir."""
        self.validate()
        names = sorted(self.grid)
        combos = list(itertools.product(*(self.grid[n] for n in names)))
        if self.random_samples:
            combos = random.Random(self.sample_seed).sample(combos, min(self.random_samples, len(combos)))
        configs, seen = [], set()
        for combo in combos:
            config = dataclasses.replace(base, **self.base, **dict(zip(names, combo)))
            config.output_dir = str(Path(runs_dir) / run_id(config))
            if config.output_dir not in seen:  # two combinations may resolve to the same run
                seen.add(config.output_dir)
                configs.append(config)
        return configs


def run_id(config: RunConfig) -> str:
    """A short stable id from everything that defines the run (not where it is written)."""
    settings = {k: v for k, v in config.to_dict().items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class RunLock:
    """An exclusive lock file for one run: created atomically, naming the process that holds it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    return False
                self._break_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            return True
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True  # being written right now by its creator
        if host != socket.gethostname():
            return True  # another machine on a shared folder: trust it
        try:
            os.kill(int(pid), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _break_stale(self) -> None:
        # Rename first, so two processes breaking the same stale lock cannot both delete a fresh one.
        grave = self.path.with_name(f".lock.stale.{os.getpid()}")
        try:
            os.replace(self.path, grave)
            grave.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def failed_record(config: RunConfig, error: BaseException) -> RunRecord:
    message = " ".join(f"{type(error).__name__}: {error}".split())[:500]  # one line
    return RunRecord(
        config=config.to_dict(), status="failed", train_pairs=0, eval_pairs=0, train_steps=0, final_train_loss=None,
        final_eval={}, best_eval={}, log_history=[], wall_time_s=0.0, pairs_per_second=0.0,
        adapter_path="", error=message, run_id=Path(config.output_dir).name,
    )


def run_one(config: RunConfig, data) -> RunRecord:
    """Train one config; any error (NaN loss, out of memory, a bad setting) becomes a failed record."""
    try:
        record = train_dpo(config, data)
    except Exception as err:  # noqa: BLE001 - the sweep must go on; the error is kept in the record
        record = failed_record(config, err)
    return record


def run_sweep(configs: list[RunConfig], data, poll_seconds: float = 2.0) -> list[dict]:
    """Run every config that has no record yet; wait for runs other processes hold. Returns all their records."""
    pending = list(configs)
    while pending:
        waiting = []
        for i, config in enumerate(pending, 1):
            run_dir = Path(config.output_dir)
            label = f"[{run_dir.name}] {i}/{len(pending)}"
            if (run_dir / "record.json").exists():
                print(f"{label} already done: skipped")
                continue
            lock = RunLock(run_dir)
            if not lock.acquire():
                waiting.append(config)
                continue
            try:
                if (run_dir / "record.json").exists():  # finished by another process since we looked
                    continue
                print(f"{label} training: {describe(config)}")
                record = run_one(config, data)
                record.save(run_dir / "record.json")
                print(f"{label} {record.status}" + (f": {record.error}" if record.error else ""))
            finally:
                lock.release()
        if waiting:
            print(f"waiting for {len(waiting)} run(s) held by another sweep process ...")
            time.sleep(poll_seconds)
        pending = waiting
    return load_records([Path(c.output_dir) for c in configs])


def describe(config: RunConfig) -> str:
    return (f"lr={config.learning_rate:g} batch={config.batch_size}x{config.grad_accum} beta={config.beta:g} "
            f"optim={config.optimizer} loss={config.loss_type} r={config.lora_r} steps={config.max_steps}")


def load_records(run_dirs: list[Path]) -> list[dict]:
    return [json.loads((d / "record.json").read_text()) for d in run_dirs if (d / "record.json").exists()]


def pick_best(records: list[dict]) -> dict | None:
    """The best finished run by BEST_RULE, or None when no run finished."""
    finished = [r for r in records if r["status"] == "finished" and r.get("final_eval")]
    key = lambda r: (-r["final_eval"].get("rewards/accuracies", 0.0), r["final_eval"].get("loss", float("inf")))
    return min(finished, key=key) if finished else None


def publish_best(best: dict, best_dir: str | Path) -> Path:
    """Copy the best run's adapter, tokenizer and record to a stable folder (replaced atomically as a whole)."""
    best_dir, source = Path(best_dir), Path(best["config"]["output_dir"])
    staging = best_dir.with_name(f".{best_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in UPLOAD_FILES:  # what inference (and a push) needs, no optimizer states
        if (source / name).exists():
            shutil.copy2(source / name, staging / name)
    old = best_dir.with_name(f".{best_dir.name}.{os.getpid()}.old")
    if best_dir.exists():
        os.replace(best_dir, old)
    os.replace(staging, best_dir)
    shutil.rmtree(old, ignore_errors=True)
    return best_dir


def best_samples(best: dict, prompts: list[str], max_new_tokens: int = 40) -> list[dict]:
    """Generations on held-out prompts, base model vs the best adapter (one model, adapter toggled)."""
    from peft import PeftModel

    from .evaluate import generate_samples
    from .model import load_base_model, load_tokenizer

    config = best["config"]
    base = load_base_model(config["model"], load_in_4bit=config["load_in_4bit"])
    model = PeftModel.from_pretrained(base, config["output_dir"])
    return generate_samples(model, load_tokenizer(config["output_dir"]), prompts, max_new_tokens=max_new_tokens)


def report_sweep(records: list[dict], data, results_dir: str | Path, sweep_info: dict | None = None,
                 n_samples: int = 4) -> dict:
    """Publish the best run, write the plots and rebuild the workbook from the records. Returns what it made."""
    from .report import save_plots
    from .workbook import build_workbook

    results_dir = Path(results_dir)
    best = pick_best(records)
    finished = [r for r in records if r["status"] == "finished"]
    baseline = next((r["base_evaluation"] for r in finished if r.get("base_evaluation")), None)
    best_id = best["run_id"] if best else None
    samples = best_samples(best, list(data.test["prompt"][:n_samples])) if best else []
    summary = {
        "data": data.report.as_dict(),
        "model": (best or (finished or [{}])[0]).get("model_info", {}),
        "sweep": {"runs": len(records), "finished": len(finished), "failed": len(records) - len(finished),
                  **(sweep_info or {})},
    }
    made = {
        "best": str(publish_best(best, results_dir / "best")) if best else None,
        "plots": [str(p) for p in save_plots(records, results_dir / "plots", best_id)],
        "workbook": str(build_workbook(
            records, results_dir / "sweep_results.xlsx", best_run_id=best_id, best_rule=BEST_RULE,
            summary=summary, samples=samples, baseline=baseline,
        )),
        "best_run_id": best_id,
        "baseline": baseline,
        "samples": samples,
    }
    return made


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .model import load_tokenizer
    from .profiles import build_configs, load_data, results_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="sweep file (YAML or JSON): profile, data, base, grid, random_samples")
    parser.add_argument("--results-dir", default=None, help="default: results/ (or $DPO_RESULTS_DIR)")
    args = parser.parse_args(argv)
    try:
        spec = SweepSpec.from_file(args.spec)
        out = Path(args.results_dir) if args.results_dir else results_dir()
        name, why, data_config, base = build_configs(spec.profile, **spec.data)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Sweep from {args.spec}: profile {name} ({why})")
    configs = spec.configs(base, out / "runs")
    tokenizer = load_tokenizer(base.model)
    data = load_data(data_config, tokenizer, base.max_length)
    print(data.report)
    records = run_sweep(configs, data)
    made = report_sweep(records, data, out, sweep_info={"spec": str(args.spec), "grid": spec.grid})
    print(f"best run: {made['best_run_id']} -> {made['best']}\nworkbook: {made['workbook']}")


if __name__ == "__main__":
    main()
