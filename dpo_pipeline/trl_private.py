"""Every private TRL / transformers symbol this package uses, in one place: what it is, who uses it, and why no
public API does the job. tests/test_trl_private.py fails when the pinned version changes one of them."""

from __future__ import annotations

from trl import DPOTrainer

# DPOTrainer._prepare_dataset(self, dataset, processing_class, args, dataset_name): TRL's own tokenization of
# preference pairs (chat template, where the completion starts, the prompt_too_long filter). prepare.py runs it
# before training so that cleaning counts are taken on TRL's token ids, not on a second implementation of its rules;
# `self` is used only for its `_tokenizer` (the eos of text rows).
prepare_dpo_dataset = DPOTrainer._prepare_dataset
