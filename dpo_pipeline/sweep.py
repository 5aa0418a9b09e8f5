"""Sweep stage: a grid (or random draws from it, or Optuna's TPE search) of run configs, each run once, with a
durable record per run.

    python -m dpo_pipeline sweep configs/sweeps/smoke.yaml      # run or resume a sweep, then rebuild the report
    python -m dpo_pipeline sweep configs/sweeps/tpe_smoke.yaml  # a TPE study; start it in several shells to share it

A sweep file names the profile it starts from, `base:` settings every run shares and a `grid:` of values (any
setting, by its DPOConfig / ModelConfig / RunArguments name), or `search: tpe` with `trials:` and a `space:` of
ranges (search.py). Each run lives in
`results/runs/<run-id>/`, the id a hash of its config. Its `record.json` is written atomically when the run ends,
finished or failed, so a sweep killed at any moment and started again skips the runs that have a record and redoes
the one that was cut off. A lock file per run lets several sweep processes
share one results folder: a run locked by a live process is waited for, a dead process's lock is taken over.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .args import ConfigError, Settings, check_names, parse, resolve
from .runs import (BEST_RULES, RunLock, RunRecord, control_of, evaluating_seconds, load_records, pick_best,
                   publish_best, rule_value, run_id)


@dataclass
class SweepSpec:
    grid: dict[str, list] = field(default_factory=dict)  # setting -> values; every combination is a run
    base: dict = field(default_factory=dict)  # settings every run of the sweep shares
    random_samples: int = 0  # > 0: draw this many combinations at random instead of taking them all
    sample_seed: int = 0
    profile: str = "auto"  # the profile the sweep starts from (data, model, defaults)
    control: bool = False  # also train the best run's settings on the random-weight twin of its base model
    best_by: str = "reward_accuracy"  # or "win_rate": the judged win rate (runs need a `judge`), runs.BEST_RULES
    search: str = "grid"  # grid (random draws when random_samples > 0) | tpe: Optuna's TPE over `space`
    trials: int = 0  # tpe: finished or pruned trials to reach, all workers together
    space: dict = field(default_factory=dict)  # tpe: field -> [choices] or {low, high, log}
    prune: bool = True  # tpe: stop a run whose validation reward accuracy lags the median at an evaluation
    storage: str | None = None  # tpe: SQLAlchemy URL of the study; None: sqlite in the results folder
    study: str | None = None  # tpe: the study's name; None: the sweep file's name
    heartbeat_seconds: int = 60  # tpe: a trial silent for twice this is a dead worker's, and is run again

    @classmethod
    def from_file(cls, path: str | Path) -> "SweepSpec":
        """A sweep from a YAML or JSON file; a mistake is one line naming the file and the field."""
        try:
            raw = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the sweep file ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping with 'grid' or 'search: tpe' (and optionally 'base', "
                              "'profile')")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{path}: unknown key '{key}'; expected one of {sorted(known)}")
        spec = cls(**{"study": Path(path).stem, **raw})
        spec.validate(str(path))
        return spec

    def validate(self, where: str = "sweep") -> None:
        if not isinstance(self.base, dict) or not isinstance(self.grid, dict):
            raise ConfigError(f"{where}: 'base' and 'grid' must be mappings of run settings")
        check_names({**self.base, **self.grid, **self.space}, where)
        if self.best_by not in BEST_RULES:
            raise ConfigError(f"{where}: best_by must be one of {sorted(BEST_RULES)}, got {self.best_by!r}")
        if self.search not in ("grid", "random", "tpe"):
            raise ConfigError(f"{where}: search must be grid, random or tpe, got {self.search!r}")
        if self.search == "tpe" and (not self.space or self.trials < 1 or self.grid):
            raise ConfigError(f"{where}: search tpe needs 'trials' (> 0) and a 'space' of ranges, and no 'grid'")
        values = {name: v for name, v in self.grid.items()}
        for name, v in self.space.items():
            if not (isinstance(v, list) and v or isinstance(v, dict) and {"low", "high"} <= set(v)):
                raise ConfigError(f"{where}: space field '{name}' needs a list of choices or {{low: .., high: ..}}")
            values[name] = v if isinstance(v, list) else [v["low"], v["high"]]
        for name, choices in values.items():
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: grid field '{name}' needs a non-empty list of values")
        # Every value parsed once with the sweep's base, so a mistake names the sweep file before any run starts.
        base = self.base_config(where=where)[0]
        for name, choices in values.items():
            for value in choices:
                parse({**base.values, name: value}, where)

    def base_config(self, *overrides: dict, where: str = "sweep") -> tuple[Settings, str, str]:
        """The profile, then `base:`, then `overrides` (notebook parameters, flags): (settings, profile, why)."""
        return resolve(self.profile, self.base, *overrides, where=where)

    def configs(self, runs_dir: str | Path, *overrides: dict) -> list[Settings]:
        """The sweep's runs: base_config(*overrides), then each grid combination; output in runs_dir."""
        base = self.base_config(*overrides)[0]
        names = sorted(self.grid)
        combos = list(itertools.product(*(self.grid[n] for n in names)))
        if self.random_samples:
            combos = random.Random(self.sample_seed).sample(combos, min(self.random_samples, len(combos)))
        runs = {}
        for combo in combos:
            settings = base.replace(**dict(zip(names, combo)))
            folder = str(Path(runs_dir) / run_id(settings))
            runs.setdefault(folder, settings.replace(output_dir=folder))  # two combinations may be the same run
        return list(runs.values())


