"""Run folders: what a run leaves on disk, how it is written and read, and which run is the best.

A run folder (`results/run-<profile>/`, `results/runs/<run-id>/`, `results/best/`) holds:
    adapter_model.safetensors, adapter_config.json   the LoRA adapter (peft)
    tokenizer files                                   so the folder is self-contained for inference
    run_config.json                                   the settings that produced it (+ the prompt format)
    cleaning_report.json                              what the data cleaning kept and dropped
    record.json                                       the RunRecord (metrics, log history, timing), written last
Every JSON file is written atomically (temp file, then rename): a reader never sees half a file, even after a crash.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# What inference needs, and the run's own small records; never optimizer states or checkpoint-* folders.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
UPLOAD_FILES = (*ADAPTER_WEIGHTS, "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "run_config.json", "record.json", "cleaning_report.json", "judged.json")
CONTROL_PREFIX = "random-twin:"  # a control run's model (model.RANDOM_TWIN_PREFIX): never the best run
EVALUATED_SPLIT = "the validation slice when the profile has one, else the held-out test split"
BEST_RULES = {"reward_accuracy": f"highest reward accuracy (TRL eval rewards/accuracies) on {EVALUATED_SPLIT}, "
                                 "then lowest eval loss",
              "win_rate": f"highest judged win rate against the base model on prompts from {EVALUATED_SPLIT}, "
                          "then highest reward accuracy there"}


@dataclass
class RunRecord:
    """What one run produced: enough to compare runs, plot them and reload the adapter."""

    config: dict
    status: str  # "finished" | "failed" | "pruned" (a sweep's trial stopped early)
    train_pairs: int = 0
    eval_pairs: int = 0
    train_steps: int = 0
    final_train_loss: float | None = None
    final_eval: dict = field(default_factory=dict)  # eval metrics after the last step, without the "eval_" prefix
    best_eval: dict = field(default_factory=dict)  # the logged evaluation with the lowest eval loss (with "step")
    log_history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0  # training including its evaluations
    pairs_per_second: float = 0.0  # training pairs per second, evaluation time excluded
    adapter_path: str = ""
    model_info: dict = field(default_factory=dict)
    error: str | None = None  # one line, for a failed run
    run_id: str = ""  # the output folder's name (in a sweep, a hash of the config)
    evaluation: dict = field(default_factory=dict)  # held-out per-pair metrics of the adapter (evaluate.py)
    base_evaluation: dict = field(default_factory=dict)  # the same for the base model (adapter disabled)
    judged: dict = field(default_factory=dict)  # judged generations against the base model (judge.py), summary
    completions: list[dict] = field(default_factory=list)  # answers to fixed validation prompts while training
    search: dict = field(default_factory=dict)  # which search made the run: grid, random or tpe (study, trial)
    resumed_from_step: int | None = None  # the checkpoint a killed run went on from (None: trained from step 0)
    findings: list[str] = field(default_factory=list)  # the DPO doctor's one-line findings (doctor.py)
    # seconds: build (data, model, reference log-probs), of it reference, training, evaluations while training
    # (and after, when the last step had none), answers while training, held_out (evaluate.py), judged, total
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        return cls(**json.loads(Path(path).read_text()))


def evaluating_seconds(timings: dict) -> float:
    """A record's seconds spent scoring and answering rather than training or building (its timings_s)."""
    return sum(timings.get(k, 0.0) for k in ("evaluations", "answers", "held_out", "judged"))


