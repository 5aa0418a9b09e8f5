"""Reference log-probs cached on disk (refcache.py): miss then hit across runs that differ only in LoRA/optimizer
settings, values equal to TRL's own computation, invalidation when a key part changes, atomic files, a sweep whose
second run reuses the first run's reference (the TRL internals it relies on: tests/test_trl_private.py). Real tiny
GPT-2, real TRL trainer, no mocks."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from dpo_pipeline import model as model_lib
from offline_models import gpt2 as offline_gpt2
from dpo_pipeline.evaluate import pair_logps, token_ids
from dpo_pipeline.args import parse
from dpo_pipeline.pipeline import build_trainer
from dpo_pipeline.refcache import REF_COLUMNS, CachedRefDPOTrainer, base_model_fingerprint
from dpo_pipeline.speed.trainer import SpeedDPOTrainer
from dpo_pipeline.synthetic import get_synthetic


@pytest.fixture(scope="module")
def pairs():
    return get_synthetic(n_pairs=20, seed=0)  # 16 train / 4 test


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "ref_cache"
    monkeypatch.setenv("DPO_REF_CACHE", str(folder))
    return folder


def _config(model, tmp_path, **kw):
    # 2 steps x 8 pairs = the whole 16-pair train split: its reference is computed up front ("eager")
    return parse({"model_name_or_path": model, "load_in_4bit": False, "lora_r": 8, "learning_rate": 1e-3,
                  "per_device_train_batch_size": 8, "max_steps": 2, "max_length": 48, "eval_steps": 2,
                  "logging_steps": 1, "bf16": False, "output_dir": str(tmp_path / "run"), **kw})


def _events(trainer):
    return {e["split"]: e for e in trainer.ref_cache_events}


@pytest.mark.slow  # builds trainers (reference precompute), trains
def test_miss_then_hit_across_lr_rank_seed_and_targets(tiny_gpt2, pairs, cache, tmp_path):
    first = build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    assert isinstance(first, SpeedDPOTrainer) and isinstance(first, CachedRefDPOTrainer)
    assert first.args.precompute_ref_log_probs
    misses = _events(first)
    assert set(misses) == {"train", "eval"} and not any(e["hit"] for e in misses.values())
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted(f"{e['key']}.safetensors" for e in misses.values())  # atomic: no temp file left over
    rng_after_miss = torch.get_rng_state()

    # Another run of the same sweep: other learning rate, LoRA rank, LoRA targets and seed -> the same reference.
    second = build_trainer(_config(tiny_gpt2, tmp_path, learning_rate=5e-4, lora_r=4, seed=7,
                                   lora_target_modules=["c_attn"]), pairs)
    hits = _events(second)
    assert all(e["hit"] for e in hits.values())
    assert {s: e["key"] for s, e in hits.items()} == {s: e["key"] for s, e in misses.items()}
    assert sorted(p.name for p in cache.iterdir()) == files

    # A hit leaves the run exactly where a miss does (the precompute's DataLoader draws from the global RNG).
    build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    assert torch.equal(torch.get_rng_state(), rng_after_miss)

    # The loaded values equal TRL's own computation (a trainer without our cache: reference forward every step)
    train = second.train_dataset
    loaded_c, loaded_r = (torch.tensor(train[c]) for c in REF_COLUMNS)
    plain = build_trainer(_config(tiny_gpt2, tmp_path, trainer="trl", precompute_ref_log_probs=False), pairs)
    batch = plain.data_collator([{k: train[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                 for i in range(len(train))])
    batch = {k: v.to(plain.model.device) for k, v in batch.items()}
    trl_c, trl_r = plain.compute_ref_log_probs(plain.model, batch)
    close = lambda a, b: torch.allclose(a, b.float().cpu(), rtol=1e-4, atol=1e-3)  # other batches, other padding
    assert close(loaded_c, trl_c) and close(loaded_r, trl_r)
    # ... and the base model's own log-probs of the completions, computed independently (evaluate.py).
    model = second.model
    with model.disable_adapter():
        independent = pair_logps(model, token_ids(second.processing_class, pairs.train, 48), 48, batch_size=8)[0]
    assert torch.allclose(loaded_c.double(), independent.double(), atol=1e-3), (loaded_c[:4], independent[:4])

    # Training on the cached values works.
    second.train()
    assert second.state.global_step == 2 and "loss" in second.state.log_history[0]


@pytest.mark.slow  # builds trainers (reference precompute), trains
def test_a_changed_key_part_is_a_miss(tiny_gpt2, pairs, cache, tmp_path):
    keys = {}

    def train_key(config, data=pairs):
        trainer = build_trainer(config, data)
        event = _events(trainer)["train"]
        return event["key"], event["hit"]

    keys["base"], hit = train_key(_config(tiny_gpt2, tmp_path))
    assert not hit
    key, hit = train_key(_config(tiny_gpt2, tmp_path, max_length=40))
    assert not hit and key != keys["base"]
    fewer = dataclasses.replace(pairs, train=pairs.train.select(range(len(pairs.train) - 1)))
    key, hit = train_key(_config(tiny_gpt2, tmp_path), fewer)
    assert not hit and key != keys["base"]
    other_weights = offline_gpt2.make_offline_gpt2("gpt2-tiny", tmp_path / "tiny-seed1", seed=1)
    key, hit = train_key(_config(str(other_weights), tmp_path))
    assert not hit and key != keys["base"]
    key, hit = train_key(_config(tiny_gpt2, tmp_path, bf16=True))
    assert not hit and key != keys["base"]
    key, hit = train_key(_config(tiny_gpt2, tmp_path))  # and nothing was overwritten: the original still hits
    assert hit and key == keys["base"]


def test_fingerprint_ignores_lora_and_sees_every_base_weight(tiny_gpt2):
    base = model_lib.load_base_model(tiny_gpt2)
    plain = base_model_fingerprint(base)
    wrapped = model_lib.add_lora(base, model_lib.lora_config(base, r=4))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # a trained adapter
    assert base_model_fingerprint(wrapped) == plain
    with torch.no_grad():
        wrapped.base_model.model.transformer.h[1].mlp.c_fc.base_layer.weight[3, 5] += 1e-3
    assert base_model_fingerprint(wrapped) != plain


@pytest.mark.slow  # builds a trainer, scores files or runs pip: kept out of the one-minute set
def test_cache_file_is_complete_and_a_damaged_one_is_recomputed(tiny_gpt2, pairs, cache, tmp_path):
    trainer = build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    event = _events(trainer)["train"]
    path = cache / f"{event['key']}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        parts = json.loads(f.metadata()["key_parts"])
        assert len(f.get_tensor("ref_chosen_logps")) == len(pairs.train) == event["pairs"]
    assert parts["max_length"] == 48 and parts["precision"][1:3] == [False, False]  # no bf16/fp16 autocast
    assert not list(cache.glob(".*tmp"))

    path.write_bytes(path.read_bytes()[:100])  # e.g. a disk that filled up under another tool
    again = build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    assert not _events(again)["train"]["hit"]
    with safe_open(str(path), framework="pt") as f:
        assert len(f.get_tensor("ref_rejected_logps")) == len(pairs.train)
