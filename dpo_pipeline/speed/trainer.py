"""`SpeedDPOTrainer`: the reference cache (refcache.py) plus the levers that are there only for speed."""

from __future__ import annotations

import contextlib
import functools

import torch

from ..refcache import CachedRefDPOTrainer
from .packing import PackingCollator, add_packed_forward


class SpeedDPOTrainer(CachedRefDPOTrainer):
    """`packing=True`: training and the reference precompute on packed rows; `micro_batch_tokens`: training forwards
    sized by packed tokens; on a CPU, `lean_lm_head` and fp32 adapters."""

    LEAN_LM_HEAD = True  # a class switch, for measuring (benchmarks/bench.py)

    def __init__(self, *args, packing: bool = False, micro_batch_tokens: int = 0, **kwargs):
        self.packing, self.micro_batch_tokens = packing, micro_batch_tokens
        super().__init__(*args, **kwargs)
        if micro_batch_tokens and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # their backward steps the optimizer (DeepSpeed) or reduces gradients on every chunk of a step
            raise ValueError("micro_batch_tokens trains without DeepSpeed or FSDP; use per_device_train_batch_size")
        self._use_packing()
        if not torch.cuda.is_available():  # TRL casts 4-bit (QLoRA) adapters to bf16: ~3x slower on most CPUs
            for param in (p for p in self.model.parameters() if p.requires_grad):
                param.data = param.data.float()

    def _use_packing(self) -> None:
        """Packed batches from the collator and a model forward (over TRL's fused LM head) that takes them, once."""
        if not self.packing or isinstance(self.data_collator, PackingCollator):
            return
        if self.args.truncation_mode != "keep_start":
            raise ValueError("packing keeps the start of long pairs: set truncation_mode='keep_start' or packing=False")
        model = self.accelerator.unwrap_model(self.model)
        for lm in (model.get_base_model() if hasattr(model, "get_base_model") else model, self.ref_model):
            if lm is not None:
                add_packed_forward(lm)
        self.data_collator = PackingCollator(self.data_collator, self.args.max_length)

    def _key_parts(self, dataset) -> dict:
        return {**super()._key_parts(dataset), "packing": self.packing}  # the same values, other rounding

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        self._use_packing()  # called from TRL's __init__, before ours has switched packing on
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def get_train_dataloader(self):
        """With `micro_batch_tokens`, training batches (not the no-grad evaluations or reference) come split."""
        if not self.micro_batch_tokens:
            return super().get_train_dataloader()
        whole = self.data_collator
        self.data_collator = functools.partial(whole, token_budget=self.micro_batch_tokens)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = whole

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A batch split by tokens: a forward and backward per chunk, its loss weighted by its share of the pairs
        (Trainer divides by `current_gradient_accumulation_steps`), so the step's gradient, logged loss and TRL's
        merged metrics are the whole batch's for loss types that average over pairs (not sft, aot). Trainer itself
        accumulates only over a fixed number of equal micro-batches."""
        if "chunks" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        chunks, steps = inputs["chunks"], self.current_gradient_accumulation_steps
        pairs = [len(chunk["input_ids"]) // 2 for chunk in chunks]
        metrics = self._metrics["train"]
        logged = {key: len(values) for key, values in metrics.items()}
        loss = 0.0
        try:
            for chunk, n in zip(chunks, pairs):
                self.current_gradient_accumulation_steps = steps * sum(pairs) / n
                loss = loss + super().training_step(model, chunk, num_items_in_batch)
        finally:
            self.current_gradient_accumulation_steps = steps
        for key, values in metrics.items():  # one entry a chunk -> one for the batch, weighted by pairs
            start = logged.get(key, 0)
            if len(values) - start == len(chunks):
                values[start:] = [sum(v * n for v, n in zip(values[start:], pairs)) / sum(pairs)]
        return loss

    def _track_num_input_tokens(self, inputs):
        for chunk in inputs.get("chunks", [inputs]):
            super()._track_num_input_tokens(chunk)

    def floating_point_ops(self, inputs) -> int:  # Trainer's `total_flos`, over a split batch's chunks too
        flops = super().floating_point_ops
        return sum(flops(chunk) for chunk in inputs.get("chunks", [inputs]))

    def _lm_head_context(self, inputs):
        if not self.LEAN_LM_HEAD or self.accelerator.device.type != "cpu":  # (counting a CUDA mask would sync)
            return contextlib.nullcontext()
        mask = inputs.get("completion_mask") if isinstance(inputs, dict) else None
        return lean_lm_head(self.accelerator.device, int(mask.sum()) if mask is not None else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._lm_head_context(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):  # the reference precompute's forwards (refcache.py)
        with self._lm_head_context(inputs):
            return super().compute_ref_log_probs(model, inputs)


LEAN_TILE_ELEMENTS = 2**24  # tokens x vocabulary columns per tile: 64 MB per fp32 temporary
LEAN_VOCAB_TILE_RANGE = (4096, 32768)  # narrower tiles cost per-tile overhead (4 s vs 1.4 s on the tiny model)


def lean_vocab_tile(n_tokens: int | None) -> int:
    """The widest power-of-two vocabulary tile whose temporaries stay within LEAN_TILE_ELEMENTS."""
    low, high = LEAN_VOCAB_TILE_RANGE
    tile = low
    while n_tokens and tile * 2 <= high and tile * 2 * n_tokens <= LEAN_TILE_ELEMENTS:
        tile *= 2
    return tile if n_tokens else high


@contextlib.contextmanager
def lean_lm_head(device: torch.device, n_tokens: int | None = None):
    """TRL's fused LM head as it runs on GPUs, on a CPU: only the completion positions are projected (TRL 1.16 does
    that with Triton; elsewhere it projects every position in 32768-wide vocabulary tiles). Measured on the 2-core
    CPU: 1.36x faster, 44% less memory. A no-op off the CPU or where TRL's globals (trl_private.py) are gone."""
    import trl.trainer.utils as trl_utils

    if device.type != "cpu" or not all(hasattr(trl_utils, n) for n in ("_use_triton", "_CHUNKED_LOGPROB_CHUNK_SIZE")):
        yield
        return
    saved = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._use_triton = lambda d: d.type == "cpu" or saved[0](d)  # in trl.trainer.utils: "score compactly"
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(saved[1], lean_vocab_tile(n_tokens))
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = saved
