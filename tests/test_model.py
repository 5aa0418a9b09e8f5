"""Model stage: the real GPT-2 tokenizer, offline checkpoints, 4-bit NF4 loading, LoRA and the one-line errors."""

import json
from pathlib import Path

import pytest
import torch

from dpo_pipeline import model as model_lib
from offline_models import gpt2 as offline_gpt2
from dpo_pipeline.hf import hub_reachable


def test_tokenizer_is_the_real_gpt2_bpe():
    tok = offline_gpt2.gpt2_tokenizer()
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids for these words
    # A leading space merges with the word: why completions keep theirs.
    assert tok(" Sure")["input_ids"] == tok.convert_tokens_to_ids(["ĠSure"])
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_offline_checkpoint_is_an_ordinary_folder(tiny_gpt2):
    folder = Path(tiny_gpt2)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["n_layer"], config["vocab_size"]) == ("gpt2", 2, 50257)
    again = offline_gpt2.make_offline_gpt2("gpt2-tiny", folder)  # idempotent: reused, not rewritten
    assert again == folder
    tok = model_lib.load_tokenizer(tiny_gpt2)
    assert tok("Hello world")["input_ids"] == [15496, 995] and tok.pad_token is not None


def test_124m_shape_matches_gpt2_small():
    config = offline_gpt2.OFFLINE_SHAPES["gpt2-124m"]
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(**config)).parameters())
    assert 124_000_000 < n < 125_000_000


def test_4bit_nf4_turns_conv1d_into_linear4bit_and_lora_trains_only_the_adapter(tiny_gpt2):
    import bitsandbytes as bnb

    base = model_lib.load_base_model(tiny_gpt2, load_in_4bit=True)
    attn = base.transformer.h[0].attn.c_attn
    assert isinstance(attn, bnb.nn.Linear4bit) and attn.weight.quant_type == "nf4"
    lora = model_lib.lora_config(base, r=8, alpha=16, dropout=0.0)
    assert lora.fan_in_fan_out is False  # Linear4bit stores (out, in)
    policy = model_lib.add_lora(base, lora)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert targets == {"c_attn", "c_proj", "c_fc"}
    info = model_lib.describe_model(policy, "tiny")
    # r * (in + out) per adapted matrix: c_attn 64->192, attn.c_proj 64->64, c_fc 64->256, mlp.c_proj 256->64
    assert info["trainable_params"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    # The reference model is the same weights with the adapter off: disabling it changes the output back.
    ids = torch.tensor([[15496, 995, 318]], device=policy.device)  # a 4-bit model sits on the GPU under CUDA
    with torch.no_grad():
        for p in (p for n, p in policy.named_parameters() if "lora_B" in n):
            p.add_(0.5)
        with policy.disable_adapter():
            ref = policy(input_ids=ids).logits
        pol = policy(input_ids=ids).logits
        plain_base = model_lib.prepare_for_training(model_lib.load_base_model(tiny_gpt2, load_in_4bit=True))
        plain = plain_base(input_ids=ids).logits  # same 4-bit kernels as the policy (no CPU inference repacking)
    assert not torch.allclose(ref, pol)
    assert torch.allclose(ref, plain, atol=1e-5)


def test_full_precision_gpt2_uses_fan_in_fan_out(tiny_gpt2):
    base = model_lib.load_base_model(tiny_gpt2)
    assert type(base.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert model_lib.lora_config(base).fan_in_fan_out is True


def test_unreachable_hub_model_fails_in_one_line_and_names_the_offline_way(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    with pytest.raises(model_lib.ModelLoadError) as err:
        model_lib.load_base_model("openai-community/gpt2")
    message = str(err.value)
    assert "\n" not in message and "'openai-community/gpt2'" in message and "offline:gpt2-124m" in message
    hub_reachable.cache_clear()


def test_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(model_lib.ModelLoadError, match="without config.json"):
        model_lib.load_base_model(str(tmp_path))
    with pytest.raises(model_lib.ModelLoadError, match="Unknown offline model 'offline:gpt2-xxl'; choose one of"):
        model_lib.resolve_model_path("offline:gpt2-xxl")


@pytest.mark.slow  # builds a trainer, scores files or runs pip: kept out of the one-minute set
def test_random_twin_keeps_architecture_and_tokenizer_with_new_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_PIPELINE_CACHE", str(tmp_path / "cache"))
    real = offline_gpt2.make_offline_gpt2("gpt2-tiny", tmp_path / "real", seed=2)  # stands in for a trained model
    twin_name = model_lib.RANDOM_TWIN_PREFIX + str(real)
    twin, base = model_lib.load_base_model(twin_name), model_lib.load_base_model(str(real))
    assert twin.config.to_diff_dict() == base.config.to_diff_dict()
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert not torch.equal(twin.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    text = "Hello there, how are you?"
    assert model_lib.load_tokenizer(twin_name)(text)["input_ids"] == model_lib.load_tokenizer(str(real))(text)["input_ids"]
    assert model_lib.resolve_model_path(twin_name) == model_lib.resolve_model_path(twin_name)  # written once, reused
