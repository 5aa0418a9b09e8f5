"""The benchmark command runs from a fresh clone and writes its report (timings are printed, never asserted here)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_command_writes_the_report_and_the_sweep_hits_the_reference_cache(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--quick", "--steps", "1", "--batch-size", "2",
         "--setups", "TRL-default,tuned", "--profile", "--out", str(out),
         # a row that switches the CPU LM head off; a GPU row can be named on a CPU, so it cannot fail on a lent
         # GPU for a reason a CPU would show
         "--levers", "tuned, TRL's CPU LM head;tuned, forwards of at most 2,048 tokens",
         "--model", "offline:gpt2-tiny"],  # TRL-default computes in bf16: ~70x slower than fp32 on a CPU without it
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "latest.json").read_text())
    assert len(list(out.glob("bench-*.json"))) == 1
    partial = json.loads((out / "partial.json").read_text())  # written row by row, so a run cut short keeps them
    assert set(partial["setups"]) == {"TRL-default", "tuned"} and "tuned, profiled" in partial["levers"]

    setups = report["setups"]
    assert set(setups) == {"TRL-default", "tuned"}
    for result in setups.values():
        assert result["steps"] == 1 and result["pairs"] == 2  # the same pairs for every setup
        assert result["pairs_per_s"] > 0 and result["peak_rss_mb"] > 0 and len(result["losses"]) == 1
        assert 0 <= result["padding_fraction"] < 1
    # packing runs each prompt once: fewer tokens for the same pairs, and none of them padding (one pair a forward)
    assert setups["tuned"]["settings"]["packing"] is True and setups["TRL-default"]["settings"]["packing"] is False
    assert setups["tuned"]["non_pad_tokens"] < setups["TRL-default"]["non_pad_tokens"]
    assert setups["tuned"]["padding_fraction"] == 0
    assert setups["TRL-default"]["settings"]["gradient_checkpointing"] is True  # TRL's default, as a user gets it
    assert setups["TRL-default"]["settings"]["precompute_ref_log_probs"] is False
    assert setups["tuned"]["settings"]["precompute_ref_log_probs"] is True

    # The sweep: the tuned run computes the reference log-probs, the next run (another learning rate) finds them.
    assert report["sweep"]["ref_cache_hits"] == [False, True]
    assert "target tuned_vs_trl" in proc.stdout and "| tuned |" in proc.stdout
    for row in ("tuned, TRL's CPU LM head", "tuned, forwards of at most 2,048 tokens"):
        assert report["levers"][row]["pairs"] == 2, report["levers"][row]
    # --profile: one more tuned run, its steps past warm-up recorded by torch.profiler
    profile = report["levers"]["tuned, profiled"]["profile"]
    assert profile["steps"] == 3 and profile["wall_ms_per_step"] > 0 and profile["cpu_ops_per_step"] > 100
    assert profile["item_calls_per_step"] >= 13  # TRL's metrics read ~13 values off the device every forward
    assert len(profile["top_ops"]) == 12 and "profiled 3 steps" in proc.stdout
    # the targets are checked from the rows: losses against TRL-default's step by step, the full sweep projected
    gap = max(abs(a - b) for a, b in zip(setups["tuned"]["losses"], setups["TRL-default"]["losses"]))
    assert report["targets"]["loss_gap_vs_trl"]["value"] == round(gap, 4)
    projection = report["sweep"]["full_projection"]
    assert projection["train_s_per_run"] == pytest.approx(16_000 / setups["tuned"]["pairs_per_s"], rel=0.01)
    # ... with what each of its runs evaluates, at the rates of a run evaluated the way a sweep_full.yaml run is
    evaluated = report["sweep"]["evaluated_run"]
    assert (evaluated["evaluations"], evaluated["eval_pairs"], evaluated["test_pairs"]) == (1, 8, 8)
    t = evaluated["timings_s"]
    assert t["evaluations"] > 0 and t["answers"] > 0 and t["held_out"] > 0 and evaluated["answers_s"] > 0
    per_run = (4 * (2000 * t["evaluations"] / 8 + t["answers"]) + 2000 * t["held_out"] / 8
               + 64 * evaluated["answers_s"] / evaluated["answer_prompts"])
    assert projection["evaluating_s_per_run"] == pytest.approx(per_run, abs=0.1)
    first = setups["tuned"]["reference_s_per_pair"] * (16_000 + 2000)  # the first run's reference, computed once
    assert projection["first_reference_s"] == pytest.approx(first, abs=0.1)
    minutes = (24 * (projection["train_s_per_run"] + projection["build_s_per_run"] + per_run) + first) / 60
    assert projection["minutes"] == pytest.approx(minutes, abs=0.2)
    assert projection["minutes"] > projection["training_only_minutes"]
    assert "sweep_full.yaml (24 runs x 1000 steps x 16 pairs), projected" in proc.stdout


@pytest.mark.slow
def test_eval_speed_command_scores_the_same_log_probs_both_ways(tmp_path):
    out = tmp_path / "eval_speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/eval_speed.py", "--pairs", "6", "--model", "offline:gpt2-tiny",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["pairs"] == 6 and report["max_abs_logp_difference"] < 1e-3
    assert report["packed"]["tokens_run"] < report["padded"]["tokens_run"]  # each prompt once, no padding
    assert report["packed_4x_batch"]["max_abs_logp_difference"] < 1e-3  # the eval_batch_size lever: same scores
    assert re.search(r"^\| packed +\| +[0-9.]+ \|", proc.stdout, re.M) and "faster" in proc.stdout  # its table row
