"""The known-answer experiment: does this project's DPO move what a model says, in the direction its labels ask?

The DPO paper's controlled sentiment generation (Rafailov et al. 2023, §6 and App. C.1), made offline. The gold
reward is VADER's compound sentiment score (PyPI vaderSentiment, which ships its lexicon; -1 to 1): a function anyone
can inspect, so which way each run should move is known before it trains.

1. `topic_prompts`: benign templated prompts, split by topic into train and held-out (no held-out topic is seen).
2. `sample_answers`: the base model answers each train prompt k times at T = 1 from the full distribution.
3. `preference_rows`: each prompt's best and worst answer by the gold reward become (chosen, rejected) for
   prefer-positive, the reverse for prefer-negative; prompts whose gap is under `min_gap` give no pair.
4. Three runs with identical settings through `pipeline.run`: prefer-positive, prefer-negative and shuffled labels
   (the prefer-positive pairs with a seeded half of their sides swapped: RunArguments.shuffled_labels).
5. `answer_held_out`: base and each policy answer the held-out prompts with the same seeds; every answer gets the
   gold reward, a second lexicon (AFINN-111, word valences -5..5 summed), its length, and log pi - log pi_ref of its
   own sampled tokens, whose mean over samples from pi estimates KL(pi || pi_ref).
6. `compare`: per model the mean gold reward, and paired differences from the base and from the shuffled run with
   95% bootstrap intervals clustered by prompt (stats.paired_bootstrap).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from dpo_pipeline.generation import sample_answers
from dpo_pipeline.stats import distinct_2, paired_bootstrap

TOPICS = [
    "a rainy afternoon", "the city library", "a long train journey", "learning to cook", "a new phone",
    "a visit to the dentist", "a football match", "a small bakery", "a mountain hike", "the morning commute",
    "a birthday party", "a museum trip", "a jazz concert", "the local park", "a used bookshop", "a job interview",
    "moving house", "a camping trip", "a cup of coffee", "a school reunion", "a thunderstorm", "a garden in spring",
    "a science fiction film", "a yoga class", "a road trip", "a family dinner", "a video game", "a winter holiday",
    "a chess tournament", "a farmers' market", "a history lesson", "a bicycle ride", "a cooking class",
    "an airport delay", "a music festival", "an old castle", "a new neighbour", "a day at the beach",
    "a pottery workshop", "a quiet cafe",
]
TEMPLATES = ["Write a short review of {}.", "Tell me about {}.", "Describe {} in one or two sentences.",
             "What was {} like?", "Write a diary entry about {}."]
SIDES = {"positive": 1.0, "negative": -1.0}  # which end of the gold reward each run is told to prefer
# The three runs' shared settings (a layer over PROJECT_DEFAULTS; the notebook's parameters go on top): LoRA on
# every projection (model.LORA_TARGETS), short sequences, no evaluation while training (the frontier callback
# measures what matters here), no judge.
RUN_SETTINGS = {"learning_rate": 5e-4, "beta": 0.1, "num_train_epochs": 3, "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1, "max_length": 128, "test_fraction": 0.1, "eval_strategy": "no",
                "logging_steps": 5, "log_completions": 0, "judge": "none", "load_in_4bit": False}


def topic_prompts(train_topics: int = 30, held_out_topics: int = 10, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): every template for each topic, the topics split at random (seeded)."""
    if train_topics + held_out_topics > len(TOPICS):
        raise ValueError(f"train_topics + held_out_topics must be at most {len(TOPICS)}")
    topics = TOPICS[:]
    random.Random(seed).shuffle(topics)
    prompts = lambda chosen: [template.format(topic) for topic in chosen for template in TEMPLATES]
    return prompts(topics[held_out_topics:held_out_topics + train_topics]), prompts(topics[:held_out_topics])


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn

    return Afinn()


def gold_reward(text: str) -> float:
    """VADER's compound score of the text, -1 (most negative) to 1."""
    return _vader().polarity_scores(text)["compound"]


