"""Reference log-probs cached on disk (refcache.py): miss then hit across runs that differ only in LoRA/optimizer
settings, values equal to a fresh computation, invalidation when a key part changes, atomic files, and a sweep whose
second run reuses the first run's reference. Real tiny GPT-2, real TRL trainer, no mocks."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from dpo_pipeline import model as model_lib
from dpo_pipeline.evaluate import completion_logps
from dpo_pipeline.refcache import REF_COLUMNS, CachedRefDPOTrainer, base_model_fingerprint, load_ref_logps
from dpo_pipeline.sweep import run_sweep
from dpo_pipeline.synthetic import get_synthetic
from dpo_pipeline.train import RunConfig, build_trainer


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
    return RunConfig(**{"model": model, "load_in_4bit": False, "lora_r": 8, "learning_rate": 1e-3, "batch_size": 8,
                        "max_steps": 2, "max_length": 48, "eval_steps": 2, "logging_steps": 1, "precision": "fp32",
                        "output_dir": str(tmp_path / "run"), **kw})


def _events(trainer):
    return {e["split"]: e for e in trainer.ref_cache_events}


@pytest.mark.slow  # builds trainers (reference precompute), trains
def test_miss_then_hit_across_lr_rank_seed_and_targets(tiny_gpt2, pairs, cache, tmp_path):
    first = build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    assert isinstance(first, CachedRefDPOTrainer) and first.args.precompute_ref_log_probs
    misses = _events(first)
    assert set(misses) == {"train", "eval"} and not any(e["hit"] for e in misses.values())
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted(f"{e['key']}.safetensors" for e in misses.values())  # atomic: no temp file left over
    rng_after_miss = torch.get_rng_state()

    # Another run of the same sweep: other learning rate, LoRA rank, LoRA targets and seed -> the same reference.
    second = build_trainer(_config(tiny_gpt2, tmp_path, learning_rate=5e-4, lora_r=4, seed=7,
                                   lora_targets=["c_attn"]), pairs)
    hits = _events(second)
    assert all(e["hit"] for e in hits.values())
    assert {s: e["key"] for s, e in hits.items()} == {s: e["key"] for s, e in misses.items()}
    assert sorted(p.name for p in cache.iterdir()) == files

    # A hit leaves the run exactly where a miss does (the precompute's DataLoader draws from the global RNG).
    build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    assert torch.equal(torch.get_rng_state(), rng_after_miss)

    # The loaded values equal a fresh computation ...
    train = second.train_dataset
    fresh_c, fresh_r = second._compute_ref_logps(train.remove_columns(list(REF_COLUMNS)), "train", 8, "fresh")
    assert not torch.isnan(fresh_c).any()
    loaded_c, loaded_r = (torch.tensor(train[c]) for c in REF_COLUMNS)
    assert torch.allclose(loaded_c, fresh_c, atol=1e-5) and torch.allclose(loaded_r, fresh_r, atol=1e-5)
    # ... also through TRL's own LM head path (refcache's lean one scores only the completion positions).
    second.LEAN_LM_HEAD = False
    trl_c, trl_r = second._compute_ref_logps(train.remove_columns(list(REF_COLUMNS)), "train", 8, "trl")
    second.LEAN_LM_HEAD = True
    assert torch.allclose(trl_c, fresh_c, atol=1e-4) and torch.allclose(trl_r, fresh_r, atol=1e-4)
    # ... and the base model's own log-probs of the completions, computed independently (evaluate.py).
    model = second.model
    with model.disable_adapter():
        independent = completion_logps(model, second.processing_class, list(pairs.train["prompt"]), list(pairs.train["chosen"]),
                                       48, batch_size=8)
    assert torch.allclose(loaded_c.double(), independent.double(), atol=1e-3), (loaded_c[:4], independent[:4])

    # Training on the cached values works, with no reference forward in the steps.
    second.train()
    assert second.state.global_step == 2 and "loss" in second.state.log_history[0]
    assert second.ref_rows_computed_in_steps == 0


@pytest.mark.slow  # trains
def test_a_short_run_computes_only_the_rows_it_trains_on(tiny_gpt2, pairs, cache, tmp_path):
    eager = build_trainer(_config(tiny_gpt2, tmp_path, precompute_ref=True), pairs)
    reference = torch.tensor([eager.train_dataset[c] for c in REF_COLUMNS])  # every row, computed up front
    for f in cache.iterdir():
        f.unlink()

    short = _config(tiny_gpt2, tmp_path, max_steps=1)  # 8 of the 16 pairs: "lazy"
    first = build_trainer(short, pairs)
    assert _events(first)["train"]["mode"] == "lazy" and _events(first)["train"]["cached"] == 0
    assert not (cache / f"{_events(first)['train']['key']}.safetensors").exists()  # nothing computed up front
    first.train()
    assert first.ref_rows_computed_in_steps == 8
    stored = load_ref_logps(cache / f"{_events(first)['train']['key']}.safetensors",
                            first._ref_tables[0]["parts"], len(pairs.train))
    known = ~torch.isnan(stored).any(dim=0)
    assert int(known.sum()) == 8
    assert torch.allclose(stored[:, known], reference[:, known], atol=1e-4)  # the same values as the eager pass

    again = build_trainer(dataclasses.replace(short, learning_rate=3e-4), pairs)  # the sweep's next run
    assert _events(again)["train"]["cached"] == 8
    again.train()
    assert again.ref_rows_computed_in_steps == 0  # same seed, same batches: all found in the cache


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
    other_weights = model_lib.make_offline_gpt2("gpt2-tiny", tmp_path / "tiny-seed1", seed=1)
    key, hit = train_key(_config(str(other_weights), tmp_path))
    assert not hit and key != keys["base"]
    key, hit = train_key(_config(tiny_gpt2, tmp_path, precision="bf16"))
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


def test_cache_file_is_complete_and_a_damaged_one_is_recomputed(tiny_gpt2, pairs, cache, tmp_path):
    trainer = build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    event = _events(trainer)["train"]
    path = cache / f"{event['key']}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        parts = json.loads(f.metadata()["key_parts"])
        assert len(f.get_tensor("ref_chosen_logps")) == len(pairs.train) == event["pairs"]
    assert parts["max_length"] == 48 and parts["precision"]["autocast"] == "no"
    assert not list(cache.glob(".*tmp"))

    path.write_bytes(path.read_bytes()[:100])  # e.g. a disk that filled up under another tool
    again = build_trainer(_config(tiny_gpt2, tmp_path), pairs)
    assert not _events(again)["train"]["hit"]
    with safe_open(str(path), framework="pt") as f:
        assert len(f.get_tensor("ref_rejected_logps")) == len(pairs.train)


@pytest.mark.slow  # builds trainers (reference precompute), trains
def test_sweep_reuses_the_reference_across_runs(tiny_gpt2, pairs, cache, tmp_path, capsys):
    base = _config(tiny_gpt2, tmp_path)
    configs = [dataclasses.replace(base, learning_rate=lr, output_dir=str(tmp_path / "runs" / name))
               for lr, name in ((1e-3, "a"), (2e-4, "b"))]
    records = run_sweep(configs, pairs)
    assert [r["status"] for r in records] == ["finished", "finished"], [r.get("error") for r in records]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reference log-probs")]
    assert [("hit" if "cache hit" in line else "miss") for line in lines] == ["miss", "miss", "hit", "hit"], lines
    assert len(list(cache.glob("*.safetensors"))) == 2
