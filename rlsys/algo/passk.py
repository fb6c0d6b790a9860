"""Unbiased pass@k estimator (Chen et al. 2021; paper-notes Sec. 3), numerically stable.

With n samples of a problem of which c are correct,
``pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)``.
The product is evaluated in log space (``sum log1p(-k / i)`` then ``-expm1``): no huge binomials,
full relative precision even when pass@k is tiny, and exact 1.0 when ``n - c < k``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["pass_at_k", "pass_at_k_curve"]

ArrayLike = int | float | np.ndarray | Iterable[int | float]


def _as_int_array(name: str, x: ArrayLike) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
        raise ValueError(f"{name} must hold whole numbers, got {arr}")
    return arr.astype(np.int64)


def pass_at_k(n: ArrayLike, c: ArrayLike, k: int) -> float | np.ndarray:
    """Unbiased pass@k per problem.

    Args:
        n: samples per problem, scalar or array (``n >= 1``).
        c: correct samples per problem, scalar or array broadcastable with ``n`` (``0 <= c <= n``).
        k: the k of pass@k, a python/numpy integer with ``1 <= k <= n`` for every problem.

    Returns:
        A python float when ``n`` and ``c`` are scalars, else a float64 array of their broadcast shape.

    Raises:
        ValueError: non-integer values, ``k < 1``, ``k > n``, ``n < 1``, ``c < 0`` or ``c > n``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_arr = _as_int_array("n", n)
    c_arr = _as_int_array("c", c)
    scalar = n_arr.ndim == 0 and c_arr.ndim == 0
    try:
        n_arr, c_arr = np.broadcast_arrays(n_arr, c_arr)
    except ValueError as exc:
        raise ValueError(f"n and c must have broadcastable shapes, got {n_arr.shape} and {c_arr.shape}") from exc
    if n_arr.size and np.any(n_arr < 1):
        raise ValueError(f"n must be >= 1 for every problem, got min n = {n_arr.min()}")
    if n_arr.size and np.any(c_arr < 0):
        raise ValueError(f"c must be >= 0, got min c = {c_arr.min()}")
    if n_arr.size and np.any(c_arr > n_arr):
        raise ValueError("c must be <= n for every problem (more correct than drawn samples)")
    if n_arr.size and np.any(k > n_arr):
        raise ValueError(f"k = {k} exceeds n = {n_arr.min()} for some problem; pass@k needs k <= n samples")

    out = np.ones(n_arr.shape, dtype=np.float64)
    # n - c < k: every k-subset contains a correct sample, pass@k = 1 exactly.
    finite = (n_arr - c_arr) >= k
    for n_val in np.unique(n_arr[finite]):
        # One cumulative log-product per distinct n (usually a single one in an evaluation):
        # L(c) = sum_{i=n-c+1}^{n} log1p(-k/i), i taken downwards from n. All i here satisfy i > k
        # whenever n - c >= k, so every term is finite and same-signed (no cancellation).
        i = np.arange(n_val, k, -1, dtype=np.float64)  # n, n-1, ..., k+1
        log_prod = np.concatenate(([0.0], np.cumsum(np.log1p(-k / i))))  # index = c in 0..n-k
        sel = finite & (n_arr == n_val)
        out[sel] = -np.expm1(log_prod[c_arr[sel]])
    if scalar:
        return float(out.reshape(()))
    return out


def pass_at_k_curve(n: ArrayLike, c: ArrayLike, ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over problems for each k in ``ks``: ``{k: float}`` (keys in the order given).

    ``n`` / ``c`` as in :func:`pass_at_k` (one entry per problem); every k must satisfy
    ``k <= n`` for every problem.
    """
    ks = list(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    if np.asarray(c).size == 0 and np.asarray(n).size == 0:
        raise ValueError("n and c are empty: pass at least one problem")
    return {int(k): float(np.mean(pass_at_k(n, c, k))) for k in ks}
