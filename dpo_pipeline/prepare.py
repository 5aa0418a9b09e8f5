"""The data a run trains and is evaluated on: cleaned conversational pairs, tokenized by TRL's own DPOTrainer code
with the model's chat template, cleaned on those token ids for max_length, split into train / validation / test.
Shared by the run (pipeline.py), the sweep and the evaluation command (evaluate.py)."""

from __future__ import annotations

import copy
import random
from collections import OrderedDict
from types import SimpleNamespace

from . import model as model_lib
from .args import ConfigError, Settings
from .chat_template import format_name, with_prompt_format
from .data import CleaningReport, DataError, PreferenceData, load_preferences
from .synthetic import get_synthetic
from .trl_private import prepare_dpo_dataset

# what the prepared data depends on, with the model, max_length and truncation_mode
DATA_FIELDS = ("dataset_name", "data_dir", "max_pairs", "max_eval_pairs", "validation_pairs", "test_fraction",
               "split_seed", "prompt_format", "shuffled_labels")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_PREPARED: "OrderedDict[tuple, PreferenceData]" = OrderedDict()  # a sweep prepares each distinct data once


def tokenization_args(max_length: int | None, truncation_mode: str = "keep_start") -> SimpleNamespace:
    """What DPOTrainer._prepare_dataset reads of its DPOConfig (trl_private.py), without building one: a new
    DPOConfig resets accelerate's process-wide state, which a trainer alive in this process still uses."""
    return SimpleNamespace(max_length=max_length, truncation_mode=truncation_mode, dataset_num_proc=None)


def tokenize_pairs(pairs, tokenizer, args, name: str = "pairs"):
    """The pairs as TRL's DPOTrainer tokenizes them for `args` (max_length, truncation_mode), pairs whose prompt alone
    fills max_length dropped by TRL itself: its prompt_ids / chosen_ids / rejected_ids added to the conversational
    columns. The trainer then takes them as they are (refcache.CachedRefDPOTrainer)."""
    return prepare_dpo_dataset(SimpleNamespace(_tokenizer=tokenizer), pairs, tokenizer, args, name)


def clean_tokens(data: PreferenceData, tokenizer, args) -> PreferenceData:
    """Both splits tokenized as TRL does, dropping (and counting) what TRL drops and what cannot teach anything:
    pairs whose chosen and rejected are the same once TRL's collator keeps the first max_length tokens."""
    def differ(pair: dict) -> bool:
        chosen, rejected = (pair["prompt_ids"] + pair[f"{side}_ids"] for side in ("chosen", "rejected"))
        return chosen[:args.max_length] != rejected[:args.max_length]

    report, splits = copy.deepcopy(data.report), {}
    for name in ("train", "test"):
        pairs = getattr(data, name)
        require_pairs(report, name, len(pairs), len(pairs), args.max_length)  # TRL cannot tokenize none
        tokenized = tokenize_pairs(pairs, tokenizer, args, name)
        splits[name] = tokenized.filter(differ, desc=f"Identical after truncation ({name})")
        report.dropped["prompt_too_long"] += len(pairs) - len(tokenized)
        report.dropped["identical_after_truncation"] += len(tokenized) - len(splits[name])
        require_pairs(report, name, len(pairs), len(splits[name]), args.max_length)
    report.splits = {name: len(ds) for name, ds in splits.items()}
    return PreferenceData(splits["train"], splits["test"], report, format_name(tokenizer), data.validation)


def require_pairs(report: CleaningReport, split: str, before: int, after: int, max_length: int | None) -> None:
    """One line when a split has no pairs (`before`: from the cleaning; `after`: left by the tokens): a run trains on
    its train split and is evaluated on held-out pairs, and with none it would fail deep inside TRL."""
    if after:
        return
    if before:
        raise DataError(f"{report.source}: none of the {before} {split} pairs fits max_length {max_length} (the prompt "
                        "fills it, or both answers are the same within it); raise max_length")
    dropped = ", ".join(f"{count} {reason}" for reason, count in report.dropped.items() if count)
    raise DataError(f"{report.source}: no {split} pairs ({report.rows_read} rows read, {report.kept} kept"
                    f"{'; dropped: ' + dropped if dropped else ''}); use more pairs, or raise max_pairs"
                    + (" or test_fraction" if split == "test" else ""))


def shuffle_labels(pairs, seed: int):
    """The pairs with chosen and rejected (text and token ids) swapped in a seeded half of them, at random: the label
    control. Trained on these, a model learns whatever DPO on its data teaches without the raters' preferences."""
    flips = random.Random(seed).choices((False, True), k=len(pairs))
    names = [(a + suffix, b + suffix) for a, b in (("chosen", "rejected"), ("rejected", "chosen"))
             for suffix in ("", "_ids") if a + suffix in pairs.column_names]
    swap = lambda pair, i: {a: pair[b] for a, b in names} if flips[i] else {a: pair[a] for a, _ in names}
    return pairs.map(swap, with_indices=True, desc="Shuffling labels"), sum(flips)


def prepare_data(settings: Settings, tokenizer=None) -> PreferenceData:
    """Cleaned train/test (and validation) pairs for these settings, tokenized and cleaned for the model's chat
    template and the max_length TRL trains with. Memoized per distinct data settings in the process."""
    config, args, model = settings.run, settings.dpo, settings.model.model_name_or_path
    key = (model, args.max_length, args.truncation_mode, *(str(getattr(config, f)) for f in DATA_FIELDS))
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    tokenizer = with_prompt_format(tokenizer or model_lib.load_tokenizer(model), config.prompt_format)
    split = dict(split_seed=config.split_seed, test_fraction=config.test_fraction)
    if config.dataset_name == "synthetic":
        data = get_synthetic(n_pairs=config.max_pairs or 600, **split)
    else:
        data = load_preferences(config.dataset_name, data_dir=config.data_dir, max_pairs=config.max_pairs, **split)
    data = clean_tokens(data, tokenizer, args)
    splits = data.report.splits
    if config.max_eval_pairs is not None and len(data.test) > config.max_eval_pairs:
        data.test = data.test.select(range(config.max_eval_pairs))
        splits["test (evaluated)"] = config.max_eval_pairs
    if config.validation_pairs:  # settings are picked on these, never on the test split
        n = len(data.train) - config.validation_pairs
        if n < 1:
            raise ConfigError(f"validation_pairs {config.validation_pairs} leaves no training pairs: "
                              f"{config.dataset_name} has {len(data.train)} after cleaning; set validation_pairs "
                              "lower (0: none)")
        data.validation, data.train = data.train.select(range(n, len(data.train))), data.train.select(range(n))
        splits.update(train=n, validation=config.validation_pairs)
    if config.shuffled_labels:  # the training pairs only: every evaluation reads the real labels
        data.train, splits["train (sides swapped)"] = shuffle_labels(data.train, config.split_seed)
    _PREPARED[key] = data
    while len(_PREPARED) > 4:
        _PREPARED.popitem(last=False)
    return data
