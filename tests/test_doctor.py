"""The DPO doctor: each failure signature found on a real run provoked to show it, none on a healthy run."""

import math

import pytest

from dpo_pipeline import doctor
from dpo_pipeline.args import parse
from dpo_pipeline.behaviour import behaviour_report
from dpo_pipeline.chat import load_adapter
from dpo_pipeline.data import PreferenceData
from dpo_pipeline.pipeline import run
from dpo_pipeline.prepare import shuffle_labels
from dpo_pipeline.sweep import run_one
from dpo_pipeline.synthetic import get_synthetic

TINY = dict(load_in_4bit=False, lora_r=16, lora_alpha=32, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            max_length=64, logging_steps=2, judge="none", log_completions=0, report_to="none")


def names(findings: list[str]) -> set[str]:
    keys = {"non-finite": "non_finite", "ln 2": "flat_loss", "displacement": "likelihood_displacement",
            "from the first evaluation": "accuracy_from_start", "overfitting": "overfitting",
            "drifted": "length_drift", "repeats": "repeats"}
    return {name for key, name in keys.items() for finding in findings if key in finding}


def test_each_signature_on_a_hand_made_history_and_none_on_a_calm_one():
    calm = [{"step": s, "loss": 0.69 - 0.02 * s, "rewards/margins": 0.01 * s, "logps/chosen": -100.0 - s}
            for s in range(1, 9)] + [{"step": 8, "eval_loss": 0.6, "eval_rewards/accuracies": 0.7}]
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
    falling = [{"step": s, "loss": 0.6, "rewards/margins": 0.1 * s, "logps/chosen": -100.0 - 10 * s} for s in range(8)]
    assert names(doctor.diagnose({"log_history": falling})) == {"likelihood_displacement"}


@pytest.mark.slow
def test_provoked_runs_show_their_signature_and_a_healthy_run_none(tiny_gpt2, tmp_path):
    data = get_synthetic(n_pairs=400, seed=0)
    settings = lambda name, **values: parse({**TINY, "model_name_or_path": tiny_gpt2, **values,
                                             "output_dir": str(tmp_path / name)})

    healthy = run(settings("healthy", learning_rate=1e-3, max_steps=12, eval_steps=6), data)
    assert healthy.findings == [], healthy.findings

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
