"""Sweep stage: the runs of a sweep file, each trained once with a durable record, picked by one Optuna study.

    python -m dpo_pipeline sweep configs/sweeps/smoke.yaml      # run or resume a sweep, then rebuild the report
    python -m dpo_pipeline sweep configs/sweeps/tpe_smoke.yaml  # start it in several shells: they share the study

A sweep file names its `profile`, `base:` settings every run shares, and a `grid:` of values (every combination, or
`random_samples:` of them) or `search: tpe`, `trials:` and a `space:` of ranges. A run lives in
`results/runs/<run-id>/` (a hash of its settings); its `record.json` is the truth: a run with one is never trained
again, so a sweep killed at any moment redoes only the run cut off, and several sweep processes can share one results
folder (a lock file per run). The workbook is rebuilt from the records.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .args import ConfigError, Settings, check_names, parse, parse_stored, resolve
from .runs import (BEST_RULES, CONTROLS, RunRecord, control_of, evaluating_seconds, pick_best, publish_best,
                   read_json, read_run, rule_value, run_id, run_lock)


@dataclass
class SweepSpec:
    grid: dict[str, list] = field(default_factory=dict)  # setting -> values; every combination is a run
    base: dict = field(default_factory=dict)  # settings every run of the sweep shares
    random_samples: int = 0  # > 0: draw this many combinations at random instead of taking them all
    sample_seed: int = 0
    profile: str = "auto"  # the profile the sweep starts from (data, model, defaults)
    control: bool | str | list = False  # also train the best settings as controls: runs.CONTROLS, a list, or true
    best_by: str = "reward_accuracy"  # or "win_rate": the judged win rate (runs need a `judge`), runs.BEST_RULES
    search: str = "grid"  # grid | random (when random_samples > 0) | tpe: Optuna's TPE over `space`
    trials: int = 0  # tpe: finished or pruned trials to reach, all workers together
    space: dict = field(default_factory=dict)  # tpe: field -> [choices] or {low, high, log}
    # Stop a run whose validation reward accuracy lags the median of the study's runs at an evaluation. Unset: on
    # for tpe; off for grid and random, whose runs (and so results) would otherwise change.
    prune: bool | None = None
    storage: str | None = None  # SQLAlchemy URL of the study; None: sqlite in the results folder (optuna.db)
    study: str = "sweep"  # the study's name; from a file: the file's name
    heartbeat_seconds: int = 60  # a trial silent for twice this is a dead worker's, and is run again

    def __post_init__(self):  # `search` names the sampler; `search: random` without draws is the whole grid, as before
        if self.search in ("grid", "random"):
            self.search = "random" if self.random_samples else "grid"
        self.prune = self.search == "tpe" if self.prune is None else self.prune
        self.control = list(CONTROLS) if self.control is True else [] if not self.control else \
            [self.control] if isinstance(self.control, str) else list(self.control)

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
        if unknown := [key for key in raw if key not in known]:
            raise ConfigError(f"{path}: unknown key '{unknown[0]}'; expected one of {sorted(known)}")
        spec = cls(**{"study": Path(path).stem, **raw})
        spec.validate(str(path))
        return spec

    def validate(self, where: str = "sweep") -> None:
        what = {int: "a whole number", str: "a name", dict: "a mapping of run settings"}
        for f in dataclasses.fields(self):  # the sweep's own keys that take a whole number, a name or a mapping
            value, kind = getattr(self, f.name), dict if f.default_factory is dict else type(f.default)
            if kind in what and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ConfigError(f"{where}: {f.name} must be {what[kind]}, got {value!r}")
        for name, low in (("random_samples", 0), ("trials", 0), ("heartbeat_seconds", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{where}: {name} must be >= {low}, got {getattr(self, name)}")
        check_names({**self.base, **self.grid, **self.space}, where)
        if self.best_by not in BEST_RULES:
            raise ConfigError(f"{where}: best_by must be one of {sorted(BEST_RULES)}, got {self.best_by!r}")
        if unknown := [kind for kind in self.control if kind not in CONTROLS]:
            raise ConfigError(f"{where}: control must be true, false or some of {list(CONTROLS)}, got {unknown[0]!r}")
        if self.search not in ("grid", "random", "tpe"):
            raise ConfigError(f"{where}: search must be grid, random or tpe, got {self.search!r}")
        if self.search == "tpe" and (not self.space or self.trials < 1 or self.grid):
            raise ConfigError(f"{where}: search tpe needs 'trials' (> 0) and a 'space' of ranges, and no 'grid'")
        # Every value parsed once with the sweep's base, so a mistake names the sweep file before any run starts.
        base, fields = self.base_config(where=where)[0], {**self.grid, **self.space}  # (tpe has no grid)
        if self.best_by == "win_rate" and base.run.judge in (None, "", "none") and "judge" not in fields:
            raise ConfigError(f"{where}: best_by win_rate ranks runs by their judged win rate, and no run has a judge: "
                              "set judge (a reward model) in base, or best_by reward_accuracy")
        for name, v in fields.items():  # a list of values, or in space a range: its ends parsed, then its order
            in_space = name in self.space
            ranged = in_space and isinstance(v, dict) and {"low", "high"} <= set(v)
            if not (ranged or isinstance(v, list) and v):
                wanted = "a list of choices or {low: .., high: ..}" if in_space else "a non-empty list of values"
                raise ConfigError(f"{where}: {'space' if in_space else 'grid'} field '{name}' needs {wanted}")
            for value in [v["low"], v["high"]] if ranged else v:
                parse({**base.values, name: value}, where)
            if not ranged:
                continue
            try:  # checked before Optuna's first trial; float(): YAML 1.1 reads `1e-4` as text
                low, high = float(v["low"]), float(v["high"])
            except ValueError:
                raise ConfigError(f"{where}: space field '{name}' is a range: low and high must be numbers") from None
            if low > high or (v.get("log") and low <= 0):
                raise ConfigError(f"{where}: space field '{name}' needs low <= high (and low > 0 with log: true), "
                                  f"got low {v['low']}, high {v['high']}")

    def base_config(self, *overrides: dict, where: str = "sweep") -> tuple[Settings, str, str]:
        """The profile, then `base:`, then `overrides` (notebook parameters, flags): (settings, profile, why)."""
        return resolve(self.profile, self.base, *overrides, where=where)

    def configs(self, runs_dir: str | Path, *overrides: dict) -> list[Settings]:
        """The sweep's runs: base_config(*overrides), then each grid combination; output in runs_dir."""
        base, names = self.base_config(*overrides)[0], sorted(self.grid)
        combos = list(itertools.product(*(self.grid[n] for n in names)))
        if self.random_samples:
            combos = random.Random(self.sample_seed).sample(combos, min(self.random_samples, len(combos)))
        runs = {}
        for combo in combos:
            settings = base.replace(**dict(zip(names, combo)))
            key = run_id(settings)  # two combinations may be the same run
            runs.setdefault(key, settings.replace(output_dir=str(Path(runs_dir) / key)))
        return list(runs.values())


