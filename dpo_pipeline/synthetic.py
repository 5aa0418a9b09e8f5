"""A deterministic synthetic preference set with a rule a small model learns in minutes on a CPU: the chosen answer
is calm (lower case, a period), the rejected one shouts the same words (UPPER CASE, "!!!"). Prompts and wording vary,
so the model must learn the style, not memorise pairs: a correct pipeline reaches high held-out implicit-reward
accuracy, a broken one stays near chance.
"""

from __future__ import annotations

import random

from .data import PreferenceData, preferences_from_rows

PROMPTS = [
    "Tell me about {t}.", "What do you think of {t}?", "Can you describe {t} in a sentence?", "Why do people like {t}?",
    "Give me one fact about {t}.", "How would you explain {t} to a child?", "Is {t} a good topic for a talk?",
    "Write a short note on {t}.",
]
TOPICS = [
    "the ocean", "mountains", "coffee", "bicycles", "the moon", "gardening", "music", "winter", "libraries",
    "trains", "honey bees", "rain", "chess", "bread", "rivers", "clocks", "maps", "forests", "kites", "volcanoes",
    "the desert", "owls", "paper", "bridges", "lanterns", "islands", "tea", "snow", "wolves", "stars",
]
OPENINGS = ["i think", "it seems", "many people say", "in my view", "one could say", "it is true that"]
CLAIMS = [
    "{t} is worth a closer look", "{t} has a long history", "{t} can teach us patience",
    "{t} is often misunderstood", "{t} brings people together", "{t} changes with the seasons",
]


def synthetic_pairs(n_pairs: int = 600, seed: int = 0) -> list[dict]:
    """`n_pairs` plain prompt/chosen/rejected rows, the same for the same seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(t=topic)
        words = f"{rng.choice(OPENINGS)} {rng.choice(CLAIMS).format(t=topic)}"
        rows.append({"prompt": prompt, "chosen": f" {words.lower()}.", "rejected": f" {words.upper()}!!!"})
    return rows


def get_synthetic(n_pairs: int = 600, seed: int = 0, split_seed: int = 42,
                  test_fraction: float = 0.2) -> PreferenceData:
    """The synthetic pairs through the same conversion, cleaning (a few duplicates) and seeded split as real data."""
    return preferences_from_rows(synthetic_pairs(n_pairs, seed), "synthetic", split_seed=split_seed,
                                 test_fraction=test_fraction)
