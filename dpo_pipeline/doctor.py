"""A DPO doctor: the failure signatures users ask about most (TRL, LLaMA-Factory, axolotl, OpenRLHF, the DPO
reference repo), read from a finished run's log history, evaluations and answers. Each finding is one line: what
was seen, its likely cause, what to try. The record keeps them; the workbook, TensorBoard and the notebook show them.
"""

from __future__ import annotations

import math
from statistics import fmean

from .stats import distinct_2

LN2 = math.log(2)  # DPO's loss when chosen and rejected get the same implicit reward


def non_finite(history: list[dict], error: str | None) -> str | None:
    bad = next((e for e in history for k, v in e.items() if isinstance(v, float) and not math.isfinite(v)), None)
    where = f"at step {bad.get('step')}" if bad else "(the run stopped)"
    if bad or "non-finite" in (error or ""):
        return (f"non-finite values {where}: likely a learning rate too high or fp16 overflow; try a 3-10x lower "
                "learning_rate, bf16 instead of fp16, or max_grad_norm 1.0")


def flat_loss(train: list[dict]) -> str | None:
    flat = len(train) >= 3 and all(abs(e["loss"] - LN2) < 0.005 for e in train)
    if flat and not any(abs(e.get("rewards/margins", 0.0)) > 1e-3 for e in train):
        return ("loss flat at ln 2 (0.693) with rewards at 0: the adapter is not training; likely learning_rate or "
                "beta is 0, or no weight is trainable; try learning_rate 5e-5 to 5e-4 for LoRA and check the "
                "trainable count")


def likelihood_displacement(train: list[dict], evals: list[dict], beta: float) -> str | None:
    """The chosen answers lost at least a tenth of their log-probability against the reference while the margin
    grew. Read from the last evaluation (fixed pairs), else the last quarter of the training logs: TRL's
    rewards/chosen is paired with the reference on the same answers, unlike logps/chosen, which moves with whatever
    pairs a batch holds."""
    evals = [e for e in evals if "eval_rewards/chosen" in e and "eval_logps/chosen" in e]
    train = [e for e in train if "rewards/chosen" in e and "logps/chosen" in e]
    if beta <= 0 or (not evals and len(train) < 4):
        return None
    keys = ("rewards/chosen", "rewards/margins", "logps/chosen")
    if evals:
        reward, margin, logps = (evals[-1][f"eval_{k}"] for k in keys)
    else:
        reward, margin, logps = (fmean(e[k] for e in train[-(len(train) // 4):]) for k in keys)
    fell = -reward / beta  # nats the chosen answers lost against the reference
    reference = logps + fell  # the chosen answers' log-probability under the reference
    if margin <= 0 or fell <= 0.1 * abs(reference):
        return None
    return (f"chosen log-probs fell {fell:.1f} nats below the reference ({fell / abs(reference):.0%}) while the margin "
            f"grew to {margin / beta:.1f} nats: likelihood displacement (both answers pushed down, the rejected "
            "faster, probability going to answers in neither); if the answers got worse, try a lower learning_rate, "
            "a larger beta, loss_type 'ipo', or rpo_alpha (adds an NLL term on the chosen answers)")


def accuracy_from_start(evals: list[dict], last_step: int) -> str | None:
    """Accuracy 1.0 at a first evaluation made in the first fifth of the run (later, a learnable rule gets there)."""
    if evals and evals[0].get("eval_rewards/accuracies") == 1.0 and evals[0].get("step", 0) <= 0.2 * last_step:
        return (f"reward accuracy 1.0 from the first evaluation (step {evals[0].get('step')}): the pairs are trivially "
                "separable or the evaluation pairs leaked into training; check the split for shared pairs and what "
                "tells chosen from rejected")


def overfitting(train: list[dict], evals: list[dict]) -> str | None:
    """The last eval loss 0.05 above the best one, while the train loss after the best step is lower on average than
    before it (train losses are noisy: means of the logged values, not single points)."""
    if len(evals) < 3:
        return None
    best = min(evals, key=lambda e: e["eval_loss"])
    before = [e["loss"] for e in train if e["step"] <= best["step"]]
    after = [e["loss"] for e in train if e["step"] > best["step"]]
    if evals[-1]["eval_loss"] < best["eval_loss"] + 0.05 or not before or not after or fmean(after) >= fmean(before):
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
    answers = behaviour.get("answers") or []  # none: distinct-2 is 1.0 for both
    d_policy, d_base = (distinct_2([a[name] for a in answers]) for name in ("policy", "base"))
    if d_policy < 0.5 and d_policy < d_base - 0.15:
        found.append(f"answers degenerate into repeats (distinct-2 {d_policy:.2f} vs the base's {d_base:.2f}): "
                     "the policy moved far from the base; try a larger beta or fewer steps")
    return found


def diagnose(record: dict, behaviour: dict | None = None) -> list[str]:
    """Every signature found in a run's record (and its behaviour report), as one-line findings; [] when none."""
    history, beta = record.get("log_history") or [], float((record.get("config") or {}).get("beta", 0.1))
    train = [e for e in history if "loss" in e and "eval_loss" not in e]
    evals = [e for e in history if "eval_loss" in e]
    last_step = max((e.get("step", 0) for e in history), default=0)
    checks = [non_finite(history, record.get("error")), flat_loss(train), likelihood_displacement(train, evals, beta),
              accuracy_from_start(evals, last_step), overfitting(train, evals)]
    return [finding for finding in checks if finding] + answers_drift(behaviour)
