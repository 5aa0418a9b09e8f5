"""dpo_pipeline: preference-tune small causal LMs with DPO (TRL + LoRA + 4-bit), one module per stage.

args      the settings (TRL's DPOConfig and ModelConfig + RunArguments), the profiles (recipes), the precedence rule
data      load and clean preference pairs (hh-rlhf, UltraFeedback, local files); synthetic: a learnable set
prepare   the data a run uses, in the model's prompt format (chat_template); model: tokenizer, base, 4-bit, LoRA
pipeline  run(settings): one DPO run with TRL's DPOTrainer, evaluated, written to its run folder (runs, tracking)
refcache  reference log-probs cached on disk across runs; evaluate, judge, stats: what DPO changed, with intervals
generation, behaviour, doctor  answers drawn alike for any model; how the answers changed; a run's failure signatures
speed     the speed levers, opt-in (packing, token-sized forwards, the CPU LM head); trl_private: TRL privates used
sweep, search  grids and searches of runs (one Optuna study), the best run; workbook, report: its workbook, plots
hub, card, export, hf  push an adapter with its model card, merge it, the Hub plumbing; chat: load an adapter
cli, errors, __main__  `python -m dpo_pipeline train|sweep|evaluate|export`; one-line user errors
Offline stand-in models (`offline:` names) live in offline_models/, the known-answer experiment in experiments/,
the Streamlit app's chat and blind votes in app/.
"""

import logging
import os
import warnings

# Quiet a bitsandbytes notice on CPU about an optional kernels package it cannot fetch offline.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers 5 renames gradient_checkpointing in v6; TRL still passes the old name. Not actionable for users.
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
