"""Data-parallel training: `python -m dpo_pipeline train` under `accelerate launch` with two CPU processes.

`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15 (several CPU processes need
mpirun), so two CPU processes are launched the way a multi-GPU user launches two GPUs (`--multi_gpu`, torchrun
underneath) with CUDA hidden: the training code sees two ranks on the CPU (gloo), the same code path as on GPUs.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_pipeline.runs import RunRecord


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_one_adapter(tiny_gpt2, tmp_path):
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "dpo_pipeline", "train", "--profile", "smoke", "--model_name_or_path", tiny_gpt2, "--max_pairs", "80",
           "--max_eval_pairs", "16", "--validation_pairs", "0", "--judge", "none", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4",
           "--max_steps", "3", "--eval_steps", "3",
           "--logging_steps", "1", "--output_dir", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DPO_REF_CACHE": str(tmp_path / "ref_cache"),
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # Both ranks trained, on their own shard: 3 steps x batch 4 each, and DDP kept their adapters identical.
    ranks = {int(m["rank"]): m for m in re.finditer(
        r"rank (?P<rank>\d)/(?P<world>\d): trained (?P<steps>\d+) steps, (?P<pairs>\d+) pairs seen, "
        r"eval_loss=(?P<eval>\S+), lora_checksum=(?P<checksum>\S+)", proc.stdout)}
    assert sorted(ranks) == [0, 1], proc.stdout[-3000:]
    for m in ranks.values():
        assert (m["world"], m["steps"], m["pairs"]) == ("2", "3", "12")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were averaged across ranks
    # Evaluation metrics are gathered across the ranks: each rank saw half the eval split, both report the whole.
    assert ranks[0]["eval"] == ranks[1]["eval"] != "nan"

    # Exactly one adapter and one record, written by rank 0.
    assert sorted(p.parent for p in tmp_path.rglob("adapter_model.safetensors")) == [out]
    assert [p.parent for p in tmp_path.rglob("record.json")] == [out]
    assert (out / "run_config.json").exists() and (out / "cleaning_report.json").exists()
    record = RunRecord.load(out / "record.json")
    assert record.status == "finished" and record.train_steps == 3
    assert record.pairs_per_second > 0 and record.final_eval["loss"] == pytest.approx(float(ranks[0]["eval"]), abs=1e-6)
    assert record.eval_pairs == 16 and record.evaluation["pairs"] == 16  # the whole eval split, on rank 0
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 3
    # The reference log-probs were computed once, across both ranks, and stored once.
    assert len(list((tmp_path / "ref_cache").glob("*.safetensors"))) == 2
    assert "reference log-probs: cache miss" in proc.stdout
