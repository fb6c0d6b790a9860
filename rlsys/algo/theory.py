"""Closed-form group-size theory of the paper (Lemma 3.1; paper-notes Sec. 4).

A prompt with success probability ``mu`` and a rare correct subset E of mass ``tau`` (0 < tau < mu)
is sampled N times. The group-relative update is *active* when 0 < X < N correct rollouts. The
tail-miss probability is the chance that the update is active but no rollout lands in E, i.e. the
policy is pushed towards the common correct modes while E's probability is pushed down.
"""

from __future__ import annotations

import numpy as np

__all__ = ["active_probability", "tail_miss_probability"]

ArrayLike = int | float | np.ndarray


def _as_group_sizes(n: ArrayLike) -> np.ndarray:
    arr = np.asarray(n)
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise ValueError(f"n must be integer group sizes >= 1, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)) or np.any(arr < 1):
        raise ValueError(f"n must be integer group sizes >= 1, got {arr}")
    return arr.astype(np.float64)


def _as_prob(name: str, x: ArrayLike) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a finite probability, got {x}")
    return arr


def _finish(out: np.ndarray, scalar: bool) -> float | np.ndarray:
    # Rounding can leave e.g. P(1) = 0 at -1e-17; the exact value is a probability in [0, 1].
    out = np.clip(out, 0.0, 1.0)
    return float(out) if scalar else out


def active_probability(mu: ArrayLike, n: ArrayLike) -> float | np.ndarray:
    """P(0 < X < n) = ``1 - mu**n - (1 - mu)**n`` for X ~ Binomial(n, mu) (Lemma 3.1).

    Args:
        mu: success probability in [0, 1], scalar or array broadcastable with ``n``.
        n: group size(s), integers >= 1, scalar or array.

    Returns:
        python float for scalar inputs, else a float64 array of the broadcast shape.
    """
    n_arr = _as_group_sizes(n)
    mu_arr = _as_prob("mu", mu)
    if np.any(mu_arr < 0) or np.any(mu_arr > 1):
        raise ValueError(f"mu must lie in [0, 1], got {mu}")
    scalar = n_arr.ndim == 0 and mu_arr.ndim == 0
    out = 1.0 - mu_arr**n_arr - (1.0 - mu_arr) ** n_arr
    return _finish(np.asarray(out, dtype=np.float64), scalar)


def tail_miss_probability(mu: ArrayLike, tau: ArrayLike, n: ArrayLike) -> float | np.ndarray:
    """P(active and no rollout in E) = ``(1 - tau)**n - (mu - tau)**n - (1 - mu)**n`` (Lemma 3.1).

    Non-monotone in n: small groups are rarely active, large groups almost surely hit E. Example
    (paper): mu = 0.3, tau = 0.03 gives P(2) ~ 0.378, P(8) ~ 0.726 (the peak over powers of two),
    P(32) ~ 0.377, P(128) ~ 0.020.

    Args:
        mu: success probability of the prompt, ``tau < mu <= 1``.
        tau: mass of the rare correct subset E, ``0 < tau < mu``.
        n: group size(s), integers >= 1 (scalar or array; mu/tau broadcast against it).

    Returns:
        python float for scalar inputs, else a float64 array of the broadcast shape.

    Raises:
        ValueError: unless ``0 < tau < mu <= 1`` and every n is an integer >= 1.
    """
    n_arr = _as_group_sizes(n)
    mu_arr = _as_prob("mu", mu)
    tau_arr = _as_prob("tau", tau)
    if np.any(tau_arr <= 0) or np.any(tau_arr >= mu_arr) or np.any(mu_arr > 1):
        raise ValueError(
            f"need 0 < tau < mu <= 1 (tau = mass of the rare correct subset inside mu), got mu={mu}, tau={tau}"
        )
    scalar = n_arr.ndim == 0 and mu_arr.ndim == 0 and tau_arr.ndim == 0
    out = (1.0 - tau_arr) ** n_arr - (mu_arr - tau_arr) ** n_arr - (1.0 - mu_arr) ** n_arr
    return _finish(np.asarray(out, dtype=np.float64), scalar)
