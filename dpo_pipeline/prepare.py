"""The data a run trains and is evaluated on: cleaned pairs in the model's prompt format, cleaned at the token level
for its tokenizer and max_length, split into train / validation / test. Shared by the run (pipeline.py), the
sweep and the evaluation command (evaluate.py)."""

from __future__ import annotations

from collections import OrderedDict

from . import model as model_lib
from .args import ConfigError, Settings
from .data import PreferenceData, drop_truncation_ties, load_preferences, resolve_prompt_format, to_chat_template
from .synthetic import get_synthetic

DATA_FIELDS = ("model_name_or_path", "dataset_name", "data_dir", "max_pairs", "max_eval_pairs", "validation_pairs",
               "test_fraction", "split_seed", "prompt_format", "max_length")  # what the prepared data depends on
_PREPARED: "OrderedDict[tuple, PreferenceData]" = OrderedDict()  # a sweep prepares each distinct data once


def prepare_data(settings: Settings, tokenizer=None) -> PreferenceData:
    """Cleaned train/test (and validation) pairs for these settings, in the model's prompt format, with the
    token-level cleaning for its tokenizer and the max_length TRL trains with. Memoized per distinct DATA_FIELDS in
    the process."""
    config, max_length = settings.run, settings.dpo.max_length
    model = settings.model.model_name_or_path
    key = (model, max_length, *(str(getattr(config, f)) for f in DATA_FIELDS[1:-1]))
    if key in _PREPARED:
        _PREPARED.move_to_end(key)
        return _PREPARED[key]
    tokenizer = tokenizer or model_lib.load_tokenizer(model)
    if config.dataset_name == "synthetic":
        data = get_synthetic(n_pairs=config.max_pairs or 600, split_seed=config.split_seed,
                             test_fraction=config.test_fraction)
    else:
        data = load_preferences(config.dataset_name, data_dir=config.data_dir, split_seed=config.split_seed,
                                test_fraction=config.test_fraction, max_pairs=config.max_pairs)
    if resolve_prompt_format(config.prompt_format, tokenizer) == "chat":
        data = to_chat_template(data, tokenizer)
    data = drop_truncation_ties(data, tokenizer, max_length)
    if config.max_eval_pairs is not None and len(data.test) > config.max_eval_pairs:
        data.test = data.test.select(range(config.max_eval_pairs))
        data.report.splits["test (evaluated)"] = config.max_eval_pairs
    if config.validation_pairs:  # settings are picked on these, never on the test split
        n = len(data.train) - config.validation_pairs
        if n < 1:
            raise ConfigError(f"validation_pairs {config.validation_pairs} leaves no training pairs: {config.dataset_name} "
                              f"has {len(data.train)} after cleaning; set validation_pairs lower (0: none)")
        data.validation, data.train = data.train.select(range(n, len(data.train))), data.train.select(range(n))
        data.report.splits.update({"train": len(data.train), "validation": len(data.validation)})
    _PREPARED[key] = data
    while len(_PREPARED) > 4:
        _PREPARED.popitem(last=False)
    return data