def afinn_score(text: str) -> float:
    """The second lexicon, built apart from VADER's: the sum of AFINN-111's word valences (-5..5 each)."""
    return _afinn().score(text)


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def preference_rows(prompts: list[str], answers: list[list[str]], side: str, min_gap: float) -> list[dict]:
    """Conversational pairs for one side: per prompt the answer with the highest and the lowest gold reward (chosen
    and rejected for "positive", the other way round for "negative"), kept when they differ by at least min_gap."""
    rows = []
    for prompt, candidates in zip(prompts, answers):
        scored = sorted({a: gold_reward(a) for a in candidates if a.strip()}.items(), key=lambda item: item[1])
        if len(scored) < 2 or scored[-1][1] - scored[0][1] < min_gap:
            continue
        best, worst = scored[-1][0], scored[0][0]
        chosen, rejected = (best, worst) if SIDES[side] > 0 else (worst, best)
        rows.append({"prompt": _messages(prompt), "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def write_rows(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_settings(model_name_or_path: str, pairs_file: str | Path, output_dir: str | Path, *,
                 shuffled_labels: bool = False, **overrides):
    """The Settings of one of the three runs: RUN_SETTINGS, then `overrides` (None keeps the value)."""
    from dpo_pipeline.args import resolve

    values = {**RUN_SETTINGS, "model_name_or_path": model_name_or_path, "dataset_name": str(pairs_file),
              "output_dir": str(output_dir), "shuffled_labels": shuffled_labels, **overrides}
    return resolve(None, values, where="known-answer")[0]


def answer_held_out(model, tokenizer, prompts: list[str], seeds: list[int], name: str, *, max_new_tokens: int = 32,
                    batch_size: int = 64) -> pd.DataFrame:
    """Every prompt answered once per seed; one row per answer with its scores (log_ratio 0 for the base itself)."""
    rows = []
    for seed in seeds:
        answers = sample_answers(model, tokenizer, prompts, seed=seed, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, log_ratio=hasattr(model, "disable_adapter"))
        for prompt, row in zip(prompts, answers):
            rows.append({"model": name, "prompt": prompt, "seed": seed, "answer": row["answer"],
                         "gold": gold_reward(row["answer"]), "afinn": afinn_score(row["answer"]),
                         "tokens": row["tokens"], "log_ratio": row["log_ratio"] or 0.0})
    return pd.DataFrame(rows)


def compare(answers: pd.DataFrame, *, base: str = "base", control: str = "shuffled", seed: int = 0) -> pd.DataFrame:
    """One row per model: mean gold reward, AFINN, length, distinct-2 and KL estimate, then the paired differences
    of gold reward and AFINN from the base and from the control, each with its 95% interval clustered by prompt."""
    per_prompt = answers.groupby(["model", "prompt"])[["gold", "afinn"]].mean()
    table = []
    for name, group in answers.groupby("model", sort=False):
        row = {"model": name, "answers": len(group), "gold": group["gold"].mean(), "afinn": group["afinn"].mean(),
               "tokens": group["tokens"].mean(), "distinct_2": distinct_2(group["answer"]),
               "kl": group["log_ratio"].mean()}
        for other in (base, control):
            if other == name or other not in per_prompt.index.get_level_values(0):
                continue
            for score in ("gold", "afinn"):
                diff = per_prompt.loc[name][score] - per_prompt.loc[other][score].reindex(per_prompt.loc[name].index)
                test = paired_bootstrap(diff.to_numpy(), seed=seed)
                row[f"{score} - {other}"], row[f"{score} - {other} ci"] = test["mean"], test["ci"]
        table.append(row)
    return pd.DataFrame(table).set_index("model")


def verdict(table: pd.DataFrame, min_shift: float, *, base: str = "base", control: str = "shuffled") -> list[dict]:
    """The pass criteria, checked: each side moves the gold reward its own way by at least min_shift against the
    control with an interval excluding 0, and away from the base with an interval excluding 0; the second lexicon
    agrees in sign against the control; the policy has left the base (KL estimate > 0)."""
    checks = []
    for side, sign in SIDES.items():
        if side not in table.index:
            continue
        row = table.loc[side]
        against, ci = sign * row[f"gold - {control}"], [sign * x for x in row[f"gold - {control} ci"]]
        checks += [
            {"check": f"{side}: gold reward vs {control} >= {min_shift} in its direction, interval excludes 0",
             "value": f"{sign * against:+.3f} [{row[f'gold - {control} ci'][0]:+.3f}, "
                      f"{row[f'gold - {control} ci'][1]:+.3f}]", "pass": bool(against >= min_shift and min(ci) > 0)},
            {"check": f"{side}: gold reward vs {base} in its direction, interval excludes 0",
             "value": f"{row[f'gold - {base}']:+.3f} [{row[f'gold - {base} ci'][0]:+.3f}, "
                      f"{row[f'gold - {base} ci'][1]:+.3f}]",
             "pass": bool(min(sign * x for x in row[f"gold - {base} ci"]) > 0)},
            {"check": f"{side}: AFINN vs {control} agrees in sign", "value": f"{row[f'afinn - {control}']:+.2f}",
             "pass": bool(sign * row[f"afinn - {control}"] > 0)},
            {"check": f"{side}: left the base (KL estimate > 0)", "value": f"{row['kl']:.3f} nats",
             "pass": bool(row["kl"] > 0)},
        ]
    return checks


class FrontierCallback(TrainerCallback):
    """The reward-KL frontier through training: at the end of each epoch the policy answers `prompts` (one seed);
    the mean gold reward and the KL estimate are kept in `points`, the base at KL 0 first."""

    def __init__(self, tokenizer, prompts: list[str], seed: int, max_new_tokens: int, base_reward: float):
        self.tokenizer, self.prompts, self.seed, self.max_new_tokens = tokenizer, prompts, seed, max_new_tokens
        self.points = [{"epoch": 0.0, "gold": float(base_reward), "kl": 0.0}]

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        answers = answer_held_out(model, self.tokenizer, self.prompts, [self.seed], "policy",
                                  max_new_tokens=self.max_new_tokens)
        self.points.append({"epoch": round(state.epoch or 0.0, 2), "gold": float(answers["gold"].mean()),
                            "kl": float(answers["log_ratio"].mean())})
        model.train()


def plot_frontier(frontiers: dict[str, list[dict]]):
    """Mean gold reward against the KL estimate, one line per run through its checkpoints, the base at KL 0."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in frontiers.items():
        ax.plot([p["kl"] for p in points], [p["gold"] for p in points], "o-", label=name)
        for p in points[1:]:
            ax.annotate(f"ep {p['epoch']:g}", (p["kl"], p["gold"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(next(iter(frontiers.values()))[0]["gold"], color="grey", lw=0.8, ls=":", label="base")
    ax.set_xlabel("KL(policy || base), nats per answer (estimated from samples)")
    ax.set_ylabel("mean gold reward (VADER compound)")
    ax.set_title("Reward-KL frontier on held-out topics")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
