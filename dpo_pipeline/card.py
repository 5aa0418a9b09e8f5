"""The model card (the repo's README.md) for a pushed adapter, built with huggingface_hub's ModelCard.

Everything comes from the adapter folder (adapter_config.json, run_config.json, record.json, cleaning_report.json),
read tolerantly: a missing file or key leaves its section out rather than failing the push.
"""

from __future__ import annotations

import math
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .chat_template import HUMAN_ASSISTANT
from .hf import OFFLINE_PREFIX, is_hub_id
from .runs import read_run

PROMPT_EXAMPLE = "What is a good name for a cat?"
TAGS = ["trl", "dpo", "lora", "peft", "text-generation", "preference-tuning"]
SKIP_CONFIG = {"output_dir"}  # a path on the training machine: noise on the Hub
MAX_SWEEP_ROWS = 100


def base_model_of(run: dict) -> str | None:
    """The base model as the user named it: adapter_config's base (what peft loads), else the run config's."""
    return run["adapter_config"].get("base_model_name_or_path") or run["run_config"].get("model_name_or_path")


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
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def flatten_row(row: dict) -> dict:
    """A sweep row with nested dicts spread one level ("final_eval.loss"); long lists (log histories) dropped."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not (isinstance(value, list) and value and isinstance(value[0], dict)):
            flat[key] = value
    return flat


def sweep_table(rows: list[dict]) -> str:
    """The sweep as a table of what differs between runs: settings every run shares, paths and logs left out."""
    flat = [{k: v for k, v in flatten_row(r).items() if not k.endswith(("output_dir", "adapter_path"))}
            for r in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    if len(flat) > 1:  # a shared value is already in the training configuration above
        columns = [c for c in columns if len({fmt(row.get(c)) for row in flat}) > 1]
    columns.sort(key=lambda c: c not in ("run_id", "run", "name"))  # the run's name first
    return markdown_table(flat, columns)


def dataset_of(run: dict, dataset: str | None) -> str | None:
    record_data = run["record"].get("data")
    candidates = [dataset, run["cleaning_report"].get("source"),
                  record_data.get("source") if isinstance(record_data, dict) else record_data]
    return next((c for c in candidates if isinstance(c, str) and c), None)


def _eval_section(record: dict, base_eval: dict | None, loss_type: str | None) -> str:
    final, best = record.get("final_eval") or {}, record.get("best_eval") or {}
    held_out, base_eval = record.get("evaluation") or {}, base_eval or record.get("base_evaluation") or {}
    if not (final or held_out or base_eval):
        return ""
    pairs = f" ({record['eval_pairs']} pairs)" if record.get("eval_pairs") else ""
    text = f"## Evaluation\n\nHeld-out preference pairs{pairs}, never trained on.\n"
    if final:
        columns = {"final": final}
        if best and best.get("step") is not None:
            columns[f"best (step {best['step']})"] = best
        metrics = [m for m in dict.fromkeys([*final, *best]) if m != "step"]
        rows = [{"TRL eval metric": m, **{name: values.get(m) for name, values in columns.items()}} for m in metrics]
        text += ("\n`rewards/accuracies` is the share of pairs where the implicit reward β·log(π/π_ref) of the "
                 "chosen answer beats the rejected one (ties count as misses).\n\n" + markdown_table(rows) + "\n")
    if held_out or base_eval:
        metrics = list(dict.fromkeys([*held_out, *base_eval]))
        rows = [{"metric": m, "DPO adapter": held_out.get(m), "base model": base_eval.get(m)} for m in metrics]
        text += ("\nAgainst the base model (the adapter switched off, which is also the DPO reference): reward "
                 "accuracy counts ties apart; `logp_accuracy` is the share of pairs where the model gives the chosen "
                 "answer the higher log-probability; the shifts are mean log-probability changes from the base.\n\n"
                 + markdown_table(rows) + "\n")
    elif loss_type in (None, "sigmoid"):
        text += ("\nThe base model (the adapter switched off) is the DPO reference, so by definition its implicit "
                 "rewards are 0 and its sigmoid DPO loss is log 2 ≈ 0.693.\n")
    return text


def _behaviour_section(report: dict) -> str:
    """The paired behaviour tests (behaviour.py), when the folder has them; never the prompts or answers."""
    if not report.get("tests"):
        return ""
    rows = [{"comparison": name, "measure": measure, "difference": result[measure]["difference"],
             "test": result[measure]["test"], "p": result[measure]["p"], "Holm p": result[measure]["p_holm"]}
            for name, result in report["tests"].items() for measure in result]
    judge = report["lexical_judge"]
    return (f"## Behaviour against the base and a shuffled-label control\n\nOn {report['prompts']} held-out prompts, "
            "the base model, this adapter and a control trained on the same pairs with their labels shuffled answered "
            f"with the same seeds ({report['decoding']}).\n\n" + markdown_table(rows) + "\n\nThe lexical score is a "
            f"bag-of-words preference model fitted on the training pairs; on held-out pairs it agrees with the raters "
            f"{fmt(judge['accuracy'])} of the time (pick-the-shorter: {fmt(judge['shorter_accuracy'])}). A significant "
            "difference supports \"answers moved toward features these raters preferred\", not \"more harmless\".\n"
            + (f"\nThe DPO doctor on these answers: {'; '.join(report.get('findings') or ['nothing found'])}.\n"
               if "findings" in report else ""))


def prompt_format_of(adapter_dir: str | Path, run_config: dict) -> str:
    """"text" (the Human/Assistant template) or "chat" (the model's own), from the folder itself: its saved chat
    template, else what its run_config.json says (Human/Assistant for a folder with neither)."""
    template = Path(adapter_dir) / "chat_template.jinja"
    if run_config.get("prompt_format") in ("text", "chat"):
        return run_config["prompt_format"]
    return "chat" if template.exists() and template.read_text() != HUMAN_ASSISTANT else "text"


def _usage_section(repo_id: str, base: str | None, prompt_format: str) -> str:
    if is_hub_id(base):
        code = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # loads {base} + this adapter\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        )
    else:  # the base is not on the Hub: rebuild it the way training did, then put the adapter on it
        code = (
            "from huggingface_hub import snapshot_download\nfrom peft import PeftModel\n"
            "from transformers import AutoTokenizer\nfrom dpo_pipeline.model import load_base_model\n\n"
            f'adapter = snapshot_download("{repo_id}")\n'
            f'model = PeftModel.from_pretrained(load_base_model("{base}"), adapter)\n'
            "tokenizer = AutoTokenizer.from_pretrained(adapter)\n"
        )
    code += (  # the chat template saved with the adapter is the training format
        f'\nmessages = [{{"role": "user", "content": "{PROMPT_EXAMPLE}"}}]\n'
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)\n"
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=True, top_p=0.9)\n"
        'reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)\n'
        + ('print(reply.split("\\n\\nHuman:")[0])  # stop where the model starts the next human turn\n'
           if prompt_format == "text" else "print(reply)\n")
    )
    return (f"## How to use\n\n```python\n{code}```\n\nOr chat with it, side by side with the base model: "
            f"`DPO_APP_ADAPTER={repo_id} streamlit run app/dpo_app.py` in the dpo_pipeline repo.\n")


def build_model_card(adapter_dir: str | Path, repo_id: str, *, sweep_rows: list[dict] | None = None,
                     base_eval: dict | None = None, dataset: str | None = None, license: str = "mit") -> ModelCard:
    """The card for the adapter in `adapter_dir` as it will live in `repo_id` (metadata + body)."""
    run = read_run(adapter_dir)
    config, record = run["run_config"], run["record"]
    base = base_model_of(run)
    data = dataset_of(run, dataset)
    prompt_format = prompt_format_of(adapter_dir, config)
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,  # the Hub links it; a local/offline base would not resolve
        library_name="peft",
        license=license,
        tags=list(TAGS) + (["4-bit", "bitsandbytes"] if config.get("load_in_4bit") else []),
        datasets=[data] if is_hub_id(data) else None,
        pipeline_tag="text-generation",
        model_name=repo_id.split("/")[-1],
    )
    if is_hub_id(base):
        about = f"a LoRA adapter for [`{base}`](https://huggingface.co/{base})"
    else:
        random_gpt2 = str(base).startswith(OFFLINE_PREFIX + "gpt2")
        about = (f"a LoRA adapter for `{base}`, a base model that is not on the Hub"
                 + (" (dpo_pipeline's offline GPT-2: the real tokenizer with random weights, so its generations "
                    "are noise; it proves the pipeline, not the science)" if random_gpt2 else ""))
    parts = [
        f"# {repo_id.split('/')[-1]}\n\nThis is {about}, preference-tuned with Direct Preference Optimization "
        "(TRL `DPOTrainer`, LoRA via peft"
        + (", 4-bit NF4 base via bitsandbytes" if config.get("load_in_4bit") else "") + ").\n",
        ("Prompt format (as in training, saved as the tokenizer's chat template): `\\n\\nHuman: <message>"
         "\\n\\nAssistant:`; the model answers after `Assistant:`.\n" if prompt_format == "text" else
         "Prompt format (as in training): the model's own chat template, saved with the adapter "
         "(`chat_template.jinja`); `tokenizer.apply_chat_template` renders it.\n"),
    ]
    if data:
        parts.append(f"Training data: `{data}`" + (f" ({record['train_pairs']} pairs)" if record.get("train_pairs")
                                                  else "") + ".\n")
    if config:
        rows = [{"setting": k, "value": v} for k, v in config.items() if k not in SKIP_CONFIG]
        for key in ("train_steps", "wall_time_s", "pairs_per_second"):
            if record.get(key) is not None:
                rows.append({"setting": key, "value": record[key]})
        parts.append("## Training configuration\n\n" + markdown_table(rows) + "\n")
    parts.append(_eval_section(record, base_eval, config.get("loss_type")))
    if (record.get("judged") or {}).get("n"):
        j = record["judged"]
        parts.append(
            f"## Judged answers against the base model\n\nOn {j['n']} prompts, answers of this adapter and of the base "
            f"model ({j.get('decoding', '')}) scored by the judge `{j.get('judge')}`: win rate **{fmt(j['win_rate'])}** "
            f"(95% CI {fmt(j['win_rate_ci'])}; {j['wins']} wins, {j['ties']} ties, {j['losses']} losses; a tie counts "
            f"half), length-matched win rate {fmt(j['length_matched']['win_rate'])} over "
            f"{j['length_matched']['n']} prompts, mean answer length {fmt(j['mean_length_policy'])} vs "
            f"{fmt(j['mean_length_base'])} tokens. The judge picks the chosen answer of held-out pairs "
            f"{fmt(j.get('judge_accuracy'))} of the time (pick-the-shorter: {fmt(j.get('judge_shorter_accuracy'))}).\n")
    parts.append(_behaviour_section(run["behaviour"]))
    if sweep_rows:
        shown = list(sweep_rows)[:MAX_SWEEP_ROWS]
        parts.append(f"## Sweep\n\nThe runs this adapter was picked from ({len(sweep_rows)}"
                     + (f", first {len(shown)} shown" if len(shown) < len(sweep_rows) else "")
                     + "; columns where they differ):\n\n" + sweep_table(shown) + "\n")
    parts.append(_usage_section(repo_id, base, prompt_format))
    body = "\n".join(p for p in parts if p)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
