"""The paper's categorical-policy simulation (Section 5.1 / Fig. 2; paper-notes Sec. 4).

A softmax policy ``p = softmax(z)`` over A actions, of which the first C are correct (index 0 is the
"anchor"). Rewards are +1 for correct and -1 for incorrect actions. Each step draws N actions with
replacement from p, mean-centres their rewards (``r_j = R_j - mean R``, no std), scales the update by
the focal weight ``g = (1 - mu_hat) ** gamma`` (mu_hat = fraction of the N samples that are correct)
and ascends one of two surrogates with one of two optimizers. The parameters are the logits z.

Surrogates (the paper leaves the choice open; both are implemented):

* ``prob``:    J = (1/N) sum_j r_j p_{a_j}      (appendix / theory's Eq. 5)
               dJ/dz = (1/N) sum_j r_j p_{a_j} (e_{a_j} - p)
* ``logprob``: J = (1/N) sum_j r_j log p_{a_j}  (what GRPO ascends)
               dJ/dz = (1/N) sum_j r_j (e_{a_j} - p) = (1/N) sum_j r_j e_{a_j}   (sum_j r_j = 0)

Optimizers: ``sgd`` (plain gradient ascent, ``z += lr * g * dJ/dz``) and ``adam`` (torch.optim.Adam
semantics with its defaults betas = (0.9, 0.999), eps = 1e-8, weight decay 0, applied to ascent;
the focal weight scales the gradient fed to Adam).

Everything works on count vectors: the N samples enter only through ``counts[a]`` = number of times
action a was drawn, so one step costs O(A + N) with no Python loop over actions or samples. Rows of
a ``[S, A]`` batch are independent runs (different gammas and seeds advance together).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .advantages import focal_weight

__all__ = [
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

SURROGATES = ("prob", "logprob")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class CategoricalSetup:
    """The bandit: A actions, the first C correct (index 0 = anchor), and the initial logits.

    Paper defaults: A = 128,000, C = 10,000, anchor logit 5.0, other correct 3.0, incorrect 0.0
    (initial correct mass ~0.63), rewards +1 / -1.
    """

    num_actions: int = 128_000
    num_correct: int = 10_000
    anchor_logit: float = 5.0
    correct_logit: float = 3.0
    incorrect_logit: float = 0.0
    reward_correct: float = 1.0
    reward_incorrect: float = -1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_actions, int) or self.num_actions < 2:
            raise ValueError(f"num_actions must be an int >= 2, got {self.num_actions!r}")
        if not isinstance(self.num_correct, int) or not 1 <= self.num_correct < self.num_actions:
            raise ValueError(
                f"num_correct must be an int in [1, num_actions - 1] = [1, {self.num_actions - 1}], "
                f"got {self.num_correct!r}"
            )
        for name in ("anchor_logit", "correct_logit", "incorrect_logit", "reward_correct", "reward_incorrect"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        if not self.reward_correct > self.reward_incorrect:
            raise ValueError("reward_correct must exceed reward_incorrect")

    def initial_logits(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[A]`` initial logits: anchor (index 0), other correct (1..C-1), incorrect (C..A-1)."""
        z = torch.full((self.num_actions,), float(self.incorrect_logit), dtype=dtype)
        z[: self.num_correct] = float(self.correct_logit)
        z[0] = float(self.anchor_logit)
        return z

    def action_rewards(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[A]`` reward of each action (+1 correct / -1 incorrect by default)."""
        r = torch.full((self.num_actions,), float(self.reward_incorrect), dtype=dtype)
        r[: self.num_correct] = float(self.reward_correct)
        return r

    def correct_mask(self) -> torch.Tensor:
        """``[A]`` bool, True on the correct actions."""
        m = torch.zeros(self.num_actions, dtype=torch.bool)
        m[: self.num_correct] = True
        return m


def _check_surrogate(surrogate: str) -> None:
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


def _centred_counts(counts: torch.Tensor, action_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cr, n)``: cr[a] = counts[a] * (R_a - mean_j R_{a_j}) = sum_j r_j [a_j = a], and n = N per row."""
    n = counts.sum(dim=-1, keepdim=True)
    if bool((n <= 0).any()):
        raise ValueError("counts must contain at least one sample per row")
    mean_reward = (counts * action_rewards).sum(dim=-1, keepdim=True) / n  # mean R over the N samples
    return counts * (action_rewards - mean_reward), n


def surrogate_objective(
    logits: torch.Tensor, counts: torch.Tensor, action_rewards: torch.Tensor, surrogate: str
) -> torch.Tensor:
    """Surrogate J per row (differentiable reference for :func:`surrogate_gradient`).

    Args:
        logits: ``[S, A]`` (or ``[A]``).
        counts: same shape, how often each action was drawn (N = row sum > 0); treated as data.
        action_rewards: ``[A]`` reward of each action.
        surrogate: ``"prob"`` -> (1/N) sum_j r_j p_{a_j}; ``"logprob"`` -> (1/N) sum_j r_j log p_{a_j}.

    Returns:
        ``[S]`` (or 0-d for 1-d input).
    """
    _check_surrogate(surrogate)
    cr, n = _centred_counts(counts.to(logits.dtype), action_rewards.to(logits.dtype))
    f = torch.softmax(logits, dim=-1) if surrogate == "prob" else torch.log_softmax(logits, dim=-1)
    return (cr * f).sum(dim=-1) / n.squeeze(-1)


def surrogate_gradient(
    logits: torch.Tensor,
    counts: torch.Tensor,
    action_rewards: torch.Tensor,
    surrogate: str,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Analytic dJ/dz of :func:`surrogate_objective`, same shape as ``logits``.

    ``prob``: ``p * (cr - <cr, p>) / N``; ``logprob``: ``cr / N`` (the ``-p * sum_j r_j`` term is
    identically zero because the centred rewards sum to zero). ``cr[a] = sum_j r_j [a_j = a]``.
    ``probs`` = softmax(logits) may be passed to avoid recomputing it.
    """
    _check_surrogate(surrogate)
    cr, n = _centred_counts(counts.to(logits.dtype), action_rewards.to(logits.dtype))
    return _gradient_from_centred(logits, cr, 1.0 / n, surrogate, probs)


def _gradient_from_centred(
    logits: torch.Tensor,
    cr: torch.Tensor,
    scale: torch.Tensor,
    surrogate: str,
    probs: torch.Tensor | None,
) -> torch.Tensor:
    """dJ/dz times the per-row factor ``scale`` ([S, 1]; 1/N, or g/N with the focal weight).

    Consumes ``cr`` (it is overwritten for the prob surrogate, to save a pass over [S, A]).
    """
    if surrogate == "logprob":
        return cr.mul_(scale)
    p = torch.softmax(logits, dim=-1) if probs is None else probs
    s = (cr * p).sum(dim=-1, keepdim=True)  # sum_j r_j p_{a_j}
    return cr.sub_(s).mul_(p).mul_(scale)


def binary_centred_counts(
    counts: torch.Tensor, num_correct: int, reward_correct: float, reward_incorrect: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast ``(cr, X)`` for two-valued rewards with the correct actions first (one pass over [S, A]).

    ``cr[a] = counts[a] * (R_a - mean R)`` exactly as in the general path, and ``X`` ([S, 1]) is the
    number of correct samples. ``counts`` is float ``[S, A]``.
    """
    n = counts.sum(dim=-1, keepdim=True)
    x = counts[:, :num_correct].sum(dim=-1, keepdim=True)
    mean_reward = (x * reward_correct + (n - x) * reward_incorrect) / n
    cr = torch.empty_like(counts)
    torch.mul(counts[:, :num_correct], reward_correct - mean_reward, out=cr[:, :num_correct])
    torch.mul(counts[:, num_correct:], reward_incorrect - mean_reward, out=cr[:, num_correct:])
    return cr, x


def sample_counts(
    probs: torch.Tensor,
    num_samples: int,
    generators: Sequence[torch.Generator | None],
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Draw ``num_samples`` actions with replacement from each row of ``probs`` and count them.

    Inverse-CDF sampling against a float64 cumulative sum (so that actions with probability ~1e-6
    keep their exact share near cdf ~ 1), one uniform stream per row.

    Args:
        probs: ``[S, A]`` non-negative rows (normalised up to rounding).
        num_samples: N >= 1.
        generators: S torch generators (or None for the global one), one per row.
        dtype: dtype of the returned counts (int64, or a float dtype to feed the gradient directly;
            float32 counts are exact up to 2**24 samples).

    Returns:
        ``[S, A]`` counts, each row summing to N.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [S, A], got {tuple(probs.shape)}")
    S, A = probs.shape
    if len(generators) != S:
        raise ValueError(f"need one generator per row: got {len(generators)} for S = {S}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = torch.empty(S, num_samples, dtype=torch.float64)
    for row, gen in enumerate(generators):
        u[row].uniform_(0.0, 1.0, generator=gen)
    u.mul_(cdf[:, -1:])  # rows may sum to 1 -/+ rounding: scale the draws into [0, total)
    # right=True: P(idx = a) = P(cdf[a-1] <= u < cdf[a]) = p_a, and zero-mass actions are never hit.
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=A - 1)
    idx += torch.arange(S, dtype=idx.dtype).unsqueeze(-1) * A
    idx = idx.view(-1)
    if dtype.is_floating_point:
        # Scatter straight into float counts: O(A) zero-fill + O(N), no int64 [S, A] detour.
        ones = torch.ones(idx.numel(), dtype=dtype)
        return torch.zeros(S * A, dtype=dtype).index_add_(0, idx, ones).view(S, A)
    return torch.bincount(idx, minlength=S * A).view(S, A).to(dtype)


@dataclass
class AdamState:
    """Adam moments for ascent on a ``[S, A]`` parameter (torch.optim.Adam conventions)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int = 0

    @classmethod
    def zeros_like(cls, params: torch.Tensor) -> AdamState:
        return cls(torch.zeros_like(params), torch.zeros_like(params), 0)


def adam_ascent_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    state: AdamState,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One in-place Adam step that ASCENDS ``grad`` (== torch.optim.Adam(maximize=True), wd 0).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    params <- params + lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """
    b1, b2 = betas
    state.step += 1
    state.exp_avg.lerp_(grad, 1.0 - b1)
    state.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    bias_correction1 = 1.0 - b1**state.step
    bias_correction2_sqrt = math.sqrt(1.0 - b2**state.step)
    denom = (state.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    params.addcdiv_(state.exp_avg, denom, value=lr / bias_correction1)


def positive_mass(probs: torch.Tensor, num_correct: int) -> torch.Tensor:
    """Q_pos = total probability of the correct actions (the first ``num_correct``), shape ``[...]``."""
    return probs[..., :num_correct].sum(dim=-1)


def retained_positive_mass(p0: torch.Tensor, pt: torch.Tensor, num_correct: int) -> torch.Tensor:
    """M_ret = 1 - sum_{a correct} max(0, p0(a) - pt(a)) / sum_{a correct} p0(a) (paper-notes Sec. 4).

    ``p0``: ``[A]`` initial policy; ``pt``: ``[..., A]``. 1 means no correct action lost mass; low
    values mean the correct mass concentrated on a few actions while the rest were forgotten.
    """
    p0c = p0[:num_correct].to(pt.dtype)
    lost = (p0c - pt[..., :num_correct]).clamp(min=0.0).sum(dim=-1)
    return 1.0 - lost / p0c.sum()


@dataclass
class SimulationResult:
    """Outcome of :func:`simulate` for one (surrogate, optimizer, N): arrays indexed [gamma, seed].

    ``record_steps`` lists the steps t (updates applied) at which ``q_pos_traj`` / ``m_ret_traj``
    (shape ``[len(record_steps), n_gammas, n_seeds]``) were taken; the last one is ``steps``.
    """

    num_samples: int
    gammas: list[float]
    seeds: list[int]
    surrogate: str
    optimizer: str
    steps: int
    q_pos: np.ndarray
    m_ret: np.ndarray
    q_pos_init: float
    record_steps: list[int] = field(default_factory=list)
    q_pos_traj: np.ndarray | None = None
    m_ret_traj: np.ndarray | None = None
    wall_seconds: float = 0.0


def simulate(
    setup: CategoricalSetup,
    num_samples: int,
    *,
    gammas: Sequence[float] = (0.0, 1.0),
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 1000,
    lr: float = 1e-2,
    surrogate: str = "prob",
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    dtype: torch.dtype = torch.float32,
    record_every: int = 0,
) -> SimulationResult:
    """Run the categorical simulation for one N, all ``gammas`` x ``seeds`` batched as rows.

    Row ``i * len(seeds) + j`` is (gammas[i], seeds[j]). Rows with the same seed share a random
    stream (``torch.Generator().manual_seed(seed)``): common random numbers across gamma, so the
    gamma comparison is paired. Logits and optimizer state use ``dtype``: float32 keeps the
    full-size Adam sweep fast, but plain SGD at lr 1e-2 makes logit updates of ~1e-8, below float32
    resolution at a logit of 3 (ulp 2.4e-7), so SGD needs float64 to move at all. Sampling always
    uses a float64 CDF, and Q_pos / M_ret are always evaluated from a float64 softmax (a float32
    sum over 10,000 correct probabilities is only good to ~1e-5).

    Returns a :class:`SimulationResult` with final Q_pos / M_ret and, when ``record_every > 0``,
    trajectories every ``record_every`` steps (plus step 0 and the last step).
    """
    _check_surrogate(surrogate)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples (N) must be an int >= 1, got {num_samples!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    gammas = [float(g) for g in gammas]
    seeds = [int(s) for s in seeds]
    if not gammas or not seeds:
        raise ValueError("gammas and seeds must be non-empty")
    for gamma in gammas:
        focal_weight(torch.zeros(1), gamma)  # validates gamma >= 0 with the shared error message

    t0 = time.perf_counter()
    C = setup.num_correct
    n_g, n_s = len(gammas), len(seeds)
    S = n_g * n_s
    z0 = setup.initial_logits(dtype)
    p0 = torch.softmax(z0.double(), dim=-1)
    logits = z0.unsqueeze(0).repeat(S, 1)
    generators = [torch.Generator().manual_seed(s) for _ in gammas for s in seeds]
    adam = AdamState.zeros_like(logits) if optimizer == "adam" else None

    record_steps: list[int] = []
    q_traj: list[np.ndarray] = []
    m_traj: list[np.ndarray] = []

    def metrics(z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        p = torch.softmax(z.double(), dim=-1)  # float64 metrics whatever the simulation dtype
        q = positive_mass(p, C).view(n_g, n_s).numpy().copy()
        m = retained_positive_mass(p0, p, C).view(n_g, n_s).numpy().copy()
        return q, m

    def record(t: int) -> None:
        q, m = metrics(logits)
        record_steps.append(t)
        q_traj.append(q)
        m_traj.append(m)

    for t in range(steps):
        probs = torch.softmax(logits, dim=-1)
        if record_every > 0 and t % record_every == 0:
            record(t)
        counts = sample_counts(probs, num_samples, generators, dtype=dtype)
        cr, x = binary_centred_counts(counts, C, setup.reward_correct, setup.reward_incorrect)
        mu_hat = x.squeeze(-1) / num_samples  # fraction of the N samples that are correct
        g = torch.cat([focal_weight(mu_hat[i * n_s : (i + 1) * n_s], gammas[i]) for i in range(n_g)])
        # F-GRPO: the whole update of a group is scaled by g (paper-notes Sec. 1): grad = g * dJ/dz.
        grad = _gradient_from_centred(logits, cr, (g / num_samples).unsqueeze(-1), surrogate, probs)
        if adam is None:
            logits.add_(grad, alpha=lr)  # plain gradient ascent
        else:
            adam_ascent_step(logits, grad, adam, lr, betas, adam_eps)

    if record_every > 0:
        record(steps)
    q_final, m_final = metrics(logits)
    return SimulationResult(
        num_samples=num_samples,
        gammas=gammas,
        seeds=seeds,
        surrogate=surrogate,
        optimizer=optimizer,
        steps=steps,
        q_pos=q_final,
        m_ret=m_final,
        q_pos_init=float(positive_mass(p0, C)),
        record_steps=record_steps,
        q_pos_traj=np.stack(q_traj) if q_traj else None,
        m_ret_traj=np.stack(m_traj) if m_traj else None,
        wall_seconds=time.perf_counter() - t0,
    )


def summarize(result: SimulationResult) -> dict[str, float]:
    """Seed-mean final Q_pos and M_ret per gamma: ``{"q_pos[gamma=g]": ..., "m_ret[gamma=g]": ...}``."""
    out: dict[str, float] = {}
    for i, g in enumerate(result.gammas):
        out[f"q_pos[gamma={g:g}]"] = float(result.q_pos[i].mean())
        out[f"m_ret[gamma={g:g}]"] = float(result.m_ret[i].mean())
    return out
