"""Shared fixtures: the real data files, and a private cache for offline checkpoints written by tests."""

import os
import sys
from pathlib import Path

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist runs a worker per core: one thread each (inherited by the commands the tests start), or the
    # workers' thread pools fight over the cores and every test runs several times slower
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): a worker per core on a CPU, up to 2 (the tests' models are tiny, so a test is mostly
    Python overhead that a second core halves); one on a GPU, where a test measures the device's free memory."""
    import torch

    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)

import pytest

from dpo_pipeline.args import shared_data_dir

HH_FILE = shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"
UF_FILE = shared_data_dir() / "ultrafeedback-style" / "dpo-en-demo.jsonl"
TEST_DATA = Path(__file__).parent / "data"
# app/ is a folder of scripts (the Streamlit page and its modules), not a package: `streamlit run` puts it on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A tiny random-weight GPT-2 checkpoint folder with the real tokenizer (what `offline:gpt2-tiny` makes)."""
    from offline_models.gpt2 import make_offline_gpt2

    return str(make_offline_gpt2("gpt2-tiny", tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def random_reward_model(tiny_gpt2, tmp_path_factory) -> str:
    """A decoder reward model folder with random weights (tiny GPT-2 + a fresh one-output head): real, arbitrary
    scores, the judge of the tests (none runs offline)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from dpo_pipeline.model import load_tokenizer

    folder = tmp_path_factory.mktemp("judge") / "random-rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=1).save_pretrained(folder)
    load_tokenizer(tiny_gpt2).save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    # The Hub is unreachable here; say so up front so nothing waits on network retries.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if "HF_ENDPOINT" not in os.environ:
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