def run_one(settings: Settings, data=None, search: dict | None = None, **run_kwargs) -> RunRecord:
    """Train one run; any error (NaN loss, out of memory, a bad setting) becomes a failed record."""
    from .doctor import diagnose
    from .pipeline import free_memory, run

    try:
        record = run(settings, data, search=search, **run_kwargs)
    except Exception as err:  # noqa: BLE001 - the sweep must go on; the error is kept in the record
        error = " ".join(f"{type(err).__name__}: {err}".split())[:500]  # one line
        record = RunRecord(config=settings.to_dict(), status="failed", error=error,
                           run_id=Path(settings.dpo.output_dir).name, findings=diagnose({"error": error}),
                           search=dict(search or {}))
    free_memory()  # after the except block: the traceback, and the GPU memory it held, are gone
    return record


def make_run(config: Settings, data=None, search: dict | None = None, number: tuple[int, int] = (1, 1),
             **run_kwargs) -> dict:
    """The run's record: read when it has one, else trained (on `data`, default its own) and saved, under the run's
    lock. `search` goes in the record; `number`: (i, n), its place in the printed lines."""
    folder, search, dpo = Path(config.dpo.output_dir), search or {"method": "grid"}, config.dpo
    label, left = f"[{folder.name}] {number[0]}/{number[1]}", number[1] - number[0]
    if (folder / "record.json").exists():  # a run with a record (another process's, an earlier sweep's) is read
        return read_json(folder / "record.json")
    with run_lock(folder):
        if not (folder / "record.json").exists():  # (another process may have made it while this one waited)
            print(f"{label} training: lr={dpo.learning_rate:g} batch={dpo.per_device_train_batch_size}x"
                  f"{dpo.gradient_accumulation_steps} beta={dpo.beta:g} optim={config.get('optim')} "
                  f"loss={','.join(dpo.loss_type)} r={config.model.lora_r} steps={dpo.max_steps}", flush=True)
            record = run_one(config, data, search=search, **run_kwargs)
            # a failed run's record; a trained run's is written whole already, with its search, by pipeline.run (a
            # worker reading it, or a process killed right after, never sees a pruned run as finished)
            record.save(folder / "record.json")
            line = f"{label} {record.status}" + (f": {record.error}" if record.error else "")
            if spent := record.timings_s:  # where its time went, and what the runs left would take at its pace
                line += (f" in {spent['total']:.0f} s: build {spent['build']:.0f} s, "
                         f"training {spent['training']:.0f} s, evaluating {evaluating_seconds(spent):.0f} s")
                line += f"; at this pace about {spent['total'] * left / 60:.0f} min for the {left} left" if left else ""
            print(line, flush=True)
    return read_json(folder / "record.json")


