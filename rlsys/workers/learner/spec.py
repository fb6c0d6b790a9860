"""What every learner rank is built from: :class:`LearnerSpec` (identical on every rank) and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlsys.choices import AGG_MODES, COMPUTE_DTYPES, LOSS_TYPES

__all__ = ["DTYPES", "LearnerSpec"]

# The dtypes a learner computes in (model.dtype "auto" is resolved before a spec is built).
DTYPES = COMPUTE_DTYPES


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner rank needs, identical on every rank.

    ``lr`` is the peak learning rate: linear warmup over ``warmup_steps`` applied optimizer steps
    (step k, 0-based, uses ``lr * min(1, (k + 1) / warmup_steps)``), then constant. ``grad_clip``
    is the global-norm clip (0 disables). ``eps`` is AdamW's epsilon. ``weight_decay`` applies to
    matrices only (biases and norm weights are not decayed). ``logprob_chunk_tokens``: tokens per
    chunk when turning hidden states into log-probs (0: auto, ~256 MiB of float32 logits).
    ``logprob_micro_batch_size``: rows per forward pass when computing log-probs without grad (pi_old,
    the reference policy, :meth:`Learner.compute_logprobs`); 0: ``micro_batch_size``. No activations
    are kept there, so it can be larger, and under ZeRO-3 fewer forwards mean fewer gathers.
    ``gather_bytes``: ZeRO-3 weight export gathers parameters in groups of about this size.
    """

    model_path: str
    zero_stage: int = 2
    dtype: str = "bfloat16"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    loss_type: str = "grpo"
    clip_low: float | None = None
    clip_high: float | None = None
    agg: str = "token_mean"
    token_sum_constant: float | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float | None = None  # importance correction vs the behaviour policy (config.importance_correction)
    tis_mode: str = "truncate"  # truncate | mask (rlsys.algo.losses.policy_loss)
    dual_clip: float | None = None  # algo.dual_clip
    seed: int = 0
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # model.trust_remote_code: run the checkpoint's own modelling code
    logprob_chunk_tokens: int = 0
    logprob_micro_batch_size: int = 0
    gather_bytes: int = 256 * 1024 * 1024
    dist_timeout_s: float = 1800.0

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix for any invalid value."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"LearnerSpec.{name}={getattr(self, name)!r}: {why}")

        if not self.model_path:
            bad("model_path", "give a Hugging Face checkpoint directory")
        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", "DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose one of {DTYPES}")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"choose one of {LOSS_TYPES}")
        if self.agg not in AGG_MODES:
            bad("agg", f"choose one of {AGG_MODES}")
        if self.agg == "seq_mean_token_sum_norm" and not (self.token_sum_constant or 0) > 0:
            bad(
                "token_sum_constant",
                "agg='seq_mean_token_sum_norm' needs a positive constant (e.g. the max response length)",
            )
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.micro_batch_size < 1:
            bad("micro_batch_size", "must be >= 1")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        for name in ("weight_decay", "grad_clip", "kl_coef", "entropy_coef"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                bad(name, "must be finite and >= 0")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap >= 1):
            bad("tis_cap", "must be a finite number >= 1 (or None for off)")
        if self.tis_mode not in ("truncate", "mask"):
            bad("tis_mode", "choose truncate or mask")
        if self.dual_clip is not None and not (math.isfinite(self.dual_clip) and self.dual_clip > 1):
            bad("dual_clip", "must be a finite number > 1 (or None for off)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.logprob_chunk_tokens < 0:
            bad("logprob_chunk_tokens", "must be >= 0 (0 = auto)")
        if self.logprob_micro_batch_size < 0:
            bad("logprob_micro_batch_size", "must be >= 0 (0 = micro_batch_size)")
        if self.gather_bytes <= 0:
            bad("gather_bytes", "must be > 0")


def _lr_factor(warmup_steps: int, step: int) -> float:
    """Linear warmup then constant: the factor for the ``step``-th (0-based) applied step."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
