"""Training stage: DPO on the tiny offline GPT-2 learns the synthetic rule, and the run leaves a usable adapter."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from dpo_pipeline import cli, model as model_lib
from dpo_pipeline.synthetic import get_synthetic
from dpo_pipeline.args import ConfigError, machine_defaults, parse
from dpo_pipeline.pipeline import build_trainer, run
from dpo_pipeline.runs import RunRecord


@pytest.fixture(scope="module")
def synthetic():
    return get_synthetic(n_pairs=400, seed=0)


def test_synthetic_set_is_deterministic_and_varied(synthetic):
    again = get_synthetic(n_pairs=400, seed=0)
    assert synthetic.train.to_list() == again.train.to_list()
    assert get_synthetic(n_pairs=400, seed=1).train.to_list() != synthetic.train.to_list()
    prompts = {json.dumps(p) for p in synthetic.train["prompt"]}
    assert len(prompts) > 100  # many different prompts, not one repeated
    pairs = lambda split: {json.dumps([p, c]) for p, c in zip(split["prompt"], split["chosen"])}
    assert not pairs(synthetic.test) & pairs(synthetic.train)  # no leaked pairs


@pytest.mark.slow
def test_dpo_learns_the_rule_on_held_out_pairs(tiny_gpt2, synthetic, tmp_path):
    config = parse(dict(
        model_name_or_path=tiny_gpt2, load_in_4bit=True, lora_r=16, lora_alpha=32, learning_rate=1e-3,
        per_device_train_batch_size=1, gradient_accumulation_steps=8, max_steps=30, max_length=64, eval_steps=15,
        logging_steps=5, output_dir=str(tmp_path / "run"),
    ))
    record = run(config, synthetic)

    # Held-out implicit-reward accuracy: beta*log(pi/pi_ref) of chosen beats rejected on unseen pairs.
    assert record.eval_pairs == len(synthetic.test) > 50
    assert record.final_eval["rewards/accuracies"] >= 0.9, record.final_eval
    assert record.final_eval["rewards/margins"] > 0
    assert record.final_eval["loss"] < 0.69  # below log(2), the loss of a policy equal to its reference
    assert record.best_eval["step"] in (15, 30)
    assert record.train_steps == 30 and record.wall_time_s > 0 and record.pairs_per_second > 0
    assert [e["step"] for e in record.log_history if "eval_loss" in e] == [15, 30]

    out = Path(record.adapter_path)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.json",
                 "record.json", "cleaning_report.json"):
        assert (out / name).exists(), name
    assert not list(out.glob("checkpoint-*"))  # no optimizer-state checkpoints
    assert json.loads((out / "run_config.json").read_text())["learning_rate"] == 1e-3
    assert RunRecord.load(out / "record.json").final_eval == record.final_eval

    # The saved adapter reloads with peft onto a fresh base and is not a no-op.
    base = model_lib.load_base_model(tiny_gpt2, load_in_4bit=True)
    reloaded = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it
    ids = torch.tensor([[15496, 995, 318, 257]], device=reloaded.device)
    with torch.no_grad():
        with reloaded.disable_adapter():
            ref = reloaded(input_ids=ids).logits
        assert not torch.allclose(reloaded(input_ids=ids).logits, ref)


@pytest.mark.slow
def test_record_says_where_the_time_went_and_pairs_per_s_counts_training_only(tiny_gpt2, synthetic, tmp_path):
    # no evaluation while training: the run evaluates once after it (and answers the completion prompts then)
    config = parse(dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, per_device_train_batch_size=4, max_steps=3,
                        max_length=48, max_eval_pairs=16, eval_strategy="no", beta=0.5, learning_rate=1e-3,
                        output_dir=str(tmp_path / "run")))
    record = run(config, synthetic)
    # the beta TRL trained with is the beta of the held-out rewards: margin = beta x (chosen - rejected log-ratio)
    held_out = record.evaluation
    assert held_out["reward_margin"] == pytest.approx(
        0.5 * (held_out["chosen_logp_shift"] - held_out["rejected_logp_shift"]), rel=1e-4)
    assert held_out["reward_margin"] != 0
    [after] = [e for e in record.log_history if "eval_runtime" in e]
    t = record.timings_s
    # what came after training is not taken out of training's time
    assert t["training"] == pytest.approx(record.wall_time_s, abs=0.02)
    assert record.pairs_per_second == pytest.approx(3 * 4 / t["training"], rel=0.01)
    assert t["evaluations"] == pytest.approx(after["eval_runtime"], abs=0.02)
    assert t["held_out"] > 0 and t["judged"] == 0 and 0 < t["reference"] <= t["build"]
    parts = t["build"] + t["training"] + t["evaluations"] + t["answers"] + t["held_out"] + t["judged"]
    assert parts <= t["total"] + 0.05 and t["total"] - parts < 0.5 * t["total"]  # saving the adapter, the rest
    assert json.loads((tmp_path / "run" / "record.json").read_text())["timings_s"] == t


def test_optimizer_and_loss_type_reach_trl(tiny_gpt2, synthetic, tmp_path):
    config = parse(dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, optim="rmsprop", loss_type="ipo", beta=0.3,
                        learning_rate=1e-4, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                        max_steps=2, max_length=48, per_device_eval_batch_size=16, output_dir=str(tmp_path)))
    trainer = build_trainer(config, synthetic)
    # no-grad passes (reference precompute, evaluations) take per_device_eval_batch_size pairs a forward
    assert trainer.args.per_device_eval_batch_size == trainer.args.precompute_ref_batch_size == 16
    with pytest.raises(ConfigError, match="per_device_eval_batch_size"):
        config.replace(per_device_eval_batch_size=0)
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.RMSprop)
    assert trainer.args.loss_type == ["ipo"] and trainer.args.beta == 0.3
    # bf16 autocast by hardware: on a CPU only where it is native (emulated bf16 is ~3x slower)
    assert (trainer.args.bf16, trainer.args.fp16) == (machine_defaults()["bf16"], machine_defaults()["fp16"])
    assert trainer.args.gradient_checkpointing is False
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (1, 4)


@pytest.mark.slow
def test_a_judge_that_cannot_load_keeps_the_trained_run(tiny_gpt2, synthetic, tmp_path):
    config = parse(dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, per_device_train_batch_size=4, max_steps=1,
                        max_length=48, max_eval_pairs=4, judge=str(tmp_path / "no_judge"),
                        output_dir=str(tmp_path / "run")))
    record = run(config, synthetic)
    assert record.status == "finished" and "no_judge" in record.judged["error"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_max_steps_run_tokenizes_and_scores_only_the_pairs_it_trains_on(tiny_gpt2, synthetic, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("DPO_REF_CACHE", str(tmp_path / "ref_cache"))
    settings = dict(model_name_or_path=tiny_gpt2, load_in_4bit=False, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, max_steps=3, max_length=48, logging_steps=1, report_to="none",
                    log_completions=0, eval_strategy="no")
    trainer = build_trainer(parse({**settings, "output_dir": str(tmp_path / "a")}), synthetic)
    train = trainer.train_dataset
    assert len(train) == 3 * 4 < len(synthetic.train)  # 3 steps x 4 pairs, not the 320-pair split
    assert trainer.ref_cache_events[0] == {**trainer.ref_cache_events[0], "split": "train", "pairs": 12, "hit": False}
    rows = lambda split: [json.dumps(r) for r in zip(split["prompt"], split["chosen"], split["rejected"])]
    known, drawn = set(rows(synthetic.train)), rows(train)  # the conversational pairs, as given
    assert len(set(drawn)) == 12 and set(drawn) <= known
    assert drawn != rows(synthetic.train)[:12]  # drawn at random, not the first 12
    # Another seed and learning rate: the same pairs, so the reference cached by the first run is found.
    other = build_trainer(parse({**settings, "seed": 7, "learning_rate": 1e-3, "output_dir": str(tmp_path / "b")}),
                          synthetic)
    assert rows(other.train_dataset) == drawn
    assert other.ref_cache_events[0]["hit"]
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.epoch == pytest.approx(1.0)  # each pair once
    # A run by epochs (max_steps -1) gets the whole split.
    whole = build_trainer(parse({**settings, "max_steps": -1, "output_dir": str(tmp_path / "c")}), synthetic)
    assert len(whole.train_dataset) == len(synthetic.train)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_there_and_ends_as_if_never_stopped(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def flags(folder):
        return ["--profile", "smoke", "--output_dir", str(folder), "--max_steps", "24", "--save_steps", "4",
                "--eval_steps", "12", "--logging_steps", "2", "--judge", "none", "--log_completions", "0",
                "--load_in_4bit", "false", "--gradient_accumulation_steps", "4"]  # 4-bit is slow on a CPU

    env = {**os.environ, "DPO_RESULTS_DIR": str(tmp_path)}
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "dpo_pipeline", "train", *flags(killed)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoint-8" / "trainer_state.json").exists():  # two checkpoints written, 16 steps to go
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "record.json").exists()
    # the same command again, and once more uninterrupted: in this process (only the killed one needs its own)
    whole = tmp_path / "whole"
    assert cli.main(flags(killed)) == 0 and cli.main(flags(whole)) == 0

    resumed, uninterrupted = (json.loads((d / "record.json").read_text()) for d in (killed, whole))
    assert resumed["resumed_from_step"] >= 8 and uninterrupted["resumed_from_step"] is None
    logged = lambda record: [(e["step"], e.get("loss", e.get("eval_loss"))) for e in record["log_history"]
                             if "loss" in e or "eval_loss" in e]
    assert [s for s, _ in logged(resumed)] == [s for s, _ in logged(uninterrupted)] and resumed["train_steps"] == 24
    assert [v for _, v in logged(resumed)] == pytest.approx([v for _, v in logged(uninterrupted)], abs=1e-4)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (killed, whole))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not list(killed.glob("checkpoint-*")) and not list(whole.glob("checkpoint-*"))  # only the adapter stays