def run_sweep(configs: list[Settings], data=None, **kwargs) -> list[dict]:
    """make_run for each config in turn; their records."""
    return [make_run(c, data, number=(i, len(configs)), **kwargs) for i, c in enumerate(configs, 1)]


def run_spec(spec: SweepSpec, results_dir: str | Path, *overrides: dict) -> list[dict]:
    """Run (or resume, or join) the sweep a spec describes, plus its controls; the records of its runs. Its study
    makes every run of a grid (or of the draws), or `trials` finished or pruned TPE trials, all workers together."""
    import optuna

    from .search import COUNTED, PruneLaggingRun, open_study, suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines per run
    runs_dir = Path(results_dir) / "runs"
    base = spec.base_config(*overrides)[0]
    grid = {} if spec.search == "tpe" else {Path(c.dpo.output_dir).name: c for c in spec.configs(runs_dir, *overrides)}
    study, total = open_study(spec, Path(results_dir), list(grid)), len(grid) or spec.trials

    def made() -> int:  # the sweep's runs made so far, all workers together
        return sum((runs_dir / i / "record.json").exists() for i in grid) if grid else \
            len(study.get_trials(deepcopy=False, states=COUNTED))

    def objective(trial: optuna.Trial) -> float:
        if grid:
            config = grid[trial.suggest_categorical("run", list(grid))]
        else:
            config = base.replace(**suggest(trial, spec.space))
            config = config.replace(output_dir=str(runs_dir / run_id(config)))
        trial.set_user_attr("run_id", run_id(config))
        search = {"method": spec.search, "study": spec.study, "trial": trial.number}
        record = make_run(config, search=search, number=(made() + 1, total),
                          setup=lambda trainer: trainer.add_callback(PruneLaggingRun(trial, search)))
        if record["status"] == "pruned":
            raise optuna.TrialPruned(f"lagging at step {record['search'].get('pruned_at_step')}")
        return rule_value(record, spec.best_by)  # NaN (a failed run) makes a failed trial

    if made():
        print(f"{made()} of the sweep's {total} runs are made already (they are not trained again)")
    if made() < total and not (grid and study.sampler.is_exhausted(study)):
        # A GridSampler stops the study when each run has had a trial; TPE stops when the workers reach `trials`.
        study.optimize(objective, n_trials=None if grid else total - made(),
                       callbacks=None if grid else [optuna.study.MaxTrialsCallback(spec.trials, COUNTED)])
    if grid:  # A run whose trial ended with no record (stopped by Ctrl-C, its folder deleted since) is made here,
        # outside the study; one another worker still trains is waited for: each worker reports the whole grid.
        records = run_sweep(list(grid.values()), search={"method": spec.search})
    else:
        trials = study.get_trials(deepcopy=False)  # a run once, though its trial was retried
        ids = dict.fromkeys(t.user_attrs.get("run_id") for t in trials)
        records = [record for i in ids if i and (record := read_json(runs_dir / i / "record.json"))]
    best = pick_best(records, spec.best_by)
    if spec.control and best:  # the controls: the best settings with shuffled labels, on a random-weight model
        settings = parse_stored(best["config"], best["run_id"])  # a record an older version wrote reads too
        records += run_sweep([control_of(settings, kind) for kind in spec.control], search={"method": "control"})
    return records


