"""The tuned DPO path: reference log-probs cached on disk, length-grouped batches, a lean LM head, tokenization
memoized (precision by hardware is `model.mixed_precision`). `train.build_trainer` uses `CachedRefDPOTrainer`;
`bench.py` measures each lever.

Reference log-probs. DPO compares the policy with a frozen reference. With a LoRA adapter the reference is the base
model with the adapter disabled, so its log-probs of each pair's chosen and rejected completions depend only on

    the base model weights (LoRA weights excluded: lora_r, lora_targets, seed, learning rate, beta ... do not matter),
    the tokenized pairs (prompt_ids / chosen_ids / rejected_ids, in order),
    max_length and truncation_mode, ld_alpha,
    the precision (weight dtype, 4-bit quantization settings, bf16/fp16 autocast) and the device type
    (+ TRL and torch versions and a format number).

`CachedRefDPOTrainer` hashes those into a key and keeps the values in
``<DPO_REF_CACHE or model.cache_dir()/ref_logps>/<key>.safetensors`` (NaN for rows not computed yet). A split the run
goes through entirely is completed up front ("eager": TRL's `compute_ref_log_probs` in batches sorted by length);
otherwise rows are computed when a training batch first holds them ("lazy") and stored at the end. Every run of a
sweep, and a resumed run, then skips the reference forward pass; any change to a key part is a new key (a miss), so
stale values are never reused. Files are written atomically (temp file + rename) after merging with what other
processes stored, so sweep processes sharing the folder never read half a file. Data-parallel ranks compute their
shards and rank 0 writes. Fingerprinting the weights costs ~0.03 s for GPT-2 124M (xxh3); TRL's own precompute
hashes the whole model with sha256 (~0.9 s), which is skipped.

Length grouping: `train_sampling_strategy="group_by_length"` does not work with TRL out of the box (TRL keeps only
the token-id columns and the sampler finds no `input_ids`); the trainer adds a `length` column (the padded width a
pair needs) and keeps it through the column filter.

Lean LM head (`lean_lm_head`): on a CPU, TRL scores every position through the LM head in 32768-wide vocabulary
tiles; here only the completion tokens, in tiles sized to the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import TrainerCallback
from trl import DPOTrainer

from . import model as model_lib

CACHE_FORMAT = 1  # bump when what is stored, or how it is computed, changes
LENGTH_COLUMN = "length"
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_INDEX_COLUMN = "ref_index"  # a row's id in the reference cache tables, carried through the collator
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


def save_ref_logps(path: Path, values: torch.Tensor, parts: dict) -> None:
    """Write atomically: another process sees the old state or the whole file, never a partial one.

    NaN marks a row not computed yet (a run that trained on part of the split)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({REF_COLUMNS[0]: values[0].float().contiguous(), REF_COLUMNS[1]: values[1].float().contiguous()},
              str(tmp), metadata={"key_parts": json.dumps(parts, sort_keys=True, default=str)})
    os.replace(tmp, path)