def run_one(settings: Settings, data=None, **run_kwargs) -> RunRecord:
    """Train one run; any error (NaN loss, out of memory, a bad setting) becomes a failed record."""
    from .pipeline import free_memory, run

    try:
        record = run(settings, data, **run_kwargs)
    except Exception as err:  # noqa: BLE001 - the sweep must go on; the error is kept in the record
        record = RunRecord.failed(settings, err)
    free_memory()  # after the except block: the traceback, and the GPU memory it held, are gone
    return record


def run_sweep(configs: list[Settings], data=None, poll_seconds: float = 2.0, search: dict | None = None,
              **run_kwargs) -> list[dict]:
    """Run every config that has no record yet; wait for runs other processes hold. Returns all their records.
    `data` defaults to each config's own prepared data (prepared once per distinct data settings); `search` says
    which search made the runs (kept in each record; a pruned run's record has status "pruned")."""
    search = search or {"method": "grid"}
    pending = list(configs)
    while pending:
        waiting = []
        for i, config in enumerate(pending, 1):
            folder = Path(config.dpo.output_dir)
            label = f"[{folder.name}] {i}/{len(pending)}"
            if (folder / "record.json").exists():
                print(f"{label} already done: skipped")
                continue
            lock = RunLock(folder)
            if not lock.acquire():
                waiting.append(config)
                continue
            try:
                if (folder / "record.json").exists():  # finished by another process since we looked
                    continue
                print(f"{label} training: {describe(config)}", flush=True)
                record = run_one(config, data, **run_kwargs)
                record.search = dict(search)
                if record.status == "finished" and search.get("pruned_at_step"):
                    record.status = "pruned"
                record.save(folder / "record.json")
                print(f"{label} {record.status}" + (f": {record.error}" if record.error else "")
                      + time_spent(record.timings_s, left=len(pending) - i), flush=True)
            finally:
                lock.release()
        if waiting:
            print(f"waiting for {len(waiting)} run(s) held by another sweep process ...")
            time.sleep(poll_seconds)
        pending = waiting
    return load_records([Path(c.dpo.output_dir) for c in configs])


def run_tpe(spec: SweepSpec, base: Settings, runs_dir: Path, results_dir: Path) -> list[dict]:
    """Trials until the study has `spec.trials` finished or pruned ones (other workers' count too); returns the
    records of every run the study made, whichever worker ran it."""
    import optuna

    from .search import COUNTED, PruneLaggingRun, open_study, suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines per run
    study = open_study(spec, results_dir)

    def objective(trial: optuna.Trial) -> float:
        config = base.replace(**suggest(trial, spec.space))
        config = config.replace(output_dir=str(runs_dir / run_id(config)))
        trial.set_user_attr("run_id", run_id(config))
        search = {"method": "tpe", "study": spec.study, "trial": trial.number}
        print(f"trial {trial.number}:", flush=True)
        [record] = run_sweep([config], search=search, setup=lambda t: t.add_callback(PruneLaggingRun(trial, search)))
        if record["status"] == "pruned":
            raise optuna.TrialPruned(f"lagging at step {record['search'].get('pruned_at_step')}")
        return rule_value(record, spec.best_by)  # NaN (a failed run) makes a failed trial

    left = spec.trials - len(study.get_trials(deepcopy=False, states=COUNTED))
    if left > 0:  # MaxTrialsCallback: stop when the workers together reach `trials`
        study.optimize(objective, n_trials=left, callbacks=[optuna.study.MaxTrialsCallback(spec.trials, COUNTED)])
    ids = dict.fromkeys(t.user_attrs["run_id"] for t in study.get_trials(deepcopy=False) if "run_id" in t.user_attrs)
    return load_records([runs_dir / i for i in ids])


def run_spec(spec: SweepSpec, results_dir: str | Path, *overrides: dict) -> list[dict]:
    """Run (or resume, or join) the sweep a spec describes, plus its control; return the records of its runs.
    The sweep command and the notebook both call this."""
    results_dir = Path(results_dir)
    if spec.search == "tpe":
        base = spec.base_config(*overrides)[0]
        records = run_tpe(spec, base, results_dir / "runs", results_dir)
        configs = {r["run_id"]: parse(r["config"]) for r in records}
    else:
        method = "random" if spec.random_samples else "grid"
        configs = {run_id(c): c for c in spec.configs(results_dir / "runs", *overrides)}
        records = run_sweep(list(configs.values()), search={"method": method})
    best = pick_best(records, spec.best_by)
    if spec.control and best:  # the control: the best settings on a random-weight model, beside it in the workbook
        records += run_sweep([control_of(configs[best["run_id"]])], search={"method": "control"})
    return records


