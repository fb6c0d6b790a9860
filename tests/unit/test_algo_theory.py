"""Unit tests for rlsys.algo.theory (Lemma 3.1; paper-notes Sec. 4)."""

import math

import numpy as np
import pytest

from rlsys.algo import active_probability, tail_miss_probability


def test_formula_exact():
    for mu, tau, n in [(0.3, 0.03, 5), (0.9, 0.5, 3), (0.5, 0.1, 1), (0.3, 0.03, 64)]:
        exp = (1 - tau) ** n - (mu - tau) ** n - (1 - mu) ** n
        assert abs(tail_miss_probability(mu, tau, n) - max(exp, 0.0)) < 1e-12
        assert abs(active_probability(mu, n) - max(1 - mu**n - (1 - mu) ** n, 0.0)) < 1e-12


def test_paper_numbers_and_peak():
    mu, tau = 0.3, 0.03
    assert abs(tail_miss_probability(mu, tau, 2) - 0.378) < 5e-4
    assert abs(tail_miss_probability(mu, tau, 8) - 0.726) < 5e-4
    assert abs(tail_miss_probability(mu, tau, 32) - 0.377) < 5e-4
    assert abs(tail_miss_probability(mu, tau, 128) - 0.020) < 5e-4
    ns = 2 ** np.arange(0, 13)
    p = tail_miss_probability(mu, tau, ns)
    assert ns[int(np.argmax(p))] == 8
    # Non-monotone: rises to the peak, then falls.
    peak = int(np.argmax(p))
    assert np.all(np.diff(p[: peak + 1]) > 0) and np.all(np.diff(p[peak:]) < 0)


def test_vectorised_over_n():
    ns = np.array([1, 2, 8, 32])
    p = tail_miss_probability(0.3, 0.03, ns)
    assert isinstance(p, np.ndarray) and p.shape == (4,)
    assert p[0] == 0.0  # N = 1 is never active
    for i, n in enumerate(ns):
        assert p[i] == tail_miss_probability(0.3, 0.03, int(n))
    a = active_probability(0.3, ns)
    assert a[0] == 0.0 and np.all(a >= p)
    assert isinstance(active_probability(0.3, 4), float)
    assert active_probability(0.0, 4) == 0.0 and active_probability(1.0, 4) == 0.0


@pytest.mark.parametrize("n", [2, 8, 32])
def test_monte_carlo(n):
    mu, tau, trials = 0.3, 0.03, 40_000
    rng = np.random.default_rng(n)
    counts = rng.multinomial(n, [tau, mu - tau, 1 - mu], size=trials)  # [rare E, other correct, wrong]
    correct = counts[:, 0] + counts[:, 1]
    active = (correct > 0) & (correct < n)
    miss = active & (counts[:, 0] == 0)
    for est, exact in ((miss.mean(), tail_miss_probability(mu, tau, n)), (active.mean(), active_probability(mu, n))):
        se = math.sqrt(max(exact * (1 - exact), 1e-12) / trials)
        assert abs(est - exact) < 3 * se + 1e-12, (n, est, exact)


def test_validation():
    with pytest.raises(ValueError, match="tau < mu"):
        tail_miss_probability(0.3, 0.3, 4)
    with pytest.raises(ValueError, match="tau < mu"):
        tail_miss_probability(0.3, 0.0, 4)
    with pytest.raises(ValueError, match="tau < mu"):
        tail_miss_probability(1.2, 0.1, 4)
    with pytest.raises(ValueError, match="n must be"):
        tail_miss_probability(0.3, 0.03, 0)
    with pytest.raises(ValueError, match="n must be"):
        tail_miss_probability(0.3, 0.03, 2.5)
    with pytest.raises(ValueError, match="mu must lie"):
        active_probability(-0.1, 4)
    with pytest.raises(ValueError, match="finite"):
        active_probability(float("nan"), 4)
