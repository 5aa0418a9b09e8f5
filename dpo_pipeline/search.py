"""The sweep's Optuna study (sweep.run_spec drives it): its samplers, median pruning, and the database it lives in,
which several processes, GPUs and machines share. Its heartbeat fails a dead worker's trial and queues its run again
(the same folder: the cut-off run is redone, never duplicated).
"""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from transformers import TrainerCallback

from .args import ConfigError

COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # trials that count toward `trials`


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Settings for one trial: a list is a choice, a mapping {low, high, log} a range (int when both ends are)."""
    values = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            values[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        else:  # float(): YAML 1.1 reads `1e-4` (no dot) as text; the sweep already parsed both ends as settings
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               log=spec.get("log", False))
    return values


class PruneLaggingRun(TrainerCallback):
    """Reports each evaluation's reward accuracy to the trial; stops training when the pruner says the run lags."""

    def __init__(self, trial: optuna.Trial, search: dict):
        self.trial, self.search = trial, search

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_rewards/accuracies")
        if value is None or not state.is_world_process_zero:
            return
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            self.search["pruned_at_step"] = state.global_step  # the record says so (status "pruned")
            control.should_training_stop = True


def shown_url(url: str) -> str:
    """A storage URL as it may be printed or written: the password hidden."""
    return make_url(url).render_as_string(hide_password=True) if "://" in url else url


def open_study(spec, results_dir: Path, runs: list[str] = ()) -> optuna.Study:
    """The sweep's study, created on first use; every worker that opens it shares its trials. `runs`: the run ids
    of a grid or random sweep, which its GridSampler picks from."""
    results_dir.mkdir(parents=True, exist_ok=True)
    url = spec.storage or f"sqlite:///{(results_dir / 'optuna.db').resolve()}"
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat's notice
    # Two workers starting together would both create the schema of a new database (alembic's version row: a
    # UNIQUE failure in one of them): they open the storage one at a time, under a lock file beside the results.
    with open(results_dir / ".optuna.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                heartbeat_interval=spec.heartbeat_seconds, grace_period=2 * spec.heartbeat_seconds,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
        except (ImportError, ValueError, SQLAlchemyError) as err:  # no driver, a bad URL, no server
            raise ConfigError(f"cannot open the study storage {shown_url(url)}: {str(err).splitlines()[0]}") from None
    if spec.search == "tpe":
        # Each worker its own seed: two workers with one seed would propose the same settings. TPE's default of 10
        # random trials would be all of a small study; it models the results after a third of the trials (at least 2).
        sampler = optuna.samplers.TPESampler(seed=(spec.sample_seed * 1_000_003 + os.getpid()) % 2**32,
                                             n_startup_trials=max(2, spec.trials // 3))
    else:  # Its choices are run ids, not values: random draws are no product of values, and the study's grid is
        # exactly the runs these settings (overrides included) make. Every worker one seed: trial n makes run n of
        # the shuffled grid, the same run in each of them.
        sampler = optuna.samplers.GridSampler({"run": list(runs)}, seed=spec.sample_seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if spec.prune else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=spec.study, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)