def search_info(spec: SweepSpec) -> dict:
    """How the sweep searched, for the workbook's Summary (a database password never reaches the file)."""
    if spec.search != "tpe":
        return {"search": "random" if spec.random_samples else "grid", "grid": spec.grid}
    from .search import shown_url

    storage = shown_url(spec.storage) if spec.storage else "sqlite (results)"
    return {"search": "tpe (Optuna)" + (", median pruning" if spec.prune else ""), "study": spec.study,
            "storage": storage, "trials": spec.trials, "space": spec.space}


def time_spent(timings: dict, left: int) -> str:
    """Where a finished run's time went (its timings_s) and what the `left` runs not yet looked at (some may be done,
    or held by another process) would take at its pace; "" for a run without timings (a failed one)."""
    if not timings:
        return ""
    pace = f"; at this pace about {timings['total'] * left / 60:.0f} min for the {left} left" if left else ""
    return (f" in {timings['total']:.0f} s: build {timings['build']:.0f} s, training {timings['training']:.0f} s, "
            f"evaluating {evaluating_seconds(timings):.0f} s{pace}")


def describe(config: Settings) -> str:
    dpo = config.dpo
    return (f"lr={dpo.learning_rate:g} batch={dpo.per_device_train_batch_size}x{dpo.gradient_accumulation_steps} "
            f"beta={dpo.beta:g} optim={config.get('optim')} loss={','.join(dpo.loss_type)} r={config.model.lora_r} "
            f"steps={dpo.max_steps}")


def best_samples(best: dict, prompts: list[str], max_new_tokens: int = 40) -> list[dict]:
    """Generations on held-out prompts, base model vs the best adapter (one model, adapter toggled)."""
    from peft import PeftModel

    from .generation import generate_samples
    from .model import load_base_model, load_tokenizer

    settings = parse(best["config"])
    base = load_base_model(settings.model)
    model = PeftModel.from_pretrained(base, best["adapter_path"])
    return generate_samples(model, load_tokenizer(best["adapter_path"]), prompts, max_new_tokens=max_new_tokens)


def report_sweep(records: list[dict], data, results_dir: str | Path, sweep_info: dict | None = None,
                 n_samples: int = 4, best_by: str = "reward_accuracy") -> dict:
    """Publish the best run, write the plots and rebuild the workbook from the records. Returns what it made."""
    from .report import save_plots
    from .workbook import build_workbook

    results_dir = Path(results_dir)
    best = pick_best(records, best_by)
    finished = [r for r in records if r["status"] == "finished"]
    baseline = next((r["base_evaluation"] for r in finished if r.get("base_evaluation")), None)
    best_id = best["run_id"] if best else None
    samples = best_samples(best, list(data.test["prompt"][:n_samples])) if best else []
    summary = {
        "data": data.report.as_dict(),
        "model": (best or (finished or [{}])[0]).get("model_info", {}),
        "sweep": {"runs": len(records), **{status: sum(r["status"] == status for r in records)
                                           for status in ("finished", "pruned", "failed")}, **(sweep_info or {})},
    }
    return {
        "best": str(publish_best(best, results_dir / "best")) if best else None,
        "plots": [str(p) for p in save_plots(records, results_dir / "plots", best_id, best_by)],
        "workbook": str(build_workbook(
            records, results_dir / "sweep_results.xlsx", best_run_id=best_id, best_rule=BEST_RULES[best_by],
            best_by=best_by, summary=summary, samples=samples, baseline=baseline,
        )),
        "best_run_id": best_id,
        "best_rule": BEST_RULES[best_by],
        "baseline": baseline,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .errors import one_line_errors
    from .args import results_dir

    parser = one_line_errors(argparse.ArgumentParser(prog="python -m dpo_pipeline sweep", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("spec", help="sweep file (YAML or JSON): profile, base, grid or search/trials/space")
    parser.add_argument("--results-dir", default=None, help="default: results/ (or $DPO_RESULTS_DIR)")
    args = parser.parse_args(argv)
    spec = SweepSpec.from_file(args.spec)  # a mistake in the file is found before the ML libraries load (seconds)
    from .prepare import prepare_data

    out = Path(args.results_dir) if args.results_dir else results_dir()
    base, name, why = spec.base_config()
    print(f"Sweep from {args.spec}: profile {name} ({why})")
    data = prepare_data(base)  # the sweep's base data, checked before any run starts (and shown)
    print(data.report)
    records = run_spec(spec, out)
    made = report_sweep(records, data, out, sweep_info={"spec": str(args.spec), **search_info(spec)},
                        best_by=spec.best_by)
    print(f"best run: {made['best_run_id']} -> {made['best']}\nworkbook: {made['workbook']}")
    return 0


if __name__ == "__main__":
    from .errors import command

    sys.exit(command(main))
