"""Shared-prompt packing (speed/packing.py): the packed rows give TRL the same labels, log-probs and losses as TRL's own
padded [chosen; rejected] batches, for GPT-2 (learned positions) and Llama (rotary positions), sdpa and eager."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from dpo_pipeline.args import ConfigError, parse
from dpo_pipeline.pipeline import build_trainer
from dpo_pipeline.speed.packing import IGNORE, PackingCollator, add_packed_forward, forward_groups
from dpo_pipeline.synthetic import get_synthetic

# (prompt, chosen, rejected) lengths: ordinary pairs, no prompt, no rejected, no chosen, and pairs cut by max_length
SHAPES = [(5, 3, 4), (0, 2, 3), (7, 1, 0), (12, 9, 2), (3, 0, 5), (20, 20, 20), (1, 1, 1)]


def pairs(vocab: int = 500, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(1, vocab) for _ in range(k)]
    return [dict(prompt_ids=ids(n), chosen_ids=ids(a), rejected_ids=ids(b)) for n, a, b in SHAPES]


def trl_labels(batch: dict) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)


@pytest.mark.parametrize("max_length", [None, 16, 30])
@pytest.mark.parametrize("capacity", [25, 4096])  # several rows, or every pair in one row
def test_every_packed_label_lands_where_trl_scores_it(max_length, capacity):
    collator = PackingCollator(DataCollatorForPreference(pad_token_id=0, max_length=max_length), max_length)
    collator.capacity = capacity
    batch = collator(pairs())
    packed, (rows, width) = batch["packed"], batch["input_ids"].shape
    assert packed["input_ids"].numel() < batch["input_ids"].numel()  # fewer positions than TRL's padded batch
    if capacity == 25:
        assert packed["input_ids"].shape[0] > 1 and packed["input_ids"].shape[1] <= max(25, 2 * (max_length or 40))
    scored = packed["shift_labels"].reshape(-1)[packed["src"]]
    back = torch.full((rows * (width - 1),), IGNORE).index_copy(0, packed["dst"], scored).view(rows, width - 1)
    assert torch.equal(back, trl_labels(batch)[:, 1:])


def test_a_token_budget_splits_a_batch_into_forwards_that_hold_every_pair_once():
    rng = random.Random(1)
    lengths = [rng.randrange(3, 60) for _ in range(40)]
    for budget in (1, 100, 250, 10_000):
        groups = forward_groups(lengths, 120, budget)
        assert sorted(i for rows in groups for row in rows for i in row) == list(range(40))
        for rows in groups:  # rows x the longest row fit the budget, or the forward is one row
            sizes = [sum(lengths[i] for i in row) for row in rows]
            assert max(sizes) <= 120 or len(rows) == 1
            assert len(rows) * max(sizes) <= budget or len(rows) == 1
    assert len(forward_groups(lengths, 120, 1)) > len(forward_groups(lengths, 120, 250)) > 1
    assert len(forward_groups(lengths, 120, 10_000)) == 1

    collator = PackingCollator(DataCollatorForPreference(pad_token_id=0, max_length=16), 16)
    whole, split = collator(pairs()), collator(pairs(), token_budget=20)
    assert "packed" in whole and "chunks" not in whole and len(split["chunks"]) > 1
    seen = []
    for chunk in split["chunks"]:  # each chunk is a complete batch of its own pairs: labels where TRL scores them
        packed, (rows, width) = chunk["packed"], chunk["input_ids"].shape
        assert packed["input_ids"].numel() <= max(20, packed["input_ids"].shape[1])
        scored = packed["shift_labels"].reshape(-1)[packed["src"]]
        back = torch.full((rows * (width - 1),), IGNORE).index_copy(0, packed["dst"], scored).view(rows, width - 1)
        assert torch.equal(back, trl_labels(chunk)[:, 1:])
        seen += chosen_sequences(chunk)
    assert sorted(seen) == sorted(chosen_sequences(whole))


def chosen_sequences(batch: dict) -> list[tuple]:
    half = len(batch["input_ids"]) // 2  # TRL's rows: [chosen; rejected], right-padded
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"][:half],
                                                                  batch["attention_mask"][:half])]


def tiny_llama(path):
    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_packed_forward_gives_trl_the_same_per_token_values(tiny_gpt2, tmp_path, architecture, attention):
    path = tiny_gpt2 if architecture == "gpt2" else tiny_llama(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_packed_forward(model)
    collator = PackingCollator(DataCollatorForPreference(pad_token_id=0, max_length=30), 30)
    collator.capacity = 40
    batch = collator(pairs())
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=trl_labels(batch),
                  fused_lm_head=True)
    with torch.no_grad():
        padded, packed = model(**inputs), model(**inputs, packed=batch["packed"])
    for field in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(packed, field), getattr(padded, field), atol=1e-5), field
    assert torch.equal(packed.label_mask, padded.label_mask) and torch.equal(packed.is_top1, padded.is_top1)
    assert padded.log_probs.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("micro", [1, 4])  # one pair per forward, or four pairs packed into shared rows
def test_packed_training_logs_the_same_losses(tiny_gpt2, tmp_path, micro):
    synthetic = get_synthetic(n_pairs=200, seed=0)
    losses, ref = {}, {}
    for packing in (False, True):
        config = parse(dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, learning_rate=1e-3, max_steps=3,
                            per_device_train_batch_size=micro, gradient_accumulation_steps=4 // micro,
                            max_length=48, logging_steps=1, bf16=False, packing=packing,
                            output_dir=str(tmp_path / f"p{packing}"), log_completions=0, report_to="none",
                            eval_strategy="no"))
        trainer = build_trainer(config, synthetic)
        assert isinstance(trainer.data_collator, PackingCollator) == packing
        ref[packing] = torch.tensor(trainer.train_dataset["ref_chosen_logps"])  # precomputed, packed or not
        trainer.train()
        losses[packing] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses[True]) == 3 and losses[True][-1] != losses[True][0]  # it trained
    assert losses[True] == pytest.approx(losses[False], abs=1e-4), losses
    assert torch.allclose(ref[True], ref[False], atol=1e-4)


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")  # TRL's training metrics that average over pairs


@pytest.mark.slow
def test_accumulated_and_token_sized_forwards_train_the_same_steps_as_whole_batches(tiny_gpt2, tmp_path):
    # 8 pairs a step three ways: one forward; 4 accumulated micro-batches of 2 pairs (the reference scored each
    # step, not precomputed); forwards of at most 180 packed positions (~2 pairs a row). Each must give the whole
    # batch's loss, TRL's per-pair metrics and update.
    synthetic = get_synthetic(n_pairs=200, seed=0)
    ways = {"whole": dict(per_device_train_batch_size=8),
            "accumulated": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                precompute_ref_log_probs=False),
            "tokens": dict(per_device_train_batch_size=8, micro_batch_tokens=180)}
    losses, adapters, forwards, logged = {}, {}, {}, {}
    for way, settings in ways.items():
        config = parse(dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, learning_rate=1e-3, max_steps=3,
                            max_length=48, logging_steps=1, bf16=False, log_completions=0, report_to="none",
                            eval_strategy="no", output_dir=str(tmp_path / way), **settings))
        trainer = build_trainer(config, synthetic)
        forwards[way] = [[len(b["input_ids"]) // 2 for b in batch.get("chunks", [batch])]
                         for batch in trainer.get_train_dataloader()]
        trainer.train()
        losses[way] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        logged[way] = [{k: e[k] for k in PAIR_METRICS} for e in trainer.state.log_history if "loss" in e]
        assert trainer.state.total_flos > 0  # Trainer's FLOP count sees the chunks' tokens
        adapters[way] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(len(step) == 1 for step in forwards["whole"]), forwards
    assert any(len(set(step)) > 1 for step in forwards["tokens"]), forwards  # split, and into unequal pair counts
    assert len(losses["whole"]) == 3 and losses["whole"][-1] != losses["whole"][0]  # it trained
    assert losses["accumulated"] == pytest.approx(losses["whole"], abs=2e-4), losses
    assert losses["tokens"] == pytest.approx(losses["whole"], abs=1e-4), losses  # the same loss, TRL's metrics ...
    for split, whole in zip(logged["tokens"], logged["whole"]):
        assert split == pytest.approx(whole, abs=1e-4), (split, whole)
    for name, weight in adapters["whole"].items():  # ... the same update as whole batches
        assert torch.allclose(adapters["tokens"][name], weight, atol=1e-5), name


@pytest.mark.parametrize("settings", [dict(packing=False), dict(gradient_accumulation_steps=2),
                                      dict(micro_batch_tokens=-5), dict(trainer="trl"), "two processes"])
def test_micro_batch_tokens_needs_packing_one_process_and_no_accumulation(tiny_gpt2, settings, monkeypatch):
    if settings == "two processes":  # what torchrun sets; processes would split their steps into other forwards
        monkeypatch.setenv("WORLD_SIZE", "2")
        settings = {}
    with pytest.raises(ConfigError, match="micro_batch_tokens"):  # before anything is loaded
        parse({"model_name_or_path": tiny_gpt2, "per_device_train_batch_size": 4, "micro_batch_tokens": 64, **settings})


def test_packing_refuses_keep_end_truncation(tiny_gpt2):
    with pytest.raises(ConfigError, match="truncation_mode keep_start or packing false"):
        parse(dict(model_name_or_path=tiny_gpt2, truncation_mode="keep_end"))