def write_json_atomic(path: str | Path, obj) -> None:
    """Write to a temp file then rename, so a reader never sees half a file (even after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def keep_behaviour(folder: str | Path, report: dict) -> None:
    """A behaviour report (behaviour.py) kept with its run: behaviour.json beside the adapter (the model card and the
    workbook read it) and the doctor's findings on the answers added to the record's (the Runs sheet shows them)."""
    folder = Path(folder)
    write_json_atomic(folder / "behaviour.json", report)
    if record := read_json(folder / "record.json"):  # as a mapping: a record from an older version keeps its other keys
        kept = record.get("findings") or []
        record["findings"] = kept + [finding for finding in report.get("findings", []) if finding not in kept]
        write_json_atomic(folder / "record.json", record)


def behaviour_test_rows(report: dict) -> list[dict]:
    """A behaviour report's paired tests (behaviour.json), a row per comparison and measure: the card's and the
    workbook's table."""
    return [{"comparison": name, "measure": measure, "difference": r[measure]["difference"], "test": r[measure]["test"],
             "p": r[measure]["p"], "Holm p": r[measure]["p_holm"]}
            for name, r in (report.get("tests") or {}).items() for measure in r]


def write_run_start(folder: str | Path, config: dict, prompt_format: str, cleaning_report: dict) -> None:
    """A run folder's first files: its settings and prompt format (the app must use it too), the cleaning report."""
    write_json_atomic(Path(folder) / "run_config.json", {**config, "prompt_format": prompt_format})
    write_json_atomic(Path(folder) / "cleaning_report.json", cleaning_report)


