"""Benchmark: the data path at full hh-rlhf scale on this machine.

    python benchmarks/data_scale.py                      # 160,800 pairs (hh-rlhf's size), max_length 512
    python benchmarks/data_scale.py --pairs 20000 --max-length 256 --json results/data_scale.json

Writes a temporary .jsonl.gz of N raw hh-rlhf rows made by repeating the real sample
(../shared/data/hh-rlhf/harmless-base.jsonl.gz); every copy's rows are made unique by a marker (" [copy 17]")
appended to the first human message of both `chosen` and `rejected`, so histories still match and no pair is a
duplicate. The file is written by a child process, so neither its time nor its memory counts below. Then, in this
process, it times the path users run:

    load      data.load_preferences(path): read + parse + clean + seeded split
    tokens    prepare.clean_tokens(data, GPT-2 tokenizer, DPOConfig(max_length)): TRL's own tokenization of the pairs
              (DPOTrainer._prepare_dataset, its chat template) and the checks on its token ids

and prints seconds and pairs/s per stage, the cleaning report, and the process's peak RSS (getrusage ru_maxrss:
the kernel's high-water mark for this process, imports included; the target is < 60 s and < 4 GB in all).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSISTANT = "\n\nAssistant:"


def mark(text: str, marker: str) -> str:
    """The transcript with `marker` at the end of its first human message (before the first assistant turn)."""
    cut = text.find(ASSISTANT)
    return text + marker if cut < 0 else text[:cut] + marker + text[cut:]


def write_file(sample: Path, out: Path, pairs: int) -> None:
    """`pairs` raw rows: copies of the sample, each copy's rows marked with its copy number."""
    with gzip.open(sample, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=1) as f:
        for i in range(pairs):
            row, marker = rows[i % len(rows)], f" [copy {i // len(rows)}]"
            f.write(json.dumps({side: mark(row[side], marker) for side in ("chosen", "rejected")}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=160_800, help="pairs in the file (hh-rlhf has 160,800 train)")
    ap.add_argument("--max-length", type=int, default=512, help="max_length of the token-level checks")
    ap.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    ap.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)  # the child process that makes the file
    args = ap.parse_args()

    from dpo_pipeline.args import shared_data_dir
    from dpo_pipeline.runs import write_json_atomic
    from table import markdown  # this folder

    sample = shared_data_dir() / "hh-rlhf" / "harmless-base.jsonl.gz"
    if args.write_only:
        return write_file(sample, args.write_only, args.pairs)

    with tempfile.TemporaryDirectory(prefix="data_scale-") as tmp:
        path = Path(tmp) / f"hh-rlhf-x{args.pairs}.jsonl.gz"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-only", str(path), "--pairs", str(args.pairs)], check=True)
        make_s = time.perf_counter() - t0

        from dpo_pipeline import data
        from dpo_pipeline.model import load_tokenizer
        from dpo_pipeline.prepare import clean_tokens, tokenization_args

        tokenizer = load_tokenizer("offline:gpt2-tiny")  # the real GPT-2 tokenizer, with its Human/Assistant template
        dpo_args = tokenization_args(args.max_length)
        rss_start = peak_rss_mb()  # imports (torch, transformers, datasets) and the tokenizer
        (t0, c0) = time.perf_counter(), time.process_time()
        prefs = data.load_preferences(str(path))
        (t1, c1) = time.perf_counter(), time.process_time()
        checked = clean_tokens(prefs, tokenizer, dpo_args)
        (t2, c2) = time.perf_counter(), time.process_time()
        rss_peak = peak_rss_mb()
        file_mb = path.stat().st_size / 2**20

    stages = {"load": t1 - t0, "tokens": t2 - t1, "total": t2 - t0}
    cpu = {"load": c1 - c0, "tokens": c2 - c1, "total": c2 - c0}  # CPU seconds, all threads: less noisy
    report = checked.report
    result = {
        "pairs": args.pairs, "max_length": args.max_length, "file_mb": round(file_mb, 1),
        "make_file_s": round(make_s, 2), "seconds": {k: round(v, 2) for k, v in stages.items()},
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "pairs_per_s": {k: round(args.pairs / v) for k, v in stages.items()},
        "peak_rss_mb": round(rss_peak), "rss_after_imports_mb": round(rss_start),
        "report": report.as_dict(),
        "machine": {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu_model(),
                    "python": platform.python_version()},
    }

    print(f"\n{args.pairs:,} pairs, max_length {args.max_length}, file {file_mb:.0f} MB (made in {make_s:.1f} s, "
          f"not counted); {len(os.sched_getaffinity(0))} CPUs: {cpu_model()}\n")
    print(markdown([{"stage": name, "seconds": f"{s:.2f}", "pairs/s": f"{args.pairs / s:,.0f}",
                     "CPU seconds": f"{cpu[name]:.2f}"} for name, s in stages.items()]))
    print(f"\npeak RSS {rss_peak:,.0f} MB (after imports and tokenizer: {rss_start:,.0f} MB)\n")
    print(report)
    verdict = "within" if stages["total"] < 60 and rss_peak < 4096 else "OVER"
    print(f"\ntarget < 60 s and < 4096 MB: {verdict}")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
