"""Regenerate tests/data/workbook_records.json (a few minutes on CPU): `python tests/data/make_workbook_records.py`.

Three real tiny runs (learning rate and beta varied) with the first one's held-out evaluation and the base model's,
one failed record as the sweep writes it, samples with an edge-case text, and the Summary's dict: exactly what
`build_workbook` receives, so tests/test_workbook.py can check the workbook without training.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from dpo_pipeline.args import parse
from dpo_pipeline.evaluate import preference_eval
from dpo_pipeline.generation import generate_samples
from dpo_pipeline.model import load_base_model, load_tokenizer
from offline_models.gpt2 import make_offline_gpt2
from dpo_pipeline.pipeline import run
from dpo_pipeline.runs import RunRecord
from dpo_pipeline.synthetic import get_synthetic

OUT = Path(__file__).with_name("workbook_records.json")
RULE = "highest eval reward accuracy, then lowest eval loss"
EDGE_TEXT = "=1+1 looks like a formula\x07 and has a control character"


def make(tmp: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices gain nothing from a second thread and lose a lot on a busy CPU
    try:
        return _make(tmp)
    finally:
        torch.set_num_threads(threads)


def _make(tmp: Path) -> dict:
    tiny = str(make_offline_gpt2("gpt2-tiny", tmp / "tiny"))
    data = get_synthetic(n_pairs=48, seed=0)  # synthetic pairs only: no dataset text in the checked-in file
    records = []
    for i, (lr, beta) in enumerate([(1e-3, 0.1), (2e-4, 0.1), (1e-3, 0.5)]):
        config = parse(dict(model_name_or_path=tiny, load_in_4bit=False, max_steps=4, eval_steps=2,
                            logging_steps=1, max_length=48, per_device_train_batch_size=4, learning_rate=lr,
                            beta=beta, output_dir=str(tmp / f"r{i}")))
        record = run(config, data)
        record.run_id = f"run{i}-lr{lr:g}-beta{beta:g}"
        records.append(record)
    tokenizer = load_tokenizer(tiny)
    model = PeftModel.from_pretrained(load_base_model(tiny), records[0].adapter_path)
    scores = preference_eval(model, tokenizer, data.test, beta=0.1, max_length=48)
    records[0].evaluation = scores["adapter"]
    samples = generate_samples(model, tokenizer, list(data.test["prompt"][:2]), max_new_tokens=8)
    samples.append({"prompt": "edge case", "adapter (greedy)": EDGE_TEXT})
    failed = RunRecord(
        config=parse(dict(model_name_or_path=tiny, lora_r=2, output_dir=str(tmp / "bad"))).to_dict(),
        status="failed", train_pairs=0, eval_pairs=0, train_steps=0, final_train_loss=None, final_eval={},
        best_eval={}, log_history=[], wall_time_s=0.0, pairs_per_second=0.0, adapter_path="",
        error="ValueError: learning_rate must be positive", run_id="run3-failed")
    records = [r.to_dict() for r in records] + [failed.to_dict()]
    finished = records[:3]
    best = min(finished, key=lambda r: (-r["final_eval"]["rewards/accuracies"], r["final_eval"]["loss"]))
    summary = {"data": data.report.as_dict(), "model": finished[0]["model_info"],
               "sweep": {"grid": {"learning_rate": [1e-3, 2e-4], "beta": [0.1, 0.5]}, "max_steps": 4}}
    return {"records": records, "best_run_id": best["run_id"], "best_rule": RULE, "summary": summary,
            "samples": samples, "baseline": scores["base"]}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        text = json.dumps(make(Path(tmp)), indent=1, default=str)
        OUT.write_text(text.replace(tmp, "/tmp/workbook-records") + "\n")  # no machine-specific temp paths
    print(f"{OUT}: {OUT.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
