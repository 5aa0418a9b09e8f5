"""Pushing an adapter to the Hub: the real huggingface_hub client against a loopback double of the Hub's HTTP API.

The client runs in subprocesses with HF_ENDPOINT pointing at the double (set before huggingface_hub is imported)
and a private, empty HF_HOME, so no saved login or cache of the machine takes part.
"""

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from dpo_pipeline.card import build_model_card
from dpo_pipeline.hub import push_adapter
from hub_double import TOKEN, USER, HubDouble, make_tiny_adapter

ROOT = Path(__file__).resolve().parents[1]
INFERENCE_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "run_config.json", "record.json"}
PUSH = "import sys; from dpo_pipeline.hub import push_adapter; print(push_adapter(sys.argv[1], sys.argv[2]{kw}))"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A tiny adapter folder plus what a Trainer may leave beside it, which must not be uploaded."""
    folder = make_tiny_adapter(tmp_path_factory.mktemp("run") / "adapter")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "training_args.bin").write_bytes(b"args")
    return folder


@pytest.fixture(scope="module")
def hub():
    with HubDouble() as double:
        yield double


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def run_client(code: str, *args, endpoint: str, home: Path, token: str | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python whose huggingface_hub talks to `endpoint`, with its own empty HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.slow  # starts a process
def test_push_then_download_by_repo_id_loads_the_same_adapter(hub, adapter, tmp_path):
    before = folder_hash(adapter)
    pushed = run_client(PUSH.format(kw=", private=False"), adapter, f"{USER}/tiny-dpo", endpoint=hub.url,
                        home=tmp_path / "hf-push", token=TOKEN)
    line = one_line(pushed)
    repo = hub.repos[f"{USER}/tiny-dpo"]
    assert line.startswith("Pushed 7 files to new public repo dpo-tester/tiny-dpo: ")
    assert line.endswith(f"{hub.url}/{USER}/tiny-dpo/commit/{repo.sha}")
    assert folder_hash(adapter) == before  # the local adapter is only read

    # Only what inference needs went up; the card replaced peft's template README.
    assert set(repo.files) == INFERENCE_FILES and not repo.private
    for name in INFERENCE_FILES - {"README.md"}:
        assert repo.files[name] == (adapter / name).read_bytes(), name
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.library_name == "peft" and {"trl", "dpo", "lora", "peft"} <= set(card.data.tags)
    assert card.data.base_model is None and "`offline:gpt2-tiny`" in card.text  # not a Hub id: named in the body
    assert "## Training configuration" in card.text and "| beta | 0.1 |" in card.text
    assert "| rewards/accuracies | 0.55 |" in card.text and "PeftModel.from_pretrained" in card.text

    # A fresh process with an empty cache downloads it by repo id (public: no token) and loads it with peft.
    code = """