def load_ref_logps(path: Path, parts: dict, n_rows: int) -> torch.Tensor | None:
    """The stored [2, n] values (NaN: not computed yet), or None when the file is missing, unreadable or was made
    for something else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key_parts", "null"))
            chosen, rejected = f.get_tensor(REF_COLUMNS[0]), f.get_tensor(REF_COLUMNS[1])
    except Exception:  # noqa: BLE001 - a bad cache file is a miss, never a failed run
        return None
    if stored != json.loads(json.dumps(parts, sort_keys=True, default=str)) or len(chosen) != n_rows \
            or len(rejected) != n_rows:
        return None
    return torch.stack([chosen.float(), rejected.float()])


# ---------------------------------------------------------------- tokenization, memoized in the process

TOKENIZED_MEMO_SIZE = 8
_TOKENIZED: "OrderedDict[str, Dataset]" = OrderedDict()  # key -> TRL-prepared dataset, least recently used first
_TOKENIZER_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tokenizer_digest(tokenizer) -> str:
    """What TRL's tokenization depends on: the tokenizer's full definition, special tokens and chat template."""
    try:
        return _TOKENIZER_DIGESTS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token, tokenizer.pad_token,
                        getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_bos_token", None)],
                       default=str)
    digest = hashlib.sha256((body + extra).encode()).hexdigest()
    with contextlib.suppress(TypeError):
        _TOKENIZER_DIGESTS[tokenizer] = digest
    return digest


def _tokenized_key(dataset: Dataset, processing_class, args) -> str | None:
    """A key for TRL's `_prepare_dataset` output, or None (not memoized) for anything but a text tokenizer.

    TRL re-tokenizes each split for every trainer; `datasets` fingerprints each map by pickling the tokenizer (about
    1.5 s per split for GPT-2's, whatever the split size). A sweep in one process pays it once per split.
    """
    import pyarrow as pa
    import trl

    if not hasattr(processing_class, "backend_tokenizer") or "image" in dataset.column_names \
            or "images" in dataset.column_names:
        return None
    table = dataset.with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h = _content_hasher()
    h.update(sink.getvalue())
    parts = [trl.__version__, _tokenizer_digest(processing_class), h.hexdigest(), args.max_length,
             args.truncation_mode, args.pad_token]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- the trainer


class CachedRefDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with reference log-probs cached on disk, working length-grouped batches and a leaner LM head.

    Reference log-probs, per split (train, each eval set), are kept in one cache file per key (see the module
    docstring). A split the run will go through entirely (the train split when the run lasts at least an epoch; an
    eval split that will be evaluated) is filled up front, in batches sorted by length, when the file lacks rows
    ("eager"). Otherwise ("lazy") a row is computed the first time a batch holds it, in the same no-grad forward TRL
    would run at that step, and stored: a short run on a big split pays only for the pairs it trains on, and the next
    run of the sweep (same data order) finds them. Values are stored at the end of training and after each
    evaluation, merged with what other processes stored meanwhile; under data parallelism the ranks' rows are gathered
    and rank 0 writes.

    `ref_cache_dir`: where the cache files live (default: `default_ref_cache_dir()`). `ref_cache_events` lists per
    split: key, pairs, rows found cached, rows computed up front, seconds, mode, hit (every row was cached).
    """

    LEAN_LM_HEAD = True  # class switches, for measuring (bench.py's lever table)

    def __init__(self, model, ref_model=None, args=None, *more, ref_cache_dir: str | Path | None = None, **kwargs):
        self.ref_cache_path = Path(ref_cache_dir) if ref_cache_dir else default_ref_cache_dir()
        self.ref_cache_events: list[dict] = []
        self._ref_tables: list[dict] = []  # one per split: key, path, parts, values, offset of its row ids
        self._ref_base_fingerprint: str | None = None
        self.ref_rows_computed_in_steps = 0
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
        self.data_collator = _RefIndexCollator(self.data_collator)
        self.add_callback(_StoreRefLogps(self))
        if deferred:
            self.precompute_ref_logps = True
            size = self.args.precompute_ref_batch_size
            self.train_dataset = self._precompute_ref_logps(
                self.train_dataset, "train", size or self.args.per_device_train_batch_size,
                eager=self._covers_train_split(len(self.train_dataset)))
            if self.eval_dataset is not None:
                size = size or self.args.per_device_eval_batch_size
                evaluates = str(self.args.eval_strategy).lower().split(".")[-1] != "no"
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {name: self._precompute_ref_logps(ds, name, size, eager=evaluates)
                                         for name, ds in self.eval_dataset.items()}
                else:
                    self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", size, eager=evaluates)

    def _covers_train_split(self, n_rows: int) -> bool:
        args = self.args
        if self.is_deepspeed_enabled:
            return True  # ZeRO shards the model: only TRL's precompute path knows how to run the reference there
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        seen = args.max_steps * per_step if args.max_steps > 0 else args.num_train_epochs * n_rows
        return seen >= n_rows

    # -- a leaner LM head on devices without Triton

    def _lm_head_context(self, inputs):
        if not self.LEAN_LM_HEAD:
            return contextlib.nullcontext()
        mask = inputs.get("completion_mask") if isinstance(inputs, dict) else None
        return lean_lm_head(self.accelerator.device, int(mask.sum()) if mask is not None else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(REF_INDEX_COLUMN, None) if isinstance(inputs, dict) else None
        if index is not None and self.precompute_ref_logps and REF_COLUMNS[0] in inputs:
            self._fill_missing_ref_logps(inputs, index)
        with self._lm_head_context(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k != REF_INDEX_COLUMN}
        with self._lm_head_context(inputs):
            return super().compute_ref_log_probs(model, inputs)

    # -- length-grouped batches

    def _grouping(self, args=None) -> bool:
        args = args or self.args
        return getattr(args, "train_sampling_strategy", "random") in ("group_by_length", "batch_rebalance")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        start = time.perf_counter()
        key = _tokenized_key(dataset, processing_class, args) if isinstance(dataset, Dataset) else None
        if key is not None and key in _TOKENIZED:
            _TOKENIZED.move_to_end(key)
            dataset = _TOKENIZED[key]
        else:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if key is not None:
                _TOKENIZED[key] = dataset
                while len(_TOKENIZED) > TOKENIZED_MEMO_SIZE:
                    _TOKENIZED.popitem(last=False)
        column = getattr(args, "length_column_name", LENGTH_COLUMN)
        if self._grouping(args) and isinstance(dataset, Dataset) and column not in dataset.column_names:
            dataset = dataset.add_column(column, pair_widths(dataset, args.max_length))
        if not hasattr(self, "prepare_seconds"):
            self.prepare_seconds = {}
        self.prepare_seconds[dataset_name] = round(time.perf_counter() - start, 3)  # TRL's tokenization, measured
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [REF_INDEX_COLUMN]
        if self._grouping():
            extra.append(getattr(self.args, "length_column_name", LENGTH_COLUMN))  # the sampler reads it
        self._signature_columns = [*self._signature_columns, *(c for c in extra if c not in self._signature_columns)]

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

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int, eager: bool = True):
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        from accelerate.utils import broadcast_object_list

        start = time.perf_counter()
        dataset = dataset.remove_columns([c for c in (*REF_COLUMNS, REF_INDEX_COLUMN) if c in dataset.column_names])
        n = len(dataset)
        parts = self._ref_key_parts(dataset)
        key = cache_key(parts)
        path = self.ref_cache_path / f"{key}.safetensors"
        values = None
        if self.accelerator.is_main_process:
            values = load_ref_logps(path, parts, n)
        if values is None:
            values = torch.full((2, n), float("nan"))
        shared = [key, values]  # rank 0's view, so every rank takes the same (collective) path
        if self.accelerator.num_processes > 1:
            broadcast_object_list(shared, from_process=0)
        key, values = shared
        path = self.ref_cache_path / f"{key}.safetensors"
        known = int(_known(values).sum())
        computed = 0
        if eager and known < n:
            missing = torch.nonzero(~_known(values)).flatten()
            with preserved_rng():  # computing must leave the run exactly as a hit does (sampler order, dropout)
                c, r = self._compute_ref_logps(dataset.select(missing.tolist()), name, batch_size, key)
            values[0, missing], values[1, missing] = c, r
            computed = len(missing)
            if self.accelerator.is_main_process:
                save_ref_logps(path, merge_ref_logps(load_ref_logps(path, parts, n), values), parts)
            self.accelerator.wait_for_everyone()
        offset = sum(len(t["values"][0]) for t in self._ref_tables)
        self._ref_tables.append({"split": name, "key": key, "path": path, "parts": parts, "values": values,
                                 "offset": offset, "new": 0})
        dataset = dataset.add_column(REF_COLUMNS[0], values[0].tolist())
        dataset = dataset.add_column(REF_COLUMNS[1], values[1].tolist())
        dataset = dataset.add_column(REF_INDEX_COLUMN, list(range(offset, offset + n)))
        seconds = time.perf_counter() - start
        hit = known == n
        self.ref_cache_events.append({"split": name, "hit": hit, "key": key, "pairs": n, "cached": known,
                                      "computed": computed, "mode": "eager" if eager else "lazy",
                                      "seconds": round(seconds, 3), "path": str(path)})
        if self.accelerator.is_main_process:
            if hit:
                what = "cache hit"
            elif eager:
                what = f"cache miss, {computed} computed now ({known} cached)"
            else:
                what = f"{known}/{n} cached, the rest computed as training reaches them"
            print(f"reference log-probs: {what} ({key}) for the {name} split, {n} pairs, {seconds:.1f} s", flush=True)
        return dataset

    def _compute_ref_logps(self, dataset: Dataset, name: str, batch_size: int,
                           key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference forward over the split, in batches sorted by length (little padding), in row order."""
        if self.ref_model is None and self.is_deepspeed_enabled:  # TRL's path builds the inference engine
            self._precompute_model_hash = key  # keys TRL's own temp-dir cache file
            done = super()._precompute_ref_logps(dataset, name, batch_size)
            return (torch.tensor(done[REF_COLUMNS[0]], dtype=torch.float32),
                    torch.tensor(done[REF_COLUMNS[1]], dtype=torch.float32))
        widths = pair_widths(dataset, self.args.max_length)
        order = np.argsort(widths, kind="stable")
        loader = DataLoader(dataset.select(order.tolist()), batch_size=batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, shuffle=False)
        loader = self.accelerator.prepare(loader)
        model = self.ref_model or self.model
        chosen, rejected = [], []
        bar = tqdm(loader, desc=f"Reference log-probs ({name})", disable=not self.accelerator.is_local_main_process)
        for batch in bar:
            c, r = self.compute_ref_log_probs(model, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        sorted_c, sorted_r = torch.cat(chosen), torch.cat(rejected)
        out_c, out_r = torch.empty_like(sorted_c), torch.empty_like(sorted_r)
        index = torch.from_numpy(order)
        out_c[index], out_r[index] = sorted_c, sorted_r
        return out_c, out_r

    def _fill_missing_ref_logps(self, inputs: dict, index: torch.Tensor) -> None:
        """Lazy mode: the rows of this batch not cached yet get TRL's per-step reference forward, once, and are kept."""
        chosen, rejected = inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]
        missing = torch.isnan(chosen) | torch.isnan(rejected)
        if not bool(missing.any()):
            return
        plain = {k: v for k, v in inputs.items() if k not in REF_COLUMNS}
        with torch.no_grad():
            c, r = self.compute_ref_log_probs(self.ref_model or self.model, plain)
        inputs[REF_COLUMNS[0]] = torch.where(missing, c.to(chosen.dtype), chosen)
        inputs[REF_COLUMNS[1]] = torch.where(missing, r.to(rejected.dtype), rejected)
        self.ref_rows_computed_in_steps += int(missing.sum())
        for row, cv, rv in zip(index[missing].tolist(), c[missing].tolist(), r[missing].tolist()):
            table = next(t for t in reversed(self._ref_tables) if t["offset"] <= row)
            local = row - table["offset"]
            if torch.isnan(table["values"][0, local]):
                table["values"][0, local], table["values"][1, local] = cv, rv
                table["new"] += 1

    def store_ref_logps(self) -> None:
        """Write the rows computed in training/evaluation steps (all ranks' rows; rank 0 writes). Collective."""
        world = self.accelerator.num_processes
        for table in self._ref_tables:
            values, new = table["values"], table["new"]
            if world > 1:
                device = self.accelerator.device
                everyone = self.accelerator.gather(values.to(device).unsqueeze(0)).cpu()  # [world, 2, n]
                for other in everyone:
                    values = merge_ref_logps(values, other)
                new = int(self.accelerator.reduce(torch.tensor([new], device=device), "sum").item())
                table["values"] = values
            if new == 0:
                continue
            table["new"] = 0
            if self.accelerator.is_main_process:
                merged = merge_ref_logps(load_ref_logps(table["path"], table["parts"], values.shape[1]), values)
                save_ref_logps(table["path"], merged, table["parts"])
                print(f"reference log-probs: {new} new value pairs stored ({table['key']}) for the "
                      f"{table['split']} split, {int(_known(merged).sum())}/{values.shape[1]} cached", flush=True)


class _RefIndexCollator:
    """TRL's collator, plus the rows' ids in the reference cache (TRL's collator keeps only the columns it knows)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if examples and REF_INDEX_COLUMN in examples[0]:
            batch[REF_INDEX_COLUMN] = torch.tensor([e[REF_INDEX_COLUMN] for e in examples], dtype=torch.long)
        return batch

    def __getattr__(self, name):  # pad_token_id, max_length, ... as the wrapped collator has them
        if name == "collator":  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.collator, name)


class _StoreRefLogps(TrainerCallback):
    """Store lazily computed reference log-probs at the end of training and after every evaluation."""

    def __init__(self, trainer: CachedRefDPOTrainer):
        self.trainer = weakref.proxy(trainer)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.store_ref_logps()

    def on_evaluate(self, args, state, control, **kwargs):
        self.trainer.store_ref_logps()


def _known(values: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(values).any(dim=0)


def merge_ref_logps(stored: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """[2, n] values: ours where known, else what is stored (rows another process filled meanwhile)."""
    if stored is None:
        return values.clone()
    return torch.where(_known(values).unsqueeze(0), values, stored)


LEAN_TILE_ELEMENTS = 2**24  # tokens x vocabulary columns per tile: 64 MB per fp32 temporary
LEAN_VOCAB_TILE_RANGE = (4096, 32768)  # narrower tiles cost per-tile overhead (4 s vs 1.4 s on the tiny model)


def lean_vocab_tile(n_tokens: int | None) -> int:
    """The widest power-of-two vocabulary tile whose temporaries stay within LEAN_TILE_ELEMENTS."""
    low, high = LEAN_VOCAB_TILE_RANGE
    if not n_tokens:
        return high
    tile = low
    while tile * 2 <= high and tile * 2 * n_tokens <= LEAN_TILE_ELEMENTS:
        tile *= 2
    return tile


@contextlib.contextmanager
def lean_lm_head(device: torch.device, n_tokens: int | None = None):
    """TRL's fused LM head, as it runs on GPUs, on devices without Triton (the CPU).

    TRL 1.16 computes per-token log-probs in tiles without materializing the logits. With Triton (CUDA, XPU) it
    projects only the positions that have a label (the completion tokens); elsewhere it projects every position,
    prompt and padding included, in 32768-wide vocabulary tiles whose torch fallback makes several fp32 temporaries
    of tokens x 32768 (~2 GB at batch 4 x 256 tokens). Here: only the labelled positions (the same values: the others
    are zeroed anyway) in tiles sized to the number of labelled tokens (`lean_vocab_tile`). The fallback kernel stays the torch one (trl.kernels keeps its own switch).
    A no-op on CUDA/XPU, or if TRL's internals are not where 1.16 has them.
    """
    import trl.trainer.utils as trl_utils

    if device.type != "cpu" or not (hasattr(trl_utils, "_use_triton")
                                    and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")):
        yield
        return
    saved = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._use_triton = lambda d: d.type == "cpu" or saved[0](d)  # in trl.trainer.utils: "score compactly"
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(saved[1], lean_vocab_tile(n_tokens))
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = saved


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
