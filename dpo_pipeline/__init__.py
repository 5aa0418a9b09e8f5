"""dpo_pipeline: preference-tune small causal LMs with DPO (TRL + LoRA + 4-bit), one module per stage.

data      load and clean preference pairs (hh-rlhf, UltraFeedback, local files) into prompt/chosen/rejected text
synthetic a deterministic preference set with a learnable rule, to prove the wiring
model     tokenizer, offline GPT-2 checkpoints, base model (4-bit NF4), LoRA
train     one DPO run with TRL's DPOTrainer, returning a run record
evaluate  held-out per-pair implicit rewards and generation samples, base vs adapter
sweep     grids of runs with durable per-run records, resume after a crash, the best run
workbook  the sweep's Excel workbook (openpyxl, native charts), rebuilt from run records
report    tables and plots
profiles  the notebook's named configurations (full / cpu / smoke / auto)
hub       Hub reachability and pushing an adapter with its model card (card)
chat      loading an adapter on its base and streaming answers, for the Streamlit app
"""

import logging
import os
import warnings

# Quiet a bitsandbytes notice on CPU about an optional kernels package it cannot fetch offline.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers 5 renames gradient_checkpointing in v6; TRL still passes the old name. Not actionable for users.
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