import sys, torch
from huggingface_hub import snapshot_download
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from dpo_pipeline.model import load_base_model
path = snapshot_download(sys.argv[1])
model = PeftModel.from_pretrained(load_base_model("offline:gpt2-tiny"), path)
pushed, loaded = load_file(sys.argv[2]), get_peft_model_state_dict(model)
assert pushed.keys() == loaded.keys() and all(torch.equal(pushed[k], loaded[k]) for k in pushed), "weights differ"
ids = torch.tensor([[15496, 995, 318]])
with torch.no_grad():
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, base), "the adapter is a no-op"
print(f"loaded {len(pushed)} tensors, identical to the pushed ones")
"""
    loaded = run_client(code, f"{USER}/tiny-dpo", adapter / "adapter_model.safetensors", endpoint=hub.url,
                        home=tmp_path / "hf-pull")
    assert one_line(loaded) == "loaded 16 tensors, identical to the pushed ones"  # 2 layers x 4 modules x (A, B)

    # Pushing again goes to the same repo as a new commit.
    again = one_line(run_client(PUSH.format(kw=""), adapter, f"{USER}/tiny-dpo", endpoint=hub.url,
                                home=tmp_path / "hf-push", token=TOKEN))
    assert again.startswith("Pushed 7 files to existing public repo") and len(repo.commits) == 2

    # The token is nowhere: not in the output, the uploaded files, or anything written locally.
    outputs = pushed.stdout + pushed.stderr + loaded.stdout + loaded.stderr
    assert TOKEN not in outputs
    assert not [name for name, data in repo.files.items() if TOKEN.encode() in data]
    written = [p for p in [*tmp_path.rglob("*"), *adapter.rglob("*")] if p.is_file()]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]


@pytest.mark.slow  # starts a process
def test_private_push_of_a_bare_name_goes_to_the_token_owner(hub, adapter, tmp_path):
    line = one_line(run_client(PUSH.format(kw=", private=True"), adapter, "tiny-private", endpoint=hub.url,
                               home=tmp_path / "hf", token=TOKEN))
    assert line.startswith(f"Pushed 7 files to new private repo {USER}/tiny-private: ")
    assert hub.repos[f"{USER}/tiny-private"].private
    url = f"{hub.url}/{USER}/tiny-private/resolve/main/adapter_config.json"
    with pytest.raises(urllib.error.HTTPError) as denied:  # anonymous readers do not see a private repo
        urllib.request.urlopen(url, timeout=5)
    assert denied.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert json.loads(urllib.request.urlopen(request, timeout=5).read())["peft_type"] == "LORA"


@pytest.mark.slow  # starts a process
def test_missing_token_is_skipped_in_one_line_and_leaves_the_adapter_untouched(hub, adapter, tmp_path):
    before, served = folder_hash(adapter), len(hub.log)
    line = one_line(run_client(PUSH.format(kw=""), adapter, f"{USER}/no-token", endpoint=hub.url,
                               home=tmp_path / "hf"))
    assert line.startswith(f"Not pushing to {USER}/no-token: no Hugging Face token;") and "HF_TOKEN" in line
    assert folder_hash(adapter) == before and f"{USER}/no-token" not in hub.repos and len(hub.log) == served


@pytest.mark.slow  # starts a process
def test_unreachable_hub_is_skipped_in_one_line(adapter, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proc = run_client(PUSH.format(kw=""), adapter, f"{USER}/offline", endpoint=closed, home=tmp_path / "hf",
                      token=TOKEN)
    line = one_line(proc)
    assert line.startswith(f"Not pushing to {USER}/offline: the Hugging Face Hub ({closed}) cannot be reached")
    assert TOKEN not in proc.stdout + proc.stderr


@pytest.mark.slow  # starts a process
def test_rejected_token_or_namespace_fails_in_one_line_without_echoing_it(hub, adapter, tmp_path):
    wrong = "hf_" + secrets.token_hex(17)  # not the double's token
    proc = run_client(PUSH.format(kw=""), adapter, f"{USER}/wrong-token", endpoint=hub.url, home=tmp_path / "hf",
                      token=wrong)
    line = one_line(proc)
    assert line.startswith(f"Push to {USER}/wrong-token failed: the Hub rejected the token (401)")
    assert wrong not in proc.stdout + proc.stderr and f"{USER}/wrong-token" not in hub.repos
    # A valid token but someone else's namespace: refused by the Hub, one line.
    line = one_line(run_client(PUSH.format(kw=""), adapter, "someone-else/adapter", endpoint=hub.url,
                               home=tmp_path / "hf", token=TOKEN))
    assert line.startswith("Push to someone-else/adapter failed: the token has no write access")


@pytest.mark.slow  # starts a process
def test_run_files_holding_the_token_are_not_pushed(hub, adapter, tmp_path):
    folder = tmp_path / "leaky"
    shutil.copytree(adapter, folder)
    record = json.loads((folder / "record.json").read_text())
    (folder / "record.json").write_text(json.dumps({**record, "env": {"HF_TOKEN": TOKEN}}))
    proc = run_client(PUSH.format(kw=""), folder, f"{USER}/leaky", endpoint=hub.url, home=tmp_path / "hf",
                      token=TOKEN)
    assert one_line(proc) == f"Not pushing to {USER}/leaky: record.json contain(s) your HF token; remove it from " \
                             "the run files first"
    assert TOKEN not in proc.stdout + proc.stderr and f"{USER}/leaky" not in hub.repos  # nothing was created
    # A token that would reach the card through sweep_rows: refused too, before the repo is created.
    kw = ", sweep_rows=[{'run': 'r1', 'note': __import__('os').environ['HF_TOKEN']}]"
    proc = run_client(PUSH.format(kw=kw), adapter, f"{USER}/leaky-card", endpoint=hub.url, home=tmp_path / "hf",
                      token=TOKEN)
    assert one_line(proc) == f"Not pushing to {USER}/leaky-card: the model card would contain your HF token (from " \
                             "sweep_rows or base_eval)"
    assert TOKEN not in proc.stdout + proc.stderr and f"{USER}/leaky-card" not in hub.repos


@pytest.mark.parametrize("repo_id", ["my adapter", "a/b/c", "user/--bad..name", "x" * 200])
def test_bad_repo_id_fails_in_one_line_before_any_network(adapter, repo_id, capsys):
    result = push_adapter(adapter, repo_id, token="hf_unused")
    assert result.status == "failed" and result.message.startswith(f"Not pushing: bad repo id {repo_id!r}: ")
    assert "\n" not in result.message and capsys.readouterr().out == ""


def test_no_repo_id_or_no_adapter_is_one_line(adapter, tmp_path):
    skipped = push_adapter(adapter, None)
    assert skipped.status == "skipped" and "\n" not in skipped.message and str(adapter) in skipped.message
    failed = push_adapter(tmp_path, f"{USER}/empty", token="hf_unused")
    assert failed.status == "failed" and "has no LoRA adapter" in failed.message


def test_card_for_a_hub_base_links_base_model_dataset_base_eval_and_sweep(adapter, tmp_path):
    folder = tmp_path / "best"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                            "openai-community/gpt2"}))
    (folder / "cleaning_report.json").write_text(json.dumps({"source": "Anthropic/hh-rlhf", "kept": 400}))
    sweep = [{"run": "lr1e-4", "learning_rate": 1e-4, "beta": 0.1,
              "final_eval": {"loss": 0.61, "rewards/accuracies": 0.7}, "log_history": [{"step": 1}]},
             {"run": "lr5e-5|b", "learning_rate": 5e-5, "beta": 0.1,
              "final_eval": {"loss": 0.65, "rewards/accuracies": 0.6}}]
    card = build_model_card(folder, f"{USER}/best", sweep_rows=sweep, base_eval={"loss": 0.6931},
                            license="apache-2.0")
    assert card.data.base_model == "openai-community/gpt2" and card.data.datasets == ["Anthropic/hh-rlhf"]
    assert card.data.license == "apache-2.0" and card.data.library_name == "peft"
    text = str(card)
    assert "| TRL eval metric | final | best (step 2) |" in text and "| loss | 0.68 | 0.68 |" in text
    assert "| metric | DPO adapter | base model |" in text and "| loss | — | 0.6931 |" in text
    assert "| run | learning_rate | final_eval.loss | final_eval.rewards/accuracies |" in text
    sweep_section = text.split("## Sweep")[1].split("## How to use")[0]
    assert "| lr5e-5\\|b | 5e-05 | 0.65 | 0.6 |" in sweep_section  # a pipe in a value does not split the cell
    assert "log_history" not in sweep_section and "beta" not in sweep_section  # logs and shared values left out
    assert 'AutoPeftModelForCausalLM.from_pretrained("dpo-tester/best")' in text
    assert "output_dir" not in text  # a path on the training machine

    # A record with the held-out evaluation of the adapter and of the base model (pipeline.run writes both) shows them.
    record = json.loads((folder / "record.json").read_text())
    (folder / "record.json").write_text(json.dumps({
        **record, "evaluation": {"reward_accuracy": 0.9}, "data": "ignored.jsonl",
        "base_evaluation": {"reward_accuracy": 0.0, "logp_accuracy": 0.5}}))
    text = str(build_model_card(folder, f"{USER}/best"))
    assert "| reward_accuracy | 0.9 | 0 |" in text and "| logp_accuracy | — | 0.5 |" in text
