"""The model card (the repo's README.md) of a pushed adapter, or of its merged model: huggingface_hub's ModelCard
rendered from templates/adapter_card.md (merged_card.md); the tables are made here, the prose is in the templates.

Everything comes from the adapter folder (adapter_config.json, run_config.json, record.json, cleaning_report.json,
behaviour.json), read tolerantly: a missing file or key leaves its section out rather than failing the push.
"""

from __future__ import annotations

import math
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .chat_template import HUMAN_ASSISTANT
from .hf import OFFLINE_PREFIX, is_hub_id
from .runs import behaviour_test_rows, read_run

TEMPLATES = Path(__file__).with_name("templates")
SKIP_CONFIG = {"output_dir"}  # a path on the training machine: noise on the Hub
MAX_SWEEP_ROWS = 100


def base_model_of(run: dict) -> str | None:
    """The base model as the user named it: adapter_config's base (what peft loads), else the run config's."""
    return run["adapter_config"].get("base_model_name_or_path") or run["run_config"].get("model_name_or_path")


def prompt_format_of(adapter_dir: str | Path, run_config: dict) -> str:
    """"text" (the Human/Assistant template) or "chat" (the model's own), from the folder itself: its saved chat
    template, else what its run_config.json says (Human/Assistant for a folder with neither)."""
    template = Path(adapter_dir) / "chat_template.jinja"
    if run_config.get("prompt_format") in ("text", "chat"):
        return run_config["prompt_format"]
    return "chat" if template.exists() and template.read_text() != HUMAN_ASSISTANT else "text"


def fmt(value) -> str:
    """One table cell: short floats, joined lists, a dash for nothing, and no pipe that would split the cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "—"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(fmt(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """The rows as a Markdown table ("" for no rows): the given columns, else every key in first-seen order."""
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    """The sweep as a table of what differs between runs: nested dicts spread one level ("final_eval.loss"); paths,
    logs (lists of dicts) and settings every run shares left out."""
    flat = []
    for row in rows:
        cells = {}
        for key, value in row.items():
            if isinstance(value, dict):
                cells.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
            elif not (isinstance(value, list) and value and isinstance(value[0], dict)):
                cells[key] = value
        flat.append({k: v for k, v in cells.items() if not k.endswith(("output_dir", "adapter_path"))})
    columns = list(dict.fromkeys(k for row in flat for k in row))
    if len(flat) > 1:  # a shared value is already in the training configuration
        columns = [c for c in columns if len({fmt(row.get(c)) for row in flat}) > 1]
    columns.sort(key=lambda c: c not in ("run_id", "run", "name"))  # the run's name first
    return markdown_table(flat, columns)


def dataset_of(run: dict, dataset: str | None) -> str | None:
    record_data = run["record"].get("data")
    candidates = [dataset, run["cleaning_report"].get("source"),
                  record_data.get("source") if isinstance(record_data, dict) else record_data]
    return next((c for c in candidates if isinstance(c, str) and c), None)


def build_model_card(adapter_dir: str | Path, repo_id: str, *, sweep_rows: list[dict] | None = None,
                     base_eval: dict | None = None, dataset: str | None = None, license: str = "mit",
                     merged_from: str | None = None) -> ModelCard:
    """The card for the adapter in `adapter_dir` as it will live in `repo_id` (metadata + body); with `merged_from`
    (the adapter's repo id), the short card of the adapter merged into its base, whose details stay on the adapter's."""
    run = read_run(adapter_dir)
    config, record, behaviour = run["run_config"], run["record"], run["behaviour"]
    base, data = base_model_of(run), dataset_of(run, dataset)
    four_bit = bool(config.get("load_in_4bit"))
    tags = ["trl", "dpo", "text-generation", "preference-tuning"]
    tags += ["merged"] if merged_from else ["lora", "peft"] + (["4-bit", "bitsandbytes"] if four_bit else [])
    card_data = ModelCardData(  # a base or dataset that is not a Hub id (local, offline) would not resolve there
        base_model=base if is_hub_id(base) else None, datasets=[data] if is_hub_id(data) else None, tags=tags,
        library_name="transformers" if merged_from else "peft", license=license, pipeline_tag="text-generation",
        model_name=repo_id.split("/")[-1])

    settings = [{"setting": k, "value": v} for k, v in config.items() if k not in SKIP_CONFIG]
    settings += [{"setting": k, "value": record[k]} for k in ("train_steps", "wall_time_s", "pairs_per_second")
                 if record.get(k) is not None]
    final, best = record.get("final_eval") or {}, record.get("best_eval") or {}
    evals = {"final": final} if best.get("step") is None else {"final": final, f"best (step {best['step']})": best}
    trl_rows = [{"TRL eval metric": m, **{name: values.get(m) for name, values in evals.items()}}
                for m in dict.fromkeys([*final, *best]) if m != "step"]
    held_out, base_eval = record.get("evaluation") or {}, base_eval or record.get("base_evaluation") or {}
    base_rows = [{"metric": m, "DPO adapter": held_out.get(m), "base model": base_eval.get(m)}
                 for m in dict.fromkeys([*held_out, *base_eval])]
    # the paired behaviour tests (behaviour.py); never its prompts or answers
    sweep_rows = list(sweep_rows or [])
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / ("merged_card.md" if merged_from else "adapter_card.md")),
        repo_id=repo_id, merged_from=merged_from, base=base, hub_base=is_hub_id(base), four_bit=four_bit,
        random_gpt2=str(base).startswith(OFFLINE_PREFIX + "gpt2"), data=data, record=record, fmt=fmt,
        text_format=prompt_format_of(adapter_dir, config) == "text", loss_type=config.get("loss_type"),
        settings_table=markdown_table(settings) if config else "", trl_table=markdown_table(trl_rows) if final else "",
        base_table=markdown_table(base_rows), behaviour=behaviour,
        behaviour_table=markdown_table(behaviour_test_rows(behaviour)),
        sweep_table=sweep_table(sweep_rows[:MAX_SWEEP_ROWS]) if sweep_rows else "", sweep_runs=len(sweep_rows),
        sweep_shown=len(sweep_rows[:MAX_SWEEP_ROWS]),
    )
