"""Every private name of TRL, transformers (and argparse, through TRL's parser) the package uses, and the public hooks
whose signature it relies on, in one table: where and why it is used, and what is relied on (a method's parameters, a
value's type, text the library's own code must still contain). Pinned: trl 1.16.0, transformers 5.x.
tests/test_trl_private.py fails on an upgrade that renames, removes or re-signs one (`problems()`), and when the
package starts using a private name of theirs that is not in the table.
"""

from __future__ import annotations

import inspect
import pkgutil
from typing import NamedTuple

from trl import DPOTrainer

PINNED_TRL = "1.16.0"


class Private(NamedTuple):
    owner: str  # the module or class that holds it, dotted
    name: str
    used_in: str
    why: str
    params: tuple[str, ...] | None = None  # a method's or function's parameters, as the package calls or overrides it
    kind: type | None = None  # the type of the value (a module global) or of the class attribute (a property)
    source: tuple[str, str] | None = None  # (function, text): the library's function still contains the text


TABLE = (
    Private("trl.DPOTrainer", "_prepare_dataset", "trl_private.prepare_dpo_dataset (calls it for prepare.py), "
            "refcache.CachedRefDPOTrainer (overrides: tokenized pairs are not tokenized again)",
            "TRL's own tokenization of preference pairs (chat template, where the completion starts, the "
            "prompt_too_long filter): cleaning counts are taken on its token ids, not on a second implementation; "
            "of `self` it reads only _tokenizer, of `args` max_length, truncation_mode and dataset_num_proc "
            "(prepare.tokenization_args)",
            params=("self", "dataset", "processing_class", "args", "dataset_name"),
            source=("trl.DPOTrainer._prepare_dataset", "self._tokenizer.eos_token")),
    Private("trl.DPOTrainer", "_precompute_ref_logps", "refcache.CachedRefDPOTrainer, speed.trainer (overrides)",
            "TRL's __init__ calls it to add the reference columns: the override reads and writes the disk cache",
            params=("self", "dataset", "name", "batch_size"),
            source=("trl.DPOTrainer.__init__", "_precompute_ref_logps(")),
    Private("trl.trainer.utils", "_use_triton", "speed.trainer.lean_lm_head (patched while a forward runs)",
            "where it says yes, TRL's fused LM head projects only the positions that have a label", params=("device",),
            source=("trl.trainer.utils.add_fused_lm_head", "_use_triton(")),
    Private("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE", "speed.trainer.lean_lm_head (patched)",
            "the vocabulary tile of TRL's fused LM head: narrower on a CPU, for smaller temporaries", kind=int),
    Private("trl.DPOTrainer", "_metrics", "speed.trainer.SpeedDPOTrainer.training_step",
            "TRL's per-forward metrics, merged into one entry per step when micro_batch_tokens splits a step",
            source=("trl.DPOTrainer.__init__", 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(')),
    Private("transformers.Trainer", "_track_num_input_tokens", "speed.trainer (overrides)",
            "counts the input tokens of each chunk of a step split by micro_batch_tokens", params=("self", "inputs")),
    Private("transformers.PreTrainedConfig", "_attn_implementation", "speed.packing.add_packed_forward, "
            "evaluate.pair_logps", "the attention kernel: the packed 4-D mask needs sdpa or eager", kind=property),
    Private("trl.trainer.callbacks.LogCompletionsCallback", "_last_logged_step", "tracking.CompletionsCallback",
            "TRL's 'answered at this step already' check, made before the model is switched to eval",
            source=("trl.trainer.callbacks.LogCompletionsCallback.__init__", "self._last_logged_step = -1")),
    Private("argparse.ArgumentParser", "_actions", "cli.parse_command_line (TRL's TrlParser)",
            "unset flags default to None, so a recipe's value is kept",
            source=("argparse._ActionsContainer.__init__", "self._actions = []")),
    # public names, but hooks whose parameters or internals the package relies on
    Private("trl.DPOTrainer", "compute_ref_log_probs", "refcache._compute_ref_logps (calls), speed.trainer (overrides)",
            "the reference forward of one batch", params=("self", "model", "inputs")),
    Private("trl.DPOTrainer", "compute_loss", "speed.trainer (overrides: the CPU LM head)", "the policy forward",
            params=("self", "model", "inputs", "return_outputs", "num_items_in_batch")),
    Private("transformers.Trainer", "training_step", "speed.trainer (overrides)",
            "a step's loss is divided by current_gradient_accumulation_steps, which the override sets per chunk",
            params=("self", "model", "inputs", "num_items_in_batch"),
            source=("transformers.Trainer.training_step", "loss / self.current_gradient_accumulation_steps")),
    Private("transformers.Trainer", "get_train_dataloader", "speed.trainer (overrides)",
            "the loader collates with self.data_collator, which the override swaps for the token-budget one",
            params=("self",), source=("transformers.Trainer._get_dataloader", "self.data_collator")),
    Private("transformers.Trainer", "floating_point_ops", "speed.trainer (overrides)", "total_flos over chunks",
            params=("self", "inputs")),
    Private("trl.trainer.utils", "FusedCausalLMOutput", "speed.packing.add_packed_forward",
            "the packed forward returns TRL's per-token fields in this class", kind=type),
)


def problems(table=TABLE) -> list[str]:
    """One line per row the installed libraries no longer satisfy (empty: all of them hold)."""
    found = []
    for row in table:
        label = f"{row.owner}.{row.name} (used in {row.used_in})"
        try:
            owner = pkgutil.resolve_name(row.owner)
            if row.params is not None:
                params = tuple(inspect.signature(getattr(owner, row.name)).parameters)
                if params != row.params:
                    found.append(f"{label}: parameters {params}, the package relies on {row.params}")
            if row.kind is not None and not isinstance(value := inspect.getattr_static(owner, row.name), row.kind):
                found.append(f"{label}: a {type(value).__name__}, the package relies on a {row.kind.__name__}")
            if row.source and row.source[1] not in inspect.getsource(pkgutil.resolve_name(row.source[0])):
                found.append(f"{label}: {row.source[0]} no longer contains {row.source[1]!r}")
        except (AttributeError, ImportError) as err:
            found.append(f"{label}: gone ({err})")
    return found


def prepare_dpo_dataset(stub, dataset, processing_class, args, dataset_name: str):
    """DPOTrainer._prepare_dataset without a trainer: `stub` stands for `self`, which the method reads only for its
    `_tokenizer` (the eos it appends to text rows)."""
    return DPOTrainer._prepare_dataset(stub, dataset, processing_class, args, dataset_name)
