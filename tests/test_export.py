"""Export: a LoRA adapter merged into its base is an ordinary transformers checkpoint with base+adapter's logits.

The adapters are made, not trained (hub_double.make_tiny_adapter: the tiny offline GPT-2 with random non-zero lora_B),
so the merged model must differ from the bare base. Logits are compared in fp32 on the device the machine has.
"""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_pipeline.__main__ import main as dpo_main
from dpo_pipeline.export import merge_adapter
from dpo_pipeline.hub import push_adapter
from dpo_pipeline.model import ModelLoadError, resolve_model_path
from hub_double import TOKEN, USER, HubDouble, make_tiny_adapter
from test_hub import one_line, run_client

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEXT = "\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers, or Mittens if it has white paws."


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder as pipeline.run leaves one: adapter, tokenizer, run_config.json naming offline:gpt2-tiny."""
    return make_tiny_adapter(tmp_path_factory.mktemp("export") / "adapter")


@pytest.fixture(scope="module")
def merged(run) -> Path:
    return merge_adapter(run)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def base_and_adapter(run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, fp32 logits of the bare base, fp32 logits of base+adapter through peft)."""
    ids = AutoTokenizer.from_pretrained(run)(TEXT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("offline:gpt2-tiny"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base.to(DEVICE), str(run))
    with model.disable_adapter():
        bare = logits(model, ids)
    return ids, bare, logits(model, ids)


def test_merged_checkpoint_loads_with_plain_transformers_and_matches_base_plus_adapter(run, merged):
    assert merged == run.resolve().with_name("adapter-merged")  # the default: a sibling <adapter>-merged
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not {n for n in names if n.startswith("adapter")}
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gpt2"

    model = AutoModelForCausalLM.from_pretrained(merged).to(DEVICE)  # plain transformers: no peft involved
    assert not isinstance(model, PeftModel) and model.dtype == torch.float32
    assert not [n for n, m in model.named_modules() if "lora" in n or type(m).__module__.startswith("peft")]
    assert not any("lora" in key for key in load_file(merged / "model.safetensors"))

    ids, bare, adapted = base_and_adapter(run)
    assert ids.shape[1] > 10
    diff = (logits(model, ids) - adapted).abs().max().item()
    print(f"max |merged - (base + adapter)| logit difference, fp32 on {DEVICE}: {diff:.3g}")
    assert diff < 1e-4
    assert (logits(model, ids) - bare).abs().max().item() > 0.1  # the adapter changed the model: the test can fail
    tokenizer = AutoTokenizer.from_pretrained(merged)  # the adapter folder's tokenizer came along
    assert tokenizer(TEXT).input_ids == ids[0].tolist()


def test_adapter_trained_on_a_4bit_base_merges_into_the_unquantized_base(tmp_path):
    run = make_tiny_adapter(tmp_path / "qlora", load_in_4bit=True, seed=1)
    out = merge_adapter(run, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out).to(DEVICE)
    ids, bare, adapted = base_and_adapter(run)
    assert (logits(model, ids) - adapted).abs().max().item() < 1e-4


def test_bfloat16_export_and_rewriting_an_existing_export(run, tmp_path):
    out = tmp_path / "bf16"
    assert merge_adapter(run, out, dtype="bfloat16") == out
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert merge_adapter(run, out, dtype="float32") == out  # replaced as a whole
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


def test_bad_adapters_and_outputs_are_one_line_user_errors(run, tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path} is not an adapter folder"):
        merge_adapter(tmp_path)
    other = make_tiny_adapter(tmp_path / "other", other_shape=dict(n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(ModelLoadError, match="does not fit base model 'offline:gpt2-tiny'"):
        merge_adapter(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="it holds the adapter"):
        merge_adapter(run, run.parent)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="Not overwriting"):
        merge_adapter(run, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="dtype must be one of"):
        merge_adapter(run, dtype="int8")


def export_command(capsys, *args) -> tuple[int, str, str]:
    """`python -m dpo_pipeline export ARGS` in this process (test_cli has the one subprocess test of exit codes)."""
    code = dpo_main(["export", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_exits_2_with_one_line_for_a_bad_adapter_and_merges_a_good_one(run, tmp_path, capsys):
    for args in ([tmp_path / "missing"], [run, "--dtype", "int8"]):  # a mistake in the folder, then in a flag
        code, out, err = export_command(capsys, *args)
        assert code == 2 and out == "", err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert str(args[0]) in lines[0] or "int8" in lines[0]
    full_precision = make_tiny_adapter(tmp_path / "fp32")  # both merges: the second cannot be, so neither is written
    code, out, err = export_command(capsys, full_precision, "--base-weights", "both")
    assert code == 2 and "not trained on a 4-bit base" in err and not (tmp_path / "fp32-merged").exists(), err
    code, out, err = export_command(capsys, run, "--out", tmp_path / "merged", "--dtype", "bfloat16")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"Merged {run} into its full-precision base model (bfloat16): {tmp_path / 'merged'}"
    assert lines[1].startswith("  full merge vs the adapter as served: max |logit gap|") and len(lines) == 2
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.slow  # starts a process
def test_push_sends_the_merged_model_to_its_own_repo_that_transformers_loads(run, merged, tmp_path):
    code = ("import sys; from dpo_pipeline.hub import push_adapter; "
            "print(push_adapter(sys.argv[1], sys.argv[2], merged_dir=sys.argv[3]))")
    with HubDouble() as hub:
        proc = run_client(code, run, f"{USER}/tiny-export", merged, endpoint=hub.url, home=tmp_path / "push",
                          token=TOKEN)
        line = one_line(proc)
        adapter_repo, merged_repo = hub.repos[f"{USER}/tiny-export"], hub.repos[f"{USER}/tiny-export-merged"]
        assert line.startswith(f"Pushed 7 files to new public repo {USER}/tiny-export: ")
        assert line.endswith(f"; the merged model ({len(list(merged.iterdir())) + 1} files) to new public repo "
                             f"{USER}/tiny-export-merged: {hub.url}/{USER}/tiny-export-merged/commit/{merged_repo.sha}")
        assert "adapter_config.json" in adapter_repo.files and "config.json" not in adapter_repo.files
        assert set(merged_repo.files) == {p.name for p in merged.iterdir()} | {"README.md"}
        for path in merged.iterdir():
            assert merged_repo.files[path.name] == path.read_bytes(), path.name
        card = ModelCard(merged_repo.files["README.md"].decode())
        assert card.data.library_name == "transformers" and "merged" in card.data.tags
        assert f'AutoModelForCausalLM.from_pretrained("{USER}/tiny-export-merged")' in card.text

        # A fresh process with an empty cache loads the merged repo by id with plain transformers.
        load = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
                "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
                "local = AutoModelForCausalLM.from_pretrained(sys.argv[2])\n"
                "ids = torch.tensor([[15496, 995, 318, 257, 1332]])\n"
                "with torch.no_grad():\n"
                "    assert torch.equal(model(input_ids=ids).logits, local(input_ids=ids).logits)\n"
                "print(type(model).__name__)")
        loaded = run_client(load, f"{USER}/tiny-export-merged", merged, endpoint=hub.url, home=tmp_path / "pull")
        assert one_line(loaded) == "GPT2LMHeadModel"
    assert TOKEN not in proc.stdout + proc.stderr + loaded.stdout + loaded.stderr
    assert not [n for repo in hub.repos.values() for n, data in repo.files.items() if TOKEN.encode() in data]


def test_push_with_a_folder_that_is_not_a_merged_checkpoint_fails_before_any_network(run, tmp_path):
    result = push_adapter(run, f"{USER}/x", token="hf_unused", merged_dir=run)
    assert result.status == "failed" and "is not a merged checkpoint" in result.message
    assert "\n" not in result.message and "python -m dpo_pipeline export" in result.message


@pytest.mark.slow  # answers and scores with three models: seconds each on a CPU
def test_a_4bit_run_merges_onto_its_dequantized_base_too_and_the_logit_gaps_say_which_matches_what_is_served(
        tmp_path):
    from dpo_pipeline.export import logit_gaps

    adapter = make_tiny_adapter(tmp_path / "adapter", load_in_4bit=True)
    full = merge_adapter(adapter)
    dequantized = merge_adapter(adapter, base_weights="dequantized")
    assert dequantized.name == "adapter-merged-dequantized" and (dequantized / "config.json").exists()
    gaps = logit_gaps(adapter, {"full": full, "dequantized": dequantized})
    # the app serves the 4-bit base + adapter: the merge onto those same weights reproduces it, the full-precision
    # base differs by NF4's rounding (what is left of the dequantized gap is the 4-bit kernels' compute precision)
    assert gaps["dequantized"]["max_abs"] < 0.02 and gaps["dequantized"]["top1_agreement"] == 1.0
    assert gaps["full"]["mean_abs"] > 3 * gaps["dequantized"]["mean_abs"], gaps
    with pytest.raises(ValueError, match="not trained on a 4-bit base"):
        merge_adapter(make_tiny_adapter(tmp_path / "fp32"), base_weights="dequantized")
