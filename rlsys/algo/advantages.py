"""Group-relative advantages with the F-GRPO focal weight (paper-notes Sec. 1).

Shapes: ``[B, G]`` = B prompts x G rollouts per prompt. Everything here is pure torch and works on
whatever device the inputs live on; nothing carries gradient (rewards are data).

Choices the paper leaves open, made here and tested:

* the group standard deviation is the POPULATION std (``correction=0``), and ``eps = 1e-6`` is added
  to it, as in the common GRPO implementations;
* a group whose rewards are all identical gets exactly zero advantage (not ``0 / eps`` rounding
  noise), because its mean can differ from its members by one ulp;
* the success rate ``mu_hat`` that feeds the focal weight comes, in order of precedence, from the
  verifier's ``correct`` flags, an explicit ``success_threshold`` on the rewards, or (for binary
  {0, 1} rewards only) the reward mean ``X / G``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch
from numpy.typing import ArrayLike

__all__ = [
    "GroupStats",
    "focal_weight",
    "group_advantages",
    "group_success_rate",
    "dynamic_sampling_mask",
]

Number = int | float


@dataclass(frozen=True, eq=False)
class GroupStats:
    """Per-batch statistics of one :func:`group_advantages` call.

    Tensors (shape ``[B]``, on the rewards' device): ``success_rate`` (mu_hat per group),
    ``focal_weight`` (g per group), ``learnable`` (bool, the group's rewards are not all equal) and
    ``mixed`` (bool, 0 < X < G successes). The float fields are batch summaries; :meth:`as_dict`
    returns only those, as python floats, for logging.
    """

    success_rate: torch.Tensor
    focal_weight: torch.Tensor
    learnable: torch.Tensor
    mixed: torch.Tensor
    focal_weight_mean: float
    focal_weight_min: float
    focal_weight_max: float
    mixed_group_fraction: float
    all_correct_fraction: float
    all_wrong_fraction: float
    success_rate_mean: float
    learnable_fraction: float

    def as_dict(self) -> dict[str, float]:
        """The scalar summaries as ``{name: python float}`` (no tensors)."""
        return {
            "focal_weight_mean": self.focal_weight_mean,
            "focal_weight_min": self.focal_weight_min,
            "focal_weight_max": self.focal_weight_max,
            "mixed_group_fraction": self.mixed_group_fraction,
            "all_correct_fraction": self.all_correct_fraction,
            "all_wrong_fraction": self.all_wrong_fraction,
            "success_rate_mean": self.success_rate_mean,
            "learnable_fraction": self.learnable_fraction,
        }


def _check_gamma(gamma: Number) -> float:
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() != 1:
            raise ValueError(f"gamma must be a single number, got a tensor of shape {tuple(gamma.shape)}")
        gamma = gamma.item()
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise ValueError(f"gamma must be a real number >= 0, got {gamma!r}")
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0.0:
        raise ValueError(f"gamma must be finite and >= 0 (0 = plain GRPO, the paper uses 0.5 or 1.0), got {gamma}")
    return gamma


def focal_weight(success_rate: torch.Tensor | ArrayLike, gamma: Number) -> torch.Tensor:
    """F-GRPO focal weight ``g = (1 - success_rate) ** gamma`` (paper-notes Sec. 1).

    Args:
        success_rate: per-group empirical success rate mu_hat in [0, 1], any shape (usually ``[B]``);
            a tensor, numpy array, list or number. Non-float input is cast to the default float dtype.
        gamma: focusing exponent, ``gamma >= 0``. ``gamma == 0`` returns exactly ones (torch defines
            ``0 ** 0 == 1``), i.e. plain GRPO.

    Returns:
        Tensor with the shape, dtype and device of ``success_rate``.

    Raises:
        ValueError: ``gamma < 0`` or non-finite; ``success_rate`` outside [0, 1] or non-finite.
    """
    gamma = _check_gamma(gamma)
    s = torch.as_tensor(success_rate)
    if not s.is_floating_point():
        s = s.to(torch.get_default_dtype())
    if s.numel() > 0:
        if not bool(torch.isfinite(s).all()):
            raise ValueError("success_rate contains NaN/inf; it must be a fraction in [0, 1]")
        if bool((s < 0).any()) or bool((s > 1).any()):
            raise ValueError(f"success_rate must lie in [0, 1], got values in [{s.min().item()}, {s.max().item()}]")
    return torch.pow(1.0 - s, gamma)


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor of shape [B, G], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must have shape [B, G] (B prompts x G rollouts), got shape {tuple(rewards.shape)}; "
            "reshape flat rewards with rewards.view(B, G)"
        )
    B, G = rewards.shape
    if B == 0:
        raise ValueError("rewards has no groups (B == 0); pass at least one prompt's rollouts")
    if G < 2:
        raise ValueError(
            f"rewards has G == {G} rollout per prompt: a group-relative advantage needs a group "
            "baseline; sample at least 2 rollouts per prompt"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contains NaN/inf; fix the reward function before computing advantages")
    return rewards.detach()


def _check_correct(correct: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(correct, torch.Tensor):
        raise ValueError(f"correct must be a bool torch.Tensor of shape [B, G], got {type(correct).__name__}")
    if correct.shape != shape:
        raise ValueError(f"correct must have the rewards' shape {tuple(shape)}, got {tuple(correct.shape)}")
    if correct.dtype != torch.bool:
        if correct.is_floating_point() or correct.is_complex():
            raise ValueError(f"correct must be a bool tensor (the verifier's flag), got dtype {correct.dtype}")
        if bool(((correct != 0) & (correct != 1)).any()):
            raise ValueError("correct must hold only 0/1 (or True/False) flags")
        correct = correct.bool()
    return correct


def _is_binary(rewards: torch.Tensor) -> bool:
    return bool(((rewards == 0) | (rewards == 1)).all())


def group_success_rate(
    rewards: torch.Tensor,
    correct: torch.Tensor | None = None,
    success_threshold: Number | None = None,
) -> torch.Tensor:
    """Empirical success rate mu_hat = X / G of each group (paper-notes Sec. 1), shape ``[B]``.

    Precedence: ``correct`` (bool ``[B, G]``, the verifier's flag) -> ``success_threshold``
    (success = ``reward >= threshold``; an explicit threshold wins over auto-detection so that one
    run uses one definition even in batches whose rewards happen to be 0/1) -> binary {0, 1} rewards
    (success = reward). Non-binary rewards with neither flags nor threshold raise ValueError.
    Returned in the rewards' float dtype.
    """
    rewards = _check_rewards(rewards)
    return _success_rate(rewards, correct, success_threshold, required=True)


@overload
def _success_rate(
    rewards: torch.Tensor, correct: torch.Tensor | None, success_threshold: Number | None, required: Literal[True]
) -> torch.Tensor: ...
@overload
def _success_rate(
    rewards: torch.Tensor, correct: torch.Tensor | None, success_threshold: Number | None, required: bool
) -> torch.Tensor | None: ...
def _success_rate(
    rewards: torch.Tensor, correct: torch.Tensor | None, success_threshold: Number | None, required: bool
) -> torch.Tensor | None:
    if correct is not None:
        correct = _check_correct(correct, rewards.shape)
        return correct.to(rewards.dtype).mean(dim=-1)
    if success_threshold is not None:
        if isinstance(success_threshold, bool) or not isinstance(success_threshold, (int, float)):
            raise ValueError(f"success_threshold must be a number, got {success_threshold!r}")
        if not math.isfinite(float(success_threshold)):
            raise ValueError(f"success_threshold must be finite, got {success_threshold}")
        return (rewards >= float(success_threshold)).to(rewards.dtype).mean(dim=-1)
    if _is_binary(rewards):
        # Binary outcome rewards (R_c = 1, R_w = 0): mu_hat = mean R = X / G exactly.
        return rewards.mean(dim=-1)
    if required:
        raise ValueError(
            "rewards are not binary {0, 1}, so the success rate mu_hat is undefined: pass "
            "success_threshold=<reward counted as a success> (e.g. 1.0) or the verifier's "
            "correct=<bool [B, G]> flags"
        )
    return None


def group_advantages(
    rewards: torch.Tensor,
    gamma: Number = 0.0,
    std_normalize: bool = True,
    eps: float = 1e-6,
    success_threshold: Number | None = None,
    correct: torch.Tensor | None = None,
    estimator: str = "grpo",
    std: str = "population",
    std_scope: str = "group",
) -> tuple[torch.Tensor, GroupStats]:
    """F-GRPO advantages ``A_i^F = g(x) * A_i`` for a batch of groups (paper-notes Sec. 1).

    ``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)`` with the population std (``std_normalize=True``,
    GRPO) or ``A_i = R_i - mean_j R_j`` (``std_normalize=False``, Dr.GRPO). The focal weight
    ``g = (1 - mu_hat) ** gamma`` of each group multiplies its advantages after the normalisation;
    there is no renormalisation of ``g`` across the batch. ``gamma = 0`` is exactly GRPO.

    The peers' estimators (``estimator``), each times the same focal weight:

    * ``"rloo"`` (Ahmadian et al. 2024): ``A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean)``,
      the leave-one-out baseline; no std (``std_normalize`` must be False).
    * ``"maxrl"``: ``A_i = (R_i - mean) / mean``, an online difficulty weighting: a group the policy
      rarely solves (small mean) weighs more, the direction the focal weight also takes. Needs
      rewards >= 0 (success rewards); ``std_normalize`` must be False.

    GRPO's std (``std_normalize``): ``std="population"`` (correction 0, rlsys's default) or
    ``"sample"`` (Bessel, correction 1, as verl and TRL; advantages are ``sqrt((G-1)/G)`` times
    the population ones); ``std_scope="group"`` (each group's own) or ``"batch"`` (one std over all
    ``B * G`` rewards, TRL's ``scale_rewards="batch"``; the mean stays the group's).

    Args:
        rewards: float ``[B, G]``; row b holds the G rollouts' rewards of prompt b.
        gamma: focal exponent ``>= 0``.
        std_normalize: divide by ``std + eps`` (GRPO) or only mean-centre (Dr.GRPO).
        eps: added to the std, ``>= 0``.
        success_threshold: reward at or above which a rollout counts as a success; required for
            non-binary rewards unless ``correct`` is given (see :func:`group_success_rate`).
        correct: optional bool ``[B, G]`` verifier flags; preferred source of mu_hat.

    Returns:
        ``(advantages [B, G], stats)``; advantages have the rewards' dtype/device and no grad.
        Groups with identical rewards get exactly zero advantage.

    Raises:
        ValueError: wrong shape, ``G == 1``, non-finite rewards, ``gamma < 0``, ``eps < 0``,
            non-binary rewards without ``success_threshold``/``correct``.
    """
    rewards = _check_rewards(rewards)
    gamma = _check_gamma(gamma)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    if estimator not in ("grpo", "rloo", "maxrl"):
        raise ValueError(f"estimator must be 'grpo', 'rloo' or 'maxrl', got {estimator!r}")
    if std not in ("population", "sample"):
        raise ValueError(f"std must be 'population' or 'sample', got {std!r}")
    if std_scope not in ("group", "batch"):
        raise ValueError(f"std_scope must be 'group' or 'batch', got {std_scope!r}")
    if estimator != "grpo" and std_normalize:
        raise ValueError(f"estimator={estimator!r} does not divide by a std; pass std_normalize=False")
    if estimator == "maxrl" and bool((rewards < 0).any()):
        raise ValueError(
            "estimator='maxrl' divides by the group's mean reward and needs rewards >= 0 (success rewards)"
        )

    G = rewards.shape[1]
    mean = rewards.mean(dim=-1, keepdim=True)
    centred = rewards - mean
    # A group is degenerate ("not learnable") when all its rewards are equal: compare with the first
    # element instead of testing std == 0, because the float mean of equal values can be off by an ulp.
    learnable = (rewards != rewards[:, :1]).any(dim=-1)
    if estimator == "rloo":
        base = centred * (G / (G - 1))  # R_i - (sum_j R_j - R_i) / (G - 1)
    elif estimator == "maxrl":
        # A learnable group of rewards >= 0 has mean > 0; the others are zeroed below.
        base = centred / torch.where(learnable.unsqueeze(-1), mean, torch.ones_like(mean))
    elif std_normalize:
        correction = 0 if std == "population" else 1
        if std_scope == "group":
            sd = rewards.std(dim=-1, correction=correction, keepdim=True)
        else:
            sd = rewards.std(correction=correction).expand(rewards.shape[0], 1)
        denom = torch.where(learnable.unsqueeze(-1), sd + eps, torch.ones_like(sd))
        base = centred / denom
    else:
        base = centred
    base = torch.where(learnable.unsqueeze(-1), base, torch.zeros_like(base))

    success = _success_rate(rewards, correct, success_threshold, required=True)
    g = focal_weight(success, gamma)
    advantages = base * g.unsqueeze(-1)  # F-GRPO: A^F = g(x) * A, after normalisation (Sec. 1)

    mixed = (success > 0) & (success < 1)
    summary = torch.stack(
        [
            g.mean(),
            g.min(),
            g.max(),
            mixed.to(rewards.dtype).mean(),
            (success == 1).to(rewards.dtype).mean(),
            (success == 0).to(rewards.dtype).mean(),
            success.mean(),
            learnable.to(rewards.dtype).mean(),
        ]
    ).tolist()  # one host sync for all summaries
    stats = GroupStats(
        success_rate=success,
        focal_weight=g,
        learnable=learnable,
        mixed=mixed,
        focal_weight_mean=summary[0],
        focal_weight_min=summary[1],
        focal_weight_max=summary[2],
        mixed_group_fraction=summary[3],
        all_correct_fraction=summary[4],
        all_wrong_fraction=summary[5],
        success_rate_mean=summary[6],
        learnable_fraction=summary[7],
    )
    return advantages, stats


def dynamic_sampling_mask(
    rewards: torch.Tensor,
    correct: torch.Tensor | None = None,
    success_threshold: Number | None = None,
) -> torch.Tensor:
    """DAPO dynamic-sampling filter: bool ``[B]``, True for groups worth keeping.

    A group is kept when its outcomes are mixed, ``0 < X < G`` successes, with success defined as in
    :func:`group_success_rate` (flags, then threshold, then binary rewards). For non-binary rewards
    without flags or threshold there is no notion of success, so the filter falls back to "the
    group's rewards are not all equal" (non-zero reward std), which is exactly the set of groups
    that produce a non-zero group-relative advantage.

    Raises:
        ValueError: wrong shape, ``G == 1`` (no group can be mixed), non-finite rewards.
    """
    rewards = _check_rewards(rewards)
    success = _success_rate(rewards, correct, success_threshold, required=False)
    if success is None:
        return (rewards != rewards[:, :1]).any(dim=-1)
    return (success > 0) & (success < 1)
