"""dpo_pipeline: preference-tune small causal LMs with DPO (TRL + LoRA + 4-bit), one module per stage.

config    RunConfig (every setting of a run), the profiles, the precedence rule
data      load and clean preference pairs (hh-rlhf, UltraFeedback, local files); synthetic: a learnable set
prepare   the data a run uses, in the model's prompt format; model: tokenizer, offline checkpoints, 4-bit, LoRA
pipeline  run(config): one DPO run with TRL's DPOTrainer, evaluated, written to its run folder (runs)
refcache  reference log-probs cached on disk across runs; evaluate, judge, stats: what DPO changed, with intervals
speed     the speed levers, opt-in (packing, token-sized forwards, the CPU LM head); trl_private: TRL privates used
generation  answers to prompts, the same draws for any model (for the judge and a sweep's samples)
sweep     grids of runs, resume after a crash, the best run; workbook, report: the Excel workbook and plots
hub, card, chat  push an adapter with its model card; load one for the Streamlit app
hf        local path, Hugging Face cache or Hub, and is the Hub up: the Hub plumbing the stages share
cli, errors      the command line; one-line user errors
"""

import logging
import os
import warnings

# Quiet a bitsandbytes notice on CPU about an optional kernels package it cannot fetch offline.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers 5 renames gradient_checkpointing in v6; TRL still passes the old name. Not actionable for users.
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