def search_info(spec: SweepSpec) -> dict:
    """How the sweep searched, for the workbook's Summary (a database password never reaches the file)."""
    from .search import shown_url

    tpe = spec.search == "tpe"
    return {"search": ("tpe (Optuna)" if tpe else spec.search) + (", median pruning" if spec.prune else ""),
            "study": spec.study, "storage": shown_url(spec.storage) if spec.storage else "sqlite (results)",
            **({"trials": spec.trials, "space": spec.space} if tpe else {"grid": spec.grid})}


def report_sweep(records: list[dict], data, results_dir: str | Path, sweep_info: dict | None = None,
                 n_samples: int = 4, best_by: str = "reward_accuracy") -> dict:
    """Publish the best run, write the plots and rebuild the workbook from the records. Returns what it made."""
    from .generation import generate_samples
    from .model import attach_adapter, load_base_model, load_tokenizer
    from .report import save_plots
    from .workbook import build_workbook

    results_dir, best = Path(results_dir), pick_best(records, best_by)
    best_id = best["run_id"] if best else None
    finished = [r for r in records if r["status"] == "finished"]
    baseline = next((r["base_evaluation"] for r in finished if r.get("base_evaluation")), None)
    samples = []
    if best:  # held-out prompts answered by the base model and the best adapter (one model, the adapter toggled)
        settings = parse_stored(best["config"], best["run_id"])
        model = attach_adapter(load_base_model(settings.model), best["adapter_path"],
                               settings.model.model_name_or_path)
        samples = generate_samples(model, load_tokenizer(best["adapter_path"]), list(data.test["prompt"][:n_samples]))
    counts = {status: sum(r["status"] == status for r in records) for status in ("finished", "pruned", "failed")}
    summary = {"data": data.report.as_dict(), "model": (best or (finished or [{}])[0]).get("model_info", {}),
               "sweep": {"runs": len(records), **counts, **(sweep_info or {})}}
    return {"best": str(publish_best(best, results_dir / "best")) if best else None,
            "plots": [str(p) for p in save_plots(records, results_dir / "plots", best_id, best_by)],
            "workbook": str(build_workbook(records, results_dir / "sweep_results.xlsx", best_run_id=best_id,
                                           best_rule=BEST_RULES[best_by], best_by=best_by, summary=summary,
                                           samples=samples, baseline=baseline,
                                           behaviour=read_run(best["adapter_path"])["behaviour"] if best else None)),
            "best_run_id": best_id, "best_rule": BEST_RULES[best_by], "baseline": baseline, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .args import results_dir
    from .errors import one_line_errors

    parser = one_line_errors(argparse.ArgumentParser(prog="python -m dpo_pipeline sweep", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("spec", help="sweep file (YAML or JSON): profile, base, grid or search/trials/space")
    parser.add_argument("--results-dir", type=Path, help="default: results/ (or $DPO_RESULTS_DIR)")
    args = parser.parse_args(argv)
    spec = SweepSpec.from_file(args.spec)  # a mistake in the file is found before the ML libraries load (seconds)
    from .prepare import prepare_data

    out = args.results_dir or results_dir()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--results-dir {out} is a file; name a folder for the sweep's runs and workbook")
    base, name, why = spec.base_config()
    print(f"Sweep from {args.spec}: profile {name} ({why})")
    data = prepare_data(base)  # the sweep's base data, checked before any run starts (and shown)
    print(data.report)
    records = run_spec(spec, out)
    made = report_sweep(records, data, out, sweep_info={"spec": str(args.spec), **search_info(spec)},
                        best_by=spec.best_by)
    print(f"best run: {made['best_run_id']} -> {made['best']}\nworkbook: {made['workbook']}")
    return 0


if __name__ == "__main__":  # python -m dpo_pipeline.sweep, the same as python -m dpo_pipeline sweep
    from .errors import command

    raise SystemExit(command(main))
