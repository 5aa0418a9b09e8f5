"""A DPO doctor: the failure signatures users ask about most (TRL, LLaMA-Factory, axolotl, OpenRLHF, the DPO
reference repo), read from a finished run's log history, evaluations and answers. Each finding is one line: what
was seen, its likely cause, what to try. `diagnose` reads a record (and, when there is one, the behaviour report);
pipeline.run keeps the findings in the record and in TensorBoard, the workbook has them as a column of the Runs
sheet, and the notebook prints them.
"""

from __future__ import annotations

import math

from .stats import distinct_2

LN2 = math.log(2)  # DPO's loss when chosen and rejected get the same implicit reward


def _train(history: list[dict]) -> list[dict]:
    return [e for e in history if "loss" in e and "eval_loss" not in e]


def _evals(history: list[dict]) -> list[dict]:
    return [e for e in history if "eval_loss" in e]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def non_finite(history: list[dict], error: str | None) -> str | None:
    bad = next((e for e in history for k, v in e.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad is None and "non-finite" not in (error or ""):
        return None
    where = f"at step {bad.get('step')}" if bad else "(the run stopped)"
    return (f"non-finite values {where}: likely a learning rate too high or fp16 overflow; try a 3-10x lower "
            "learning_rate, bf16 instead of fp16, or max_grad_norm 1.0")


def flat_loss(history: list[dict]) -> str | None:
    train = _train(history)
    if len(train) < 3 or not all(abs(e["loss"] - LN2) < 0.005 for e in train):
        return None
    if any(abs(e.get("rewards/margins", 0.0)) > 1e-3 for e in train):
        return None
    return ("loss flat at ln 2 (0.693) with rewards at 0: the adapter is not training; likely learning_rate or beta "
            "is 0, or no weight is trainable; try learning_rate 5e-5 to 5e-4 for LoRA and check the trainable count")


def likelihood_displacement(history: list[dict], beta: float) -> str | None:
    """The chosen answers lost at least a tenth of their log-probability against the reference while the margin
    grew. Read from the last evaluation (fixed pairs), else the last quarter of the training logs: TRL's
    rewards/chosen is beta * (log pi - log pi_ref) on the same answers, so it is paired with the reference, unlike
    logps/chosen, which moves with whatever pairs a batch holds."""
    if beta <= 0:
        return None
    evals = [e for e in _evals(history) if "eval_rewards/chosen" in e and "eval_logps/chosen" in e]
    train = [e for e in _train(history) if "rewards/chosen" in e and "logps/chosen" in e]
    if evals:
        last = evals[-1]
        reward, margin, logps = last["eval_rewards/chosen"], last["eval_rewards/margins"], last["eval_logps/chosen"]
    elif len(train) >= 4:
        window = train[-(len(train) // 4):]
        reward, margin, logps = (_mean([e[k] for e in window]) for k in ("rewards/chosen", "rewards/margins",
                                                                          "logps/chosen"))
    else:
        return None
    fell = -reward / beta  # nats the chosen answers lost against the reference
    reference = logps + fell  # the chosen answers' log-probability under the reference
    if margin <= 0 or fell <= 0.1 * abs(reference):
        return None
    return (f"chosen log-probs fell {fell:.1f} nats below the reference ({fell / abs(reference):.0%}) while the margin "
            f"grew to {margin / beta:.1f} nats: likelihood displacement (both answers pushed down, the rejected "
            "faster, probability going to answers in neither); if the answers got worse, try a lower learning_rate, "
            "a larger beta, loss_type 'ipo', or rpo_alpha (adds an NLL term on the chosen answers)")


def accuracy_from_start(history: list[dict]) -> str | None:
    """Accuracy 1.0 at a first evaluation made in the first fifth of the run (later, a learnable rule gets there)."""
    evals, last = _evals(history), max((e.get("step", 0) for e in history), default=0)
    if not evals or evals[0].get("eval_rewards/accuracies") != 1.0 or evals[0].get("step", 0) > 0.2 * last:
        return None
    return (f"reward accuracy 1.0 from the first evaluation (step {evals[0].get('step')}): the pairs are trivially "
            "separable or the evaluation pairs leaked into training; check the split for shared pairs and what tells "
            "chosen from rejected")


def overfitting(history: list[dict]) -> str | None:
    """The last eval loss 0.05 above the best one, while the train loss after the best step is lower on average than
    before it (train losses are noisy: means of the logged values, not single points)."""
    evals = _evals(history)
    if len(evals) < 3:
        return None
    best = min(evals, key=lambda e: e["eval_loss"])
    train = _train(history)
    before = [e["loss"] for e in train if e["step"] <= best["step"]]
    after = [e["loss"] for e in train if e["step"] > best["step"]]
    if evals[-1]["eval_loss"] < best["eval_loss"] + 0.05 or not before or not after or _mean(after) >= _mean(before):
        return None
    return (f"eval loss rising ({best['eval_loss']:.3f} at step {best['step']} -> {evals[-1]['eval_loss']:.3f}) while "
            f"train loss falls: overfitting; try fewer steps (the best was step {best['step']}), a lower "
            "learning_rate or more pairs")


def answers_drift(behaviour: dict | None) -> list[str]:
    """Answers much longer or shorter than the base's (x1.5 either way), or far more repetitive (distinct-2)."""
    if not behaviour or "policy" not in behaviour.get("models", {}):
        return []
    found = []
    policy, base = behaviour["models"]["policy"]["tokens"], behaviour["models"]["base"]["tokens"]
    if base > 0 and not 1 / 1.5 <= policy / base <= 1.5:
        found.append(f"answers drifted {'longer' if policy > base else 'shorter'} than the base's ({policy:.0f} vs "
                     f"{base:.0f} tokens): the pairs' length difference is being learned; try a lower learning_rate "
                     "or beta higher, or pairs matched in length")
    answers = behaviour.get("answers") or []
    if answers:
        d_policy, d_base = (distinct_2([a[name] for a in answers]) for name in ("policy", "base"))
        if d_policy < 0.5 and d_policy < d_base - 0.15:
            found.append(f"answers degenerate into repeats (distinct-2 {d_policy:.2f} vs the base's {d_base:.2f}): "
                         "the policy moved far from the base; try a larger beta or fewer steps")
    return found


def diagnose(record: dict, behaviour: dict | None = None) -> list[str]:
    """Every signature found in a run's record (and its behaviour report), as one-line findings; [] when none."""
    history, beta = record.get("log_history") or [], float((record.get("config") or {}).get("beta", 0.1))
    checks = [non_finite(history, record.get("error")), flat_loss(history), likelihood_displacement(history, beta),
              accuracy_from_start(history), overfitting(history)]
    return [finding for finding in checks if finding] + answers_drift(behaviour)
