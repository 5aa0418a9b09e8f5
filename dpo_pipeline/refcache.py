"""Reference log-probs computed once and kept on disk, shared by every run of a sweep and by resumed runs.

DPO compares the policy with a frozen reference. With a LoRA adapter the reference is the base model with the
adapter disabled, so its log-probs of each pair's chosen and rejected completions depend only on

    the base model weights (LoRA weights excluded: lora_r, seed, learning rate, beta ... do not matter),
    the tokenized pairs (prompt_ids / chosen_ids / rejected_ids, in order),
    max_length and truncation_mode, ld_alpha,
    the precision (weight dtype, 4-bit quantization settings, bf16/fp16 autocast) and the device type.

`CachedRefDPOTrainer` hashes those into a key and keeps the values in
``<DPO_REF_CACHE or model.cache_dir()/ref_logps>/<key>.safetensors``: a hit loads two float vectors instead of a
forward pass over the whole split; a miss computes them (TRL's own `compute_ref_log_probs`, batches sorted by length
so little is padded) and writes the file atomically (temp file + rename), so sweep processes sharing the folder never
read half a file. Any change to a key part is a new key, i.e. a miss: stale values are never reused.

The trainer also makes `train_sampling_strategy="group_by_length"` work with TRL: TRL drops every column but the
token ids before the sampler is built and its datasets have no `input_ids` to infer lengths from, so it adds a
`length` column (the padded width the pair will need) and keeps it through the column filter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from trl import DPOTrainer

from . import model as model_lib

CACHE_FORMAT = 1  # bump when what is stored, or how it is computed, changes
LENGTH_COLUMN = "length"
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")

try:  # xxh3 hashes ~500 MB of fp32 weights in ~0.03 s here (sha256: ~0.5 s); xxhash comes with `datasets`
    import xxhash

    def _content_hasher():
        return xxhash.xxh3_128()
except ImportError:  # pragma: no cover
    def _content_hasher():
        return hashlib.sha256()


def default_ref_cache_dir() -> Path:
    """Where reference log-probs are kept (override with DPO_REF_CACHE)."""
    return Path(os.environ.get("DPO_REF_CACHE", model_lib.cache_dir() / "ref_logps"))


# ---------------------------------------------------------------- fingerprints


def _canonical_name(name: str) -> str:
    """The base weight's own name, whatever PEFT wrapped around it (so lora_targets do not change the key)."""
    for prefix in ("base_model.model.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".")


def _is_adapter_tensor(name: str, keep_adapter: str | None) -> bool:
    if "lora_" not in name and "modules_to_save" not in name:
        return False
    return not (keep_adapter and f".{keep_adapter}." in name)  # TRL's reference may be a "ref" adapter


def base_model_fingerprint(model) -> str:
    """A content hash of the weights the reference uses: every base tensor, no trainable LoRA tensor.

    Tied tensors (GPT-2's wte and lm_head) are hashed once. Cost: ~0.03 s for GPT-2 124M in fp32 on a CPU.
    """
    peft_configs = getattr(model, "peft_config", None) or {}
    keep = "ref" if "ref" in peft_configs else None
    h = _content_hasher()
    seen: dict[tuple, str] = {}
    items = sorted((_canonical_name(n), t) for n, t in model.state_dict().items() if not _is_adapter_tensor(n, keep))
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        ident = (tensor.device.type, tensor.data_ptr(), tensor.numel(), tensor.dtype, tuple(tensor.stride()))
        if tensor.numel() and ident in seen:
            h.update(f"tied:{seen[ident]}".encode())
            continue
        seen[ident] = name
        if tensor.numel():
            h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def token_fingerprint(dataset: Dataset) -> str:
    """A content hash of the tokenized pairs, in row order (the stored values follow that order)."""
    table = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")[:]  # honours select()/filter() indices
    h = _content_hasher()
    h.update(f"rows={table.num_rows}".encode())
    for name in TOKEN_COLUMNS:
        column = table.column(name).combine_chunks()
        lengths = np.asarray(column.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
        h.update(name.encode())
        h.update(lengths.tobytes())
        h.update(values.tobytes())
    return h.hexdigest()


def _precision(model, args) -> dict:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    quant = {k: str(v) for k, v in sorted((quant or {}).items()) if not k.startswith("_")}
    autocast = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    return {"param_dtype": str(param.dtype) if param is not None else None, "autocast": autocast,
            "quantization": quant}


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------- the file


def save_ref_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, parts: dict) -> None:
    """Write atomically: another process sees the old state or the whole file, never a partial one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"ref_chosen_logps": chosen.float().contiguous(), "ref_rejected_logps": rejected.float().contiguous()},
              str(tmp), metadata={"key_parts": json.dumps(parts, sort_keys=True, default=str)})
    os.replace(tmp, path)


def load_ref_logps(path: Path, parts: dict, n_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored values, or None when the file is missing, unreadable or was made for something else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key_parts", "null"))
            chosen, rejected = f.get_tensor("ref_chosen_logps"), f.get_tensor("ref_rejected_logps")
    except Exception:  # noqa: BLE001 - a bad cache file is a miss, never a failed run
        return None
    if stored != json.loads(json.dumps(parts, sort_keys=True, default=str)) or len(chosen) != n_rows \
            or len(rejected) != n_rows:
        return None
    return chosen, rejected


# ---------------------------------------------------------------- the trainer


class CachedRefDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with reference log-probs cached on disk, and working length-grouped batches.

    `ref_cache_dir`: where the cache files live (default: `default_ref_cache_dir()`). After construction,
    `ref_cache_events` lists what happened per split: hit or miss, key, pairs, seconds.
    """

    def __init__(self, model, ref_model=None, args=None, *more, ref_cache_dir: str | Path | None = None, **kwargs):
        self.ref_cache_path = Path(ref_cache_dir) if ref_cache_dir else default_ref_cache_dir()
        self.ref_cache_events: list[dict] = []
        self._ref_base_fingerprint: str | None = None
        # TRL hashes the whole model at construction (0.9 s for 124M, LoRA included) to key a cache that lives in a
        # temp dir. When the reference needs no model of its own (an adapter to disable, or an explicit ref_model),
        # let TRL build the trainer without the precompute, then do it here with our cheap LoRA-free fingerprint.
        peft = kwargs.get("peft_config") is not None or hasattr(model, "peft_config")
        deferred = bool(args is not None and args.precompute_ref_log_probs and (peft or ref_model is not None))
        if deferred:
            args.precompute_ref_log_probs = False
        try:
            super().__init__(model, ref_model, args, *more, **kwargs)
        finally:
            if deferred:
                args.precompute_ref_log_probs = True
        if deferred:
            self.precompute_ref_logps = True
            size = self.args.precompute_ref_batch_size
            self.train_dataset = self._precompute_ref_logps(
                self.train_dataset, "train", size or self.args.per_device_train_batch_size)
            if self.eval_dataset is not None:
                size = size or self.args.per_device_eval_batch_size
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {name: self._precompute_ref_logps(ds, name, size)
                                         for name, ds in self.eval_dataset.items()}
                else:
                    self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", size)

    # -- length-grouped batches

    def _grouping(self, args=None) -> bool:
        args = args or self.args
        return getattr(args, "train_sampling_strategy", "random") in ("group_by_length", "batch_rebalance")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        start = time.perf_counter()
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        column = getattr(args, "length_column_name", LENGTH_COLUMN)
        if self._grouping(args) and isinstance(dataset, Dataset) and column not in dataset.column_names:
            dataset = dataset.add_column(column, pair_widths(dataset, args.max_length))
        if not hasattr(self, "prepare_seconds"):
            self.prepare_seconds = {}
        self.prepare_seconds[dataset_name] = round(time.perf_counter() - start, 3)  # TRL's tokenization, measured
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        column = getattr(self.args, "length_column_name", LENGTH_COLUMN)
        if self._grouping() and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]  # the sampler reads it; the collator not

    # -- reference log-probs

    def _ref_key_parts(self, dataset: Dataset) -> dict:
        import trl

        model = self.accelerator.unwrap_model(self.ref_model or self.model)
        if self.ref_model is not None or self._ref_base_fingerprint is None:
            fingerprint = base_model_fingerprint(model)
            if self.ref_model is None:
                self._ref_base_fingerprint = fingerprint  # the base is frozen: hash it once per trainer
        else:
            fingerprint = self._ref_base_fingerprint
        return {
            "format": CACHE_FORMAT, "trl": trl.__version__, "torch": torch.__version__.split("+")[0],
            "base_model": fingerprint, "explicit_ref_model": self.ref_model is not None,
            "data": token_fingerprint(dataset), "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode, "ld_alpha": self.ld_alpha,
            "precision": _precision(model, self.args), "device": self.accelerator.device.type,
        }

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        from accelerate.utils import broadcast_object_list

        start = time.perf_counter()
        dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
        parts = self._ref_key_parts(dataset)
        key = cache_key(parts)
        path = self.ref_cache_path / f"{key}.safetensors"
        loaded = load_ref_logps(path, parts, len(dataset)) if self.accelerator.is_main_process else None
        decision = [key, loaded is not None]  # rank 0 decides, so every rank takes the same (collective) path
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        key, hit = decision
        path = self.ref_cache_path / f"{key}.safetensors"
        if hit and not self.accelerator.is_main_process:
            loaded = load_ref_logps(path, parts, len(dataset))
            if loaded is None:
                raise RuntimeError(f"reference log-probs cache {path} readable on rank 0 but not on this rank")
        if hit:
            chosen, rejected = loaded
        else:
            with preserved_rng():  # a miss must leave the run exactly as a hit does (sampler order, dropout)
                chosen, rejected = self._compute_ref_logps(dataset, name, batch_size, key)
            if self.accelerator.is_main_process:
                save_ref_logps(path, chosen, rejected, parts)
            self.accelerator.wait_for_everyone()
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        dataset = dataset.add_column("ref_rejected_logps", rejected.tolist())
        seconds = time.perf_counter() - start
        self.ref_cache_events.append({"split": name, "hit": hit, "key": key, "pairs": len(dataset),
                                      "seconds": round(seconds, 3), "path": str(path)})
        if self.accelerator.is_main_process:
            print(f"reference log-probs: cache {'hit' if hit else 'miss'} ({key}) for the {name} split, "
                  f"{len(dataset)} pairs, {seconds:.1f} s", flush=True)
        return dataset

    def _compute_ref_logps(self, dataset: Dataset, name: str, batch_size: int,
                           key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference forward over the split, in batches sorted by length (little padding), in row order."""
        if self.ref_model is None and self.is_deepspeed_enabled:  # TRL's path builds the inference engine
            self._precompute_model_hash = key  # keys TRL's own temp-dir cache file
            done = super()._precompute_ref_logps(dataset, name, batch_size)
            return (torch.tensor(done["ref_chosen_logps"], dtype=torch.float32),
                    torch.tensor(done["ref_rejected_logps"], dtype=torch.float32))
        widths = pair_widths(dataset, self.args.max_length)
        order = np.argsort(widths, kind="stable")
        loader = DataLoader(dataset.select(order.tolist()), batch_size=batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, shuffle=False)
        loader = self.accelerator.prepare(loader)
        model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.compute_ref_log_probs(model, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        sorted_c, sorted_r = torch.cat(chosen), torch.cat(rejected)
        out_c, out_r = torch.empty_like(sorted_c), torch.empty_like(sorted_r)
        index = torch.from_numpy(order)
        out_c[index], out_r[index] = sorted_c, sorted_r
        return out_c, out_r


@contextlib.contextmanager
def preserved_rng():
    """Restore python, numpy, torch (and CUDA) random states on exit: iterating a DataLoader draws a seed."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def pair_widths(dataset: Dataset, max_length: int | None) -> list[int]:
    """Per pair, the padded width its two sequences need: prompt + the longer completion, capped at max_length."""
    table = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")[:]
    lengths = {c: np.asarray(table.column(c).combine_chunks().value_lengths().to_numpy(zero_copy_only=False))
               for c in TOKEN_COLUMNS}
    widths = lengths["prompt_ids"] + np.maximum(lengths["chosen_ids"], lengths["rejected_ids"])
    if max_length is not None:
        widths = np.minimum(widths, max_length)
    return widths.astype(int).tolist()
