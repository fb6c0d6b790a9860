"""Unit tests for rlsys.algo.passk (paper-notes Sec. 3)."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from rlsys.algo import pass_at_k, pass_at_k_curve


def _brute_force(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_against_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert abs(pass_at_k(n, c, k) - _brute_force(n, c, k)) < 1e-12, (n, c, k)


def test_closed_values():
    for n in (1, 5, 64, 1024):
        for c in range(0, n + 1, max(1, n // 16)):
            assert abs(pass_at_k(n, c, 1) - c / n) < 1e-12
        assert pass_at_k(n, 0, 1) == 0.0
        assert pass_at_k(n, 0, n) == 0.0
    # n - c < k: every k-subset has a correct sample -> exactly 1.
    assert pass_at_k(10, 3, 8) == 1.0
    assert pass_at_k(256, 1, 256) == 1.0
    assert pass_at_k(1024, 1000, 100) == 1.0


def test_against_exact_rationals_at_large_n():
    for n, c, k in [
        (1024, 1, 256),
        (1024, 3, 1),
        (1024, 17, 256),
        (1024, 500, 2),
        (256, 1, 255),
        (1000, 1, 1),
        (4096, 2, 1024),
    ]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = pass_at_k(n, c, k)
        assert abs(got - float(exact)) <= 1e-13 * float(exact), (n, c, k)


def test_vectorised_and_scalar_types():
    n = np.array([8, 8, 8, 16])
    c = np.array([0, 2, 8, 3])
    out = pass_at_k(n, c, 4)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (4,)
    for i in range(4):
        assert abs(out[i] - pass_at_k(int(n[i]), int(c[i]), 4)) < 1e-15
    assert isinstance(pass_at_k(8, 2, 4), float)
    # Scalar n broadcasts against an array of c.
    assert np.allclose(pass_at_k(8, np.array([0, 2]), 4), [0.0, _brute_force(8, 2, 4)], rtol=0, atol=1e-12)


def test_curve_is_mean_over_problems():
    n = [16, 16, 16]
    c = [0, 1, 5]
    curve = pass_at_k_curve(n, c, [1, 4, 16])
    assert list(curve) == [1, 4, 16]
    assert abs(curve[1] - (0 + 1 / 16 + 5 / 16) / 3) < 1e-15
    assert abs(curve[4] - np.mean([pass_at_k(16, x, 4) for x in c])) < 1e-15
    assert abs(curve[16] - 2 / 3) < 1e-15
    values = list(curve.values())
    assert values == sorted(values)  # pass@k is non-decreasing in k


def test_errors():
    with pytest.raises(ValueError, match="k = 9 exceeds n"):
        pass_at_k(8, 2, 9)
    with pytest.raises(ValueError, match="c must be <= n"):
        pass_at_k(8, 9, 1)
    with pytest.raises(ValueError, match="c must be >= 0"):
        pass_at_k(8, -1, 1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(8, 2, 0)
    with pytest.raises(ValueError, match="k must be an integer"):
        pass_at_k(8, 2, 1.5)
    with pytest.raises(ValueError, match="whole numbers"):
        pass_at_k(8, 2.5, 1)
    with pytest.raises(ValueError, match="exceeds"):
        pass_at_k(np.array([8, 2]), np.array([1, 1]), 4)
    with pytest.raises(ValueError, match="ks"):
        pass_at_k_curve([4], [1], [])
