"""dpo_pipeline: preference-tune small causal LMs with DPO (TRL + LoRA + 4-bit), one module per stage.

data      load and clean preference pairs (hh-rlhf, UltraFeedback, local files) into prompt/chosen/rejected text
synthetic a deterministic preference set with a learnable rule, to prove the wiring
model     tokenizer, offline GPT-2 checkpoints, base model (4-bit NF4), LoRA
train     one DPO run with TRL's DPOTrainer, returning a run record
profiles  the notebook's named configurations (full / cpu / smoke / auto)
hub       Hugging Face Hub helpers
"""

import logging
import os
import warnings

# Quiet a bitsandbytes notice on CPU about an optional kernels package it cannot fetch offline.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers 5 renames gradient_checkpointing in v6; TRL still passes the old name. Not actionable for users.
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
