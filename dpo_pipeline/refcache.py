"""What TRL lacks for sweeps: reference log-probs kept on disk under a key that leaves the LoRA weights out.

With a LoRA adapter the reference is the base model with the adapter disabled, so its log-probs of each pair's
completions depend only on the base weights (not lora_r, seed, learning rate, beta ...), the tokenized pairs,
max_length, truncation_mode, ld_alpha, the precision and the device type (+ TRL and torch versions). TRL 1.16
precomputes them (`precompute_ref_log_probs=True`) but keys its cache by a hash of the whole model, LoRA weights
included, in a temporary folder: no two sweep runs share it. `CachedRefDPOTrainer` keeps them in
``<DPO_REF_CACHE or cache_dir()/ref_logps>/<key>.safetensors``, written atomically (by rank 0 under data parallelism),
by overriding TRL's private `_precompute_ref_logps` (trl_private.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import trl
import xxhash  # comes with `datasets`: hashes ~500 MB of fp32 weights in ~0.03 s (sha256: ~0.5 s)
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from offline_models import cache_dir
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .prepare import TOKEN_COLUMNS

CACHE_FORMAT = 2  # bump when what is stored, or how it is computed, changes
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def base_model_fingerprint(model) -> str:
    """A content hash of the weights the reference uses: every base tensor, no trainable LoRA tensor, under the base
    weight's own name (so lora_targets do not change it). Tied tensors (GPT-2's wte and lm_head) are hashed once."""
    h, seen = xxhash.xxh3_128(), set()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "modules_to_save" in name or not isinstance(tensor, torch.Tensor):
            continue
        name = name.removeprefix("base_model.model.").removeprefix("module.").replace(".base_layer.", ".")
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        ident = (tensor.device.type, tensor.data_ptr(), tensor.numel(), tuple(tensor.stride()))
        if tensor.numel() and ident not in seen:
            seen.add(ident)
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _token_columns(dataset: Dataset) -> dict:
    table = dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow")[:]  # honours select()/filter()
    return {c: table.column(c).combine_chunks() for c in TOKEN_COLUMNS}


def _int64(array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)


def token_fingerprint(dataset: Dataset) -> str:
    """A content hash of the tokenized pairs, in row order (the stored values follow that order)."""
    h = xxhash.xxh3_128(f"rows={len(dataset)}".encode())
    for name, column in _token_columns(dataset).items():
        h.update(name.encode())
        h.update(_int64(column.value_lengths()).tobytes())
        h.update(_int64(column.flatten()).tobytes())
    return h.hexdigest()


def save_ref_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, key_parts: str) -> None:
    """Write atomically: another process sees the old state or the whole file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(dict(zip(REF_COLUMNS, (chosen, rejected))), str(tmp), metadata={"key_parts": key_parts})
    os.replace(tmp, path)


def load_ref_logps(path: Path, key_parts: str, n_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(chosen, rejected), or None when the file is missing, unreadable or was made for something else."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key_parts")
            chosen, rejected = (f.get_tensor(c) for c in REF_COLUMNS)
    except Exception:  # noqa: BLE001 - a bad cache file is a miss, never a failed run
        return None
    return (chosen, rejected) if stored == key_parts and len(chosen) == n_rows else None


class CachedRefDPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer whose precomputed reference log-probs are kept on disk and shared between runs.

    `ref_cache_events`: per split, its key, pairs, whether it was a hit, seconds. The speed levers are a subclass of
    this one (speed/trainer.py)."""

    def __init__(self, *args, ref_cache_dir: str | Path | None = None, **kwargs):
        self.ref_cache_path = Path(ref_cache_dir or os.environ.get("DPO_REF_CACHE", cache_dir() / "ref_logps"))
        self.ref_cache_events: list[dict] = []
        self._base_fingerprint: str | None = None
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # pairs prepare.py tokenized with this same TRL code (trl_private.prepare_dpo_dataset) are kept as they are
        if all(c in dataset.column_names for c in TOKEN_COLUMNS):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _key_parts(self, dataset: Dataset) -> dict:
        model = self.accelerator.unwrap_model(self.ref_model or self.model)
        if self._base_fingerprint is None or self.ref_model is not None:
            self._base_fingerprint = base_model_fingerprint(model)  # the base is frozen: hashed once per trainer
        quant = model.config.to_dict().get("quantization_config")
        param = next(p for p in model.parameters() if p.is_floating_point())
        return {
            "format": CACHE_FORMAT, "trl": trl.__version__, "torch": torch.__version__.split("+")[0],
            "base_model": self._base_fingerprint, "explicit_ref_model": self.ref_model is not None,
            "data": token_fingerprint(dataset), "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode, "ld_alpha": self.ld_alpha,
            "precision": [str(param.dtype), self.args.bf16, self.args.fp16, json.dumps(quant, default=str)],
            "device": self.accelerator.device.type,
        }

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        start = time.perf_counter()
        parts = json.dumps(self._key_parts(dataset), sort_keys=True, default=str)
        key = hashlib.sha256(parts.encode()).hexdigest()[:32]
        path = self.ref_cache_path / f"{key}.safetensors"
        found = [load_ref_logps(path, parts, len(dataset)) if self.accelerator.is_main_process else None]
        broadcast_object_list(found, from_process=0)  # every rank takes the same (collective) path
        if found[0] is None:
            # iterating a DataLoader draws from torch's RNG: a miss must leave the run in the random state a hit does
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                chosen, rejected = self._compute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                save_ref_logps(path, chosen, rejected, parts)
            self.accelerator.wait_for_everyone()
        else:
            chosen, rejected = found[0]
        dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
        dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist()).add_column(REF_COLUMNS[1], rejected.tolist())
        hit, seconds = found[0] is not None, time.perf_counter() - start
        self.ref_cache_events.append({"split": name, "hit": hit, "key": key, "pairs": len(dataset),
                                      "seconds": round(seconds, 3), "path": str(path)})
        if self.accelerator.is_main_process:
            print(f"reference log-probs: cache {'hit' if hit else 'miss'} ({key}) for the {name} split, "
                  f"{len(dataset)} pairs, {seconds:.1f} s", flush=True)
        return dataset

    def _compute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference forward (`compute_ref_log_probs`) over the split, in batches sorted by their padded width
        (little padding), returned in row order. Not TRL's own loop: it hands the values between ranks through a
        file in each process's own temporary folder, which the other ranks of a data-parallel run cannot read."""
        n = {c: _int64(column.value_lengths()) for c, column in _token_columns(dataset).items()}
        widths = n["prompt_ids"] + np.maximum(n["chosen_ids"], n["rejected_ids"])
        order = np.argsort(np.minimum(widths, self.args.max_length) if self.args.max_length else widths, kind="stable")
        loader = self.accelerator.prepare(DataLoader(dataset.select(order.tolist()), batch_size=batch_size,
                                                     collate_fn=self.data_collator, shuffle=False))
        model, values = self.ref_model or self.model, []
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})",
                          disable=not self.accelerator.is_local_main_process):
            with torch.no_grad():
                values.append(torch.stack(self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch)))
                              .float().cpu())
        chosen, rejected = torch.empty(len(dataset)), torch.empty(len(dataset))
        chosen[torch.from_numpy(order)], rejected[torch.from_numpy(order)] = torch.cat(values, dim=1)
        return chosen, rejected