def checkpoints(folder: str | Path) -> list[Path]:
    """The Trainer checkpoints (checkpoint-<step>) in a run folder, oldest step first."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def remove_checkpoints(folder: str | Path) -> None:
    for checkpoint in checkpoints(folder):
        shutil.rmtree(checkpoint, ignore_errors=True)


def resume_point(folder: str | Path, config: dict) -> Path | None:
    """The checkpoint this run goes on from: the last complete one in its folder (trainer_state.json, which Trainer
    writes last, reads back), when the folder's run_config.json holds these same settings. Checkpoints of other
    settings (the notebook's run-<profile> folder trained again with another learning rate) are removed."""
    before, now = read_json(Path(folder) / "run_config.json"), json.loads(json.dumps(config, default=str))
    before.pop("prompt_format", None), now.pop("prompt_format", None)  # the file holds the one the data resolved
    if before != now and checkpoints(folder):
        print(f"{folder}: its checkpoints are of other settings; removed, starting from step 0", flush=True)
        remove_checkpoints(folder)
        return None  # never one of them, even one that could not be removed
    for checkpoint in reversed(checkpoints(folder)):
        if read_json(checkpoint / "trainer_state.json").get("global_step"):
            return checkpoint
        shutil.rmtree(checkpoint, ignore_errors=True)  # cut off while it was written
    return None


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing or unreadable (cards and the app are best-effort)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(folder: str | Path) -> dict:
    """The run files of an adapter folder: {"adapter_config", "run_config", "record", "cleaning_report",
    "behaviour"} dicts (behaviour.json: the paired behaviour report against the base and the shuffled control)."""
    names = ("adapter_config", "run_config", "record", "cleaning_report", "behaviour")
    run = {name: read_json(Path(folder) / f"{name}.json") for name in names}
    if not run["run_config"] and isinstance(run["record"].get("config"), dict):
        run["run_config"] = run["record"]["config"]
    return run


def adapter_files(folder: str | Path) -> list[str]:
    """The names in `folder` worth uploading (UPLOAD_FILES); empty when there is no adapter at all."""
    names = [n for n in UPLOAD_FILES if (Path(folder) / n).is_file()]
    return names if "adapter_config.json" in names and set(ADAPTER_WEIGHTS) & set(names) else []


def run_id(settings) -> str:
    """A short stable id from the settings that define the run (not where it is written)."""
    values = {k: v for k, v in settings.to_dict().items() if k not in ("output_dir", "run_name")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def rule_value(record: dict, by: str = "reward_accuracy") -> float:
    """The number BEST_RULES[by] ranks runs by (higher is better); NaN when the run has none (a failed run)."""
    part, key = ("judged", "win_rate") if by == "win_rate" else ("final_eval", "rewards/accuracies")
    return (record.get(part) or {}).get(key, math.nan)


def search_label(record: dict) -> str:
    """Which search made a run: "grid", "random", "control" or "tpe #<trial>"."""
    search = record.get("search") or {}
    return f"tpe #{search.get('trial')}" if search.get("method") == "tpe" else search.get("method", "grid")


def tpe_trials(records: list[dict]) -> list[dict]:
    """The runs a TPE search made, in trial order (empty for a grid or random sweep)."""
    return sorted((r for r in records if (r.get("search") or {}).get("method") == "tpe"),
                  key=lambda r: r["search"]["trial"])


def pick_best(records: list[dict], by: str = "reward_accuracy") -> dict | None:
    """The best finished run by BEST_RULES[by], or None when no run finished (control runs never count)."""
    if by not in BEST_RULES:
        raise ValueError(f"best_by must be one of {sorted(BEST_RULES)}, got {by!r}")
    control = lambda r: str(r["config"].get("model_name_or_path", "")).startswith(CONTROL_PREFIX) \
        or bool(r["config"].get("shuffled_labels"))
    finished = [r for r in records if r["status"] == "finished" and r.get("final_eval") and not control(r)]
    accuracy = lambda r: r["final_eval"].get("rewards/accuracies", 0.0)
    if by == "win_rate":
        key = lambda r: (-(r.get("judged") or {}).get("win_rate", -1.0), -accuracy(r))
    else:
        key = lambda r: (-accuracy(r), r["final_eval"].get("loss", float("inf")))
    return min(finished, key=key) if finished else None


CONTROLS = ("shuffled", "random")  # the label control; the random-weight twin of the base (implicit rewards only)


def control_of(settings, kind: str = "shuffled"):
    """The same run as a control: "shuffled", the same pairs with their sides swapped at random (what DPO on this
    data does without the raters' preferences), or "random", the same pairs on the random-weight twin of its base
    model (what the implicit-reward accuracy reaches with no pretrained knowledge)."""
    if kind == "shuffled":
        return settings.replace(shuffled_labels=True, output_dir=settings.dpo.output_dir + "-shuffled")
    if kind == "random":
        return settings.replace(model_name_or_path=CONTROL_PREFIX + settings.model.model_name_or_path,
                                output_dir=settings.dpo.output_dir + "-control")
    raise ValueError(f"control must be one of {CONTROLS}, got {kind!r}")


def replace_folder(folder: str | Path, fill) -> Path:
    """Write a folder as a whole: `fill(staging)` writes a temp folder beside it, which then takes its place (a reader
    sees the old folder or the new one, never half of one)."""
    folder = Path(folder)
    staging, old = (folder.with_name(f".{folder.name}.{os.getpid()}.{end}") for end in ("tmp", "old"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fill(staging)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def publish_best(best: dict, best_dir: str | Path) -> Path:
    """Copy the best run's inference files and records to a stable folder (replaced atomically as a whole)."""
    source = Path(best["adapter_path"] or best["config"]["output_dir"])

    def fill(staging: Path) -> None:
        for name in adapter_files(source):
            shutil.copy2(source / name, staging / name)
    return replace_folder(best_dir, fill)


@contextmanager
def run_lock(folder: str | Path):
    """Hold the run folder's `.lock` while the run trains. Another process waits here until it is let go; a flock is
    let go when its process dies, even by SIGKILL, so a killed sweep's run is taken over. The holder removes the
    file before it lets go: a waiter that then wins the lock on the removed file tries again on the new one."""
    path, waited = Path(folder) / ".lock", False
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    print(f"[{path.parent.name}] held by another sweep process: waiting for its record", flush=True)
                waited = True
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as err:  # ENOLCK / ENOSYS: a filesystem without flock (some network and FUSE mounts)
                raise ValueError(f"{path.parent.parent}: this folder does not support file locks ({err.strerror}); "
                                 "put the sweep's results on a local disk or one whose flock is shared") from None
            try:
                held = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:  # removed by the holder this process waited for
                held = False
            if held:
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)
                return
