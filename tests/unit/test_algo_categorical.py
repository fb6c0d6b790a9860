"""Unit tests for rlsys.algo.categorical and scripts/categorical_sim.py (paper Sec. 5.1 / Fig. 2)."""

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsys.algo import (
    AdamState,
    CategoricalSetup,
    adam_ascent_step,
    binary_centred_counts,
    positive_mass,
    retained_positive_mass,
    sample_counts,
    simulate,
    surrogate_gradient,
    surrogate_objective,
)

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]


def _tiny():
    setup = CategoricalSetup(num_actions=7, num_correct=3)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g, dtype=F64)
    counts = torch.tensor([[1, 0, 2, 0, 1, 3, 0], [0, 1, 0, 2, 0, 0, 1], [4, 0, 0, 0, 0, 0, 0]], dtype=F64)
    return setup, logits, counts, setup.action_rewards(F64)


def test_setup_initial_policy():
    setup = CategoricalSetup()
    z = setup.initial_logits()
    assert z[0] == 5.0 and torch.all(z[1:10_000] == 3.0) and torch.all(z[10_000:] == 0.0)
    q0 = positive_mass(torch.softmax(z, -1), setup.num_correct).item()
    e5, e3 = math.exp(5), math.exp(3)
    exact = (e5 + 9_999 * e3) / (e5 + 9_999 * e3 + 118_000)
    assert abs(q0 - exact) < 1e-12 and abs(q0 - 0.63) < 0.005
    r = setup.action_rewards()
    assert r[:10_000].eq(1).all() and r[10_000:].eq(-1).all()
    with pytest.raises(ValueError, match="num_correct"):
        CategoricalSetup(num_actions=10, num_correct=10)


@pytest.mark.parametrize("surrogate", ["prob", "logprob"])
def test_gradient_matches_autograd(surrogate):
    _, logits, counts, rewards = _tiny()
    z = logits.clone().requires_grad_(True)
    surrogate_objective(z, counts, rewards, surrogate).sum().backward()
    analytic = surrogate_gradient(logits, counts, rewards, surrogate)
    assert torch.allclose(analytic, z.grad, rtol=0, atol=1e-15)
    # Passing precomputed probabilities gives the same gradient.
    again = surrogate_gradient(logits, counts, rewards, surrogate, probs=torch.softmax(logits, -1))
    assert torch.allclose(again, analytic, rtol=0, atol=0)


@pytest.mark.parametrize("surrogate", ["prob", "logprob"])
def test_gradient_matches_finite_differences(surrogate):
    _, logits, counts, rewards = _tiny()
    analytic = surrogate_gradient(logits, counts, rewards, surrogate)
    h = 1e-6
    numeric = torch.zeros_like(logits)
    for s in range(logits.shape[0]):
        for a in range(logits.shape[1]):
            zp, zm = logits.clone(), logits.clone()
            zp[s, a] += h
            zm[s, a] -= h
            jp = surrogate_objective(zp, counts, rewards, surrogate)[s]
            jm = surrogate_objective(zm, counts, rewards, surrogate)[s]
            numeric[s, a] = (jp - jm) / (2 * h)
    assert torch.allclose(analytic, numeric, rtol=0, atol=1e-9)


def test_logprob_gradient_is_centred_counts_over_n():
    _, logits, counts, rewards = _tiny()
    n = counts.sum(-1, keepdim=True)
    cr = counts * (rewards - (counts * rewards).sum(-1, keepdim=True) / n)
    assert torch.allclose(surrogate_gradient(logits, counts, rewards, "logprob"), cr / n, rtol=0, atol=1e-15)
    fast_cr, x = binary_centred_counts(counts, 3, 1.0, -1.0)
    assert torch.allclose(fast_cr, cr, rtol=0, atol=1e-15)
    assert torch.equal(x.squeeze(-1), torch.tensor([3.0, 1.0, 4.0], dtype=F64))
    # An all-correct sample has zero centred reward, hence zero gradient.
    assert torch.equal(fast_cr[2], torch.zeros(7, dtype=F64))


def test_sample_counts_distribution_and_reproducibility():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=F64)
    n = 200_000
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    counts = sample_counts(probs, n, gens)
    assert counts.dtype == torch.int64 and torch.equal(counts.sum(-1), torch.tensor([n, n]))
    assert counts[0, 1] == 0 and counts[0, 4] == 0 and counts[1, 4] == n
    freq = counts[0].to(F64) / n
    se = torch.sqrt(probs[0] * (1 - probs[0]) / n)
    assert torch.all((freq - probs[0]).abs() <= 5 * se + 1e-15)
    again = sample_counts(probs, n, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], dtype=F64)
    assert torch.equal(again, counts.to(F64))
    with pytest.raises(ValueError, match="generator"):
        sample_counts(probs, 4, gens[:1])


