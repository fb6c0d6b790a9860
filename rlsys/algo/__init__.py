"""Pure math core of rlsys: F-GRPO advantages, policy losses, chunked LM-head log-probs, pass@k, theory
and the categorical sim.

Only torch, numpy and the standard library are imported here, so every function can be unit-tested
without Ray, vLLM or DeepSpeed. Shapes follow ``[B, G]`` (prompts x rollouts) for rewards and
``[N, T]`` (rows x tokens) for token-level tensors.
"""

from .advantages import (
    GroupStats,
    dynamic_sampling_mask,
    focal_weight,
    group_advantages,
    group_success_rate,
)
from .categorical import (
    OPTIMIZERS,
    SURROGATES,
    AdamState,
    CategoricalSetup,
    SimulationResult,
    adam_ascent_step,
    binary_centred_counts,
    positive_mass,
    retained_positive_mass,
    sample_counts,
    simulate,
    summarize,
    surrogate_gradient,
    surrogate_objective,
)
from .logprobs import LOGITS_CHUNK_BYTES, LogprobHead, auto_chunk_tokens, chunk_logprob_entropy, token_logprobs
from .losses import AGG_MODES, DEFAULT_CLIP, LOSS_TYPES, kl_k3, policy_loss
from .passk import pass_at_k, pass_at_k_curve
from .theory import active_probability, tail_miss_probability

__all__ = [
    # advantages
    "GroupStats",
    "focal_weight",
    "group_advantages",
    "group_success_rate",
    "dynamic_sampling_mask",
    # losses
    "LOSS_TYPES",
    "AGG_MODES",
    "DEFAULT_CLIP",
    "kl_k3",
    "policy_loss",
    # chunked LM-head log-probs
    "LOGITS_CHUNK_BYTES",
    "LogprobHead",
    "auto_chunk_tokens",
    "chunk_logprob_entropy",
    "token_logprobs",
    # pass@k
    "pass_at_k",
    "pass_at_k_curve",
    # theory
    "tail_miss_probability",
    "active_probability",
    # categorical simulation
    "SURROGATES",
    "OPTIMIZERS",
    "CategoricalSetup",
    "AdamState",
    "SimulationResult",
    "adam_ascent_step",
    "binary_centred_counts",
    "positive_mass",
    "retained_positive_mass",
    "sample_counts",
    "simulate",
    "summarize",
    "surrogate_gradient",
    "surrogate_objective",
]
