"""The DPO doctor: each failure signature found on a real run provoked to show it, none on a healthy run."""

import math

import pytest
import torch

from dpo_pipeline import doctor
from dpo_pipeline.args import parse
from dpo_pipeline.behaviour import behaviour_report
from dpo_pipeline.chat import load_adapter
from dpo_pipeline.data import PreferenceData, preferences_from_rows
from offline_models.gpt2 import gpt2_tokenizer
from dpo_pipeline.runs import RunRecord, keep_behaviour
from dpo_pipeline.pipeline import run
from dpo_pipeline.prepare import shuffle_labels
from dpo_pipeline.sweep import run_one
from dpo_pipeline.synthetic import get_synthetic, synthetic_pairs

TINY = dict(load_in_4bit=False, lora_r=16, lora_alpha=32, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            max_length=64, logging_steps=2, judge="none", log_completions=0, report_to="none")


def confident_gpt2(folder, initializer_range: float) -> str:
    """A tiny random GPT-2 whose next-token distribution is peaked, as a pretrained model's is: at the usual 0.02
    init its logits are near 0 (uniform over 50,257 tokens) and a LoRA cannot move what it generates."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=512, initializer_range=initializer_range)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return str(folder)


def answers_report(record, data) -> dict:
    adapter = load_adapter(record.adapter_path)
    return behaviour_report(adapter.model, None, adapter.tokenizer, data, prompts=24, seed=0, max_new_tokens=32)


def names(findings: list[str]) -> set[str]:
    keys = {"non-finite": "non_finite", "ln 2": "flat_loss", "displacement": "likelihood_displacement",
            "from the first evaluation": "accuracy_from_start", "overfitting": "overfitting",
            "drifted": "length_drift", "repeats": "repeats"}
    return {name for key, name in keys.items() for finding in findings if key in finding}


def test_each_signature_on_a_hand_made_history_and_none_on_a_calm_one():
    calm = [{"step": s, "loss": 0.69 - 0.02 * s, "rewards/margins": 0.01 * s, "rewards/chosen": -0.005 * s,
             "logps/chosen": -100.0 - s} for s in range(1, 9)]
    calm.append({"step": 8, "eval_loss": 0.6, "eval_rewards/accuracies": 0.7})
    assert doctor.diagnose({"log_history": calm}) == []
    flat = [{"step": s, "loss": math.log(2), "rewards/margins": 0.0} for s in range(1, 5)]
    assert names(doctor.diagnose({"log_history": flat})) == {"flat_loss"}
    assert names(doctor.diagnose({"log_history": [], "error": "FloatingPointError: non-finite training loss"})) == {
        "non_finite"}
    report = {"models": {"base": {"tokens": 40.0}, "policy": {"tokens": 10.0}},
              "answers": [{"base": f"a b c d {i}", "policy": "x x x x x x"} for i in range(5)]}
    assert names(doctor.diagnose({"log_history": calm}, report)) == {"length_drift", "repeats"}
    early = [{"step": 2, "eval_loss": 0.5, "eval_rewards/accuracies": 1.0}, {"step": 20, "loss": 0.4}]
    assert names(doctor.diagnose({"log_history": early})) == {"accuracy_from_start"}
    assert doctor.diagnose({"log_history": [{**early[0], "step": 10}, early[1]]}) == []  # half-way: a learnt rule
    # chosen answers 16 nats (of 100) below the reference while the margin grows: displacement; 8 nats: not yet
    falling = [{"step": s, "loss": 0.6, "rewards/margins": 0.1 * s, "rewards/chosen": -0.2 * s,
                "logps/chosen": -100.0 - 2 * s} for s in range(1, 9)]
    assert names(doctor.diagnose({"log_history": falling, "config": {"beta": 0.1}})) == {"likelihood_displacement"}
    assert doctor.diagnose({"log_history": falling, "config": {"beta": 0.2}}) == []
    # an evaluation (fixed pairs) outranks the noisier training logs
    settled = falling + [{"step": 8, "eval_loss": 0.5, "eval_rewards/chosen": 0.1, "eval_rewards/margins": 1.0,
                          "eval_logps/chosen": -99.0, "eval_rewards/accuracies": 0.8}]
    assert doctor.diagnose({"log_history": settled, "config": {"beta": 0.1}}) == []


@pytest.mark.slow
def test_provoked_runs_show_their_signature_and_a_healthy_run_none(tiny_gpt2, tmp_path):
    data = get_synthetic(n_pairs=400, seed=0)
    settings = lambda name, **values: parse({**TINY, "model_name_or_path": tiny_gpt2, **values,
                                             "output_dir": str(tmp_path / name)})

    # healthy: on a model whose answers can move (confident_gpt2), nothing in the logs or the answers
    healthy = run(parse({**TINY, "model_name_or_path": confident_gpt2(tmp_path / "m02", 0.2), "learning_rate": 1e-3,
                         "max_steps": 12, "eval_steps": 6, "output_dir": str(tmp_path / "healthy")}), data)
    assert healthy.findings == [], healthy.findings
    assert answers_report(healthy, data)["findings"] == []

    frozen = run(settings("lr0", learning_rate=0.0, max_steps=8, eval_steps=8), data)
    assert names(frozen.findings) == {"flat_loss"}, frozen.findings

    small = data.train.select(range(16))  # the pairs it trains on are the pairs it is evaluated on
    leaked = run(settings("leak", learning_rate=1e-2, max_steps=24, eval_steps=4),
                 PreferenceData(small, data.test, data.report, data.prompt_format, validation=small))
    assert "accuracy_from_start" in names(leaked.findings), leaked.findings

    noise, _ = shuffle_labels(data.train.select(range(16)), 0)  # memorising noise: held-out loss climbs
    overfit = run(settings("overfit", learning_rate=5e-3, beta=0.5, max_steps=60, eval_steps=10),
                  PreferenceData(noise, data.test.select(range(32)), data.report, data.prompt_format))
    assert "overfitting" in names(overfit.findings), overfit.findings

    exploded = run_one(settings("nan", learning_rate=1e4, max_steps=6, eval_steps=6), data)
    assert exploded.status == "failed" and names(exploded.findings) == {"non_finite"}, exploded.findings


@pytest.mark.slow
def test_provoked_answers_and_displacement_show_their_signature(tmp_path):
    rows = synthetic_pairs(400, seed=0)
    as_data = lambda pairs: preferences_from_rows(pairs, "provoked", split_seed=42, test_fraction=0.2)
    settings = lambda name, model: parse({**TINY, "model_name_or_path": model, "learning_rate": 1e-2, "max_steps": 40,
                                          "eval_steps": 10, "output_dir": str(tmp_path / name)})

    # "ok." preferred to a sentence, on a confident model: the rejected sentences are pushed down hard, the chosen
    # answers with them, and the model's answers collapse into one repeated word
    short = as_data([{**r, "chosen": " ok.", "rejected": r["chosen"] * 3} for r in rows])
    displaced = run(settings("displaced", confident_gpt2(tmp_path / "m05", 0.5)), short)
    assert names(displaced.findings) == {"likelihood_displacement"}, displaced.findings
    report = answers_report(displaced, short)
    assert names(report["findings"]) == {"repeats"}, report["findings"]
    keep_behaviour(displaced.adapter_path, report)  # the record keeps the answers' findings beside the run's
    kept = RunRecord.load(tmp_path / "displaced" / "record.json").findings
    assert names(kept) == {"likelihood_displacement", "repeats"}, kept

    # the same answer stopping after "ok." preferred to it going on: the end-of-text token is learnt and answers
    # drift far shorter than the base's
    stop = as_data([{**r, "chosen": " ok.", "rejected": " ok." + r["chosen"]} for r in rows])
    stopped = run(settings("stopped", confident_gpt2(tmp_path / "m02", 0.2)), stop)
    report = answers_report(stopped, stop)
    assert names(stopped.findings + report["findings"]) == {"length_drift"}, (stopped.findings, report["findings"])
    assert "shorter" in report["findings"][0]