def test_adam_matches_torch_adam_maximize():
    g = torch.Generator().manual_seed(3)
    p_ref = torch.randn(2, 6, generator=g, dtype=F64)
    p_mine = p_ref.clone()
    leaf = p_ref.clone().requires_grad_(True)
    opt = torch.optim.Adam(
        [leaf], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=True, foreach=False
    )
    state = AdamState.zeros_like(p_mine)
    for _ in range(10):
        grad = torch.randn(2, 6, generator=g, dtype=F64) * 1e-3
        leaf.grad = grad.clone()
        opt.step()
        adam_ascent_step(p_mine, grad, state, lr=1e-2)
    assert state.step == 10
    assert torch.allclose(p_mine, leaf.detach(), rtol=0, atol=1e-14)


def test_mass_metrics_hand_computed():
    p0 = torch.tensor([0.3, 0.2, 0.5], dtype=F64)
    pt = torch.tensor([[0.4, 0.1, 0.5], [0.1, 0.1, 0.8], [0.35, 0.25, 0.4]], dtype=F64)
    assert torch.allclose(positive_mass(pt, 2), torch.tensor([0.5, 0.2, 0.6], dtype=F64), rtol=0, atol=1e-15)
    # Lost correct mass: 0.1, 0.2 + 0.1, 0 -> M_ret = 1 - lost / 0.5.
    assert torch.allclose(
        retained_positive_mass(p0, pt, 2), torch.tensor([0.8, 0.4, 1.0], dtype=F64), rtol=0, atol=1e-15
    )


def test_simulate_basics():
    setup = CategoricalSetup(num_actions=300, num_correct=20)
    res0 = simulate(setup, 8, gammas=(0.0,), seeds=(0, 1), steps=0, dtype=torch.float32)
    # Metrics are float64 even for a float32 simulation (the initial logits are exact in float32).
    e5, e3 = math.exp(5), math.exp(3)
    q0 = (e5 + 19 * e3) / (e5 + 19 * e3 + 280)
    assert abs(res0.q_pos_init - q0) < 1e-14
    assert np.allclose(res0.q_pos, q0, rtol=0, atol=1e-14) and np.all(res0.m_ret == 1.0)
    # Logprob + SGD with +-1 rewards only ever raises correct logits / lowers incorrect ones, so
    # Q_pos is non-decreasing step by step.
    res = simulate(
        setup,
        8,
        gammas=(0.0, 1.0),
        seeds=(0, 1),
        steps=60,
        surrogate="logprob",
        optimizer="sgd",
        dtype=F64,
        record_every=1,
        lr=0.5,
    )
    assert res.q_pos_traj.shape == (61, 2, 2) and res.record_steps[-1] == 60
    assert np.all(np.diff(res.q_pos_traj, axis=0) >= -1e-15)
    assert np.all(res.q_pos > res.q_pos_init)
    assert np.all((res.m_ret >= 0) & (res.m_ret <= 1))
    # Common random numbers: the gamma = 0 rows do not depend on which other gammas run alongside.
    alone = simulate(
        setup, 8, gammas=(0.0,), seeds=(0, 1), steps=60, surrogate="logprob", optimizer="sgd", dtype=F64, lr=0.5
    )
    assert np.array_equal(alone.q_pos[0], res.q_pos[0]) and np.array_equal(alone.m_ret[0], res.m_ret[0])
    # The focal weight slows the ascent of the correct mass (g <= 1 scales every SGD update down).
    assert np.all(res.q_pos[1] <= res.q_pos[0] + 1e-12)
    with pytest.raises(ValueError, match="surrogate"):
        simulate(setup, 8, surrogate="exp")
    with pytest.raises(ValueError, match="optimizer"):
        simulate(setup, 8, optimizer="rmsprop")
    with pytest.raises(ValueError, match="gamma"):
        simulate(setup, 8, gammas=(-1.0,))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("categorical_sim", REPO / "scripts" / "categorical_sim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("categorical")
    assert module.main(["--small", "--out", str(out), "--threads", "1"]) == 0
    return out


def test_small_preset_outputs(small_run):
    for name in (
        "categorical_runs.csv",
        "categorical_summary.csv",
        "categorical_trajectories.csv",
        "categorical_sim.png",
        "run_info.json",
    ):
        assert (small_run / name).stat().st_size > 0, name
    with open(small_run / "categorical_runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 8 * 2 * 2  # combinations x N in 2..256 x gammas x seeds
    assert {r["combination"] for r in rows} == {"prob/sgd", "prob/adam", "logprob/sgd", "logprob/adam"}
    for r in rows:
        q, m, q0 = float(r["q_pos"]), float(r["m_ret"]), float(r["q_pos_init"])
        assert math.isfinite(q) and math.isfinite(m) and 0.0 <= q <= 1.0 and 0.0 <= m <= 1.0
        assert q > q0, r  # Q_pos rises for every combination, N, gamma and seed
        if r["combination"] == "prob/sgd":
            assert r["dtype"] == "float64"  # --dtype auto: SGD's tiny updates need float64 logits
            # p-scaled gradients at lr 1e-2 barely move the logits in 100 steps.
            assert q - q0 < 1e-4
    with open(small_run / "categorical_summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert len(summary) == 4 * 8 * 2
    for s in summary:
        assert float(s["m_ret_min"]) <= float(s["m_ret_mean"]) <= float(s["m_ret_max"])
