"""Unit tests for rlsys.algo.advantages (paper-notes Sec. 1)."""

import dataclasses
import math
import statistics

import pytest
import torch

from rlsys.algo import GroupStats, dynamic_sampling_mask, focal_weight, group_advantages, group_success_rate

F64 = torch.float64


def _grpo_reference(rows, eps=1e-6, std_normalize=True):
    """Slow pure-python GRPO advantages with the population std."""
    out = []
    for row in rows:
        m = sum(row) / len(row)
        sd = statistics.pstdev(row)
        if all(v == row[0] for v in row):
            out.append([0.0] * len(row))
        elif std_normalize:
            out.append([(v - m) / (sd + eps) for v in row])
        else:
            out.append([v - m for v in row])
    return out


# ---------------------------------------------------------------- focal_weight


def test_focal_weight_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    assert torch.equal(focal_weight(s, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=F64))
    assert torch.allclose(focal_weight(s, 2.0), torch.tensor([1.0, 0.5625, 0.25, 0.0], dtype=F64), rtol=0, atol=1e-15)
    assert torch.allclose(
        focal_weight(s, 0.5), torch.tensor([1.0, math.sqrt(0.75), math.sqrt(0.5), 0.0], dtype=F64), rtol=0, atol=1e-15
    )


def test_focal_weight_gamma_zero_is_exactly_one_even_at_success_one():
    s = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    assert torch.equal(focal_weight(s, 0.0), torch.ones(3, dtype=F64))
    assert torch.equal(focal_weight(s, 0), torch.ones(3, dtype=F64))


def test_focal_weight_rejects_negative_gamma_and_bad_rates():
    with pytest.raises(ValueError, match="gamma"):
        focal_weight(torch.tensor([0.5]), -0.5)
    with pytest.raises(ValueError, match="gamma"):
        focal_weight(torch.tensor([0.5]), float("nan"))
    with pytest.raises(ValueError, match="success_rate"):
        focal_weight(torch.tensor([1.5]), 1.0)
    with pytest.raises(ValueError, match="success_rate"):
        focal_weight(torch.tensor([-0.1]), 1.0)


# ---------------------------------------------------------------- group_advantages: values


def test_hand_computed_grpo_and_focal():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    adv, stats = group_advantages(rewards, gamma=2.0)
    # Group 0: mean 0.5, population std 0.5, mu_hat 0.5 -> g = 0.25.
    a0 = 0.5 / (0.5 + 1e-6) * 0.25
    # Group 1: mean 0.25, std sqrt(0.25 * 0.75), mu_hat 0.25 -> g = 0.5625.
    sd1 = math.sqrt(0.25 * 0.75)
    exp1 = [0.75 / (sd1 + 1e-6) * 0.5625] + [-0.25 / (sd1 + 1e-6) * 0.5625] * 3
    expected = torch.tensor([[a0, -a0, -a0, a0], exp1], dtype=F64)
    assert torch.allclose(adv, expected, rtol=0, atol=1e-12)
    assert torch.allclose(stats.success_rate, torch.tensor([0.5, 0.25], dtype=F64), rtol=0, atol=0)
    assert torch.allclose(stats.focal_weight, torch.tensor([0.25, 0.5625], dtype=F64), rtol=0, atol=1e-15)


def test_gamma_zero_is_exactly_grpo():
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(16, 8, generator=g, dtype=F64) < 0.4).to(F64)
    adv, stats = group_advantages(rewards, gamma=0.0)
    ref = torch.tensor(_grpo_reference(rewards.tolist()), dtype=F64)
    assert torch.allclose(adv, ref, rtol=0, atol=1e-12)
    assert torch.equal(stats.focal_weight, torch.ones(16, dtype=F64))


def test_focal_multiplies_grpo_after_normalisation():
    g = torch.Generator().manual_seed(1)
    rewards = (torch.rand(32, 6, generator=g, dtype=F64) < 0.5).to(F64)
    base, _ = group_advantages(rewards, gamma=0.0)
    for gamma in (0.5, 1.0, 2.0):
        adv, stats = group_advantages(rewards, gamma=gamma)
        mu = rewards.mean(-1)
        assert torch.allclose(adv, base * ((1 - mu) ** gamma).unsqueeze(-1), rtol=0, atol=1e-14)
        assert torch.allclose(stats.focal_weight, (1 - mu) ** gamma, rtol=0, atol=1e-15)


def test_std_normalize_false_is_mean_centred_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
    adv, _ = group_advantages(rewards, gamma=1.0, std_normalize=False)
    expected = torch.tensor(_grpo_reference(rewards.tolist(), std_normalize=False), dtype=F64)
    expected = expected * torch.tensor([[2 / 3], [1 / 3]], dtype=F64)
    assert torch.allclose(adv, expected, rtol=0, atol=1e-15)


def test_identical_rewards_give_exact_zeros_without_nan():
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not depend on the mean being exact.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64)
    for eps in (1e-6, 0.0):
        for std_normalize in (True, False):
            adv, stats = group_advantages(
                rewards, gamma=1.0, eps=eps, std_normalize=std_normalize, success_threshold=0.5
            )
            assert torch.equal(adv, torch.zeros_like(rewards))
            assert stats.learnable_fraction == 0.0
    adv32, _ = group_advantages(torch.full((2, 4), 0.3), success_threshold=0.5)
    assert torch.equal(adv32, torch.zeros(2, 4)) and not torch.isnan(adv32).any()


def test_single_rollout_groups_rejected():
    with pytest.raises(ValueError, match="G == 1"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="G == 1"):
        dynamic_sampling_mask(torch.tensor([[1.0], [0.0]]))


def test_permutation_within_group_permutes_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [0.2, 0.9, 0.4, 0.4, 1.0]], dtype=F64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    for gamma in (0.0, 1.0):
        adv, _ = group_advantages(rewards, gamma=gamma, success_threshold=0.5)
        adv_p, _ = group_advantages(rewards[:, perm], gamma=gamma, success_threshold=0.5)
        assert torch.allclose(adv_p, adv[:, perm], rtol=0, atol=1e-15)


def test_all_correct_groups_get_zero_whatever_gamma():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]], dtype=F64)
    for gamma in (0.0, 0.5, 1.0, 2.0):
        adv, _ = group_advantages(rewards, gamma=gamma)
        assert torch.equal(adv[0], torch.zeros(4, dtype=F64))
        assert adv[1].abs().min() > 0


def test_non_binary_rewards_need_threshold():
    rewards = torch.tensor([[0.5, 1.0, 0.0], [0.2, 0.2, 1.2]], dtype=F64)
    with pytest.raises(ValueError, match="success_threshold"):
        group_advantages(rewards, gamma=1.0)
    with pytest.raises(ValueError, match="success_threshold"):
        group_success_rate(rewards)
    adv, stats = group_advantages(rewards, gamma=1.0, success_threshold=1.0)
    assert torch.allclose(stats.success_rate, torch.tensor([1 / 3, 1 / 3], dtype=F64), rtol=0, atol=1e-15)
    base = torch.tensor(_grpo_reference(rewards.tolist()), dtype=F64)
    assert torch.allclose(adv, base * (2 / 3), rtol=0, atol=1e-12)


def test_correct_flags_take_precedence():
    rewards = torch.tensor([[1.1, 0.1, 0.1, 0.1]], dtype=F64)  # format bonus 0.1 on every rollout
    correct = torch.tensor([[True, False, False, False]])
    adv, stats = group_advantages(rewards, gamma=1.0, correct=correct, success_threshold=0.0)
    assert stats.success_rate.item() == 0.25
    base = torch.tensor(_grpo_reference(rewards.tolist()), dtype=F64)
    assert torch.allclose(adv, base * 0.75, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="correct"):
        group_advantages(rewards, correct=torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="correct"):
        group_advantages(rewards, correct=torch.tensor([[0.5, 0.0, 0.0, 0.0]]))


def test_explicit_threshold_used_for_binary_rewards():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64)
    _, stats = group_advantages(rewards, gamma=1.0, success_threshold=0.0)
    assert stats.success_rate.item() == 1.0  # every reward >= 0 counts as a success


def test_stats_fractions_hand_computed():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)
    _, stats = group_advantages(rewards, gamma=1.0)
    assert isinstance(stats, GroupStats)
    d = stats.as_dict()
    assert set(d) == {
        "focal_weight_mean",
        "focal_weight_min",
        "focal_weight_max",
        "mixed_group_fraction",
        "all_correct_fraction",
        "all_wrong_fraction",
        "success_rate_mean",
        "learnable_fraction",
    }
    assert all(type(v) is float for v in d.values())
    assert d["mixed_group_fraction"] == 0.5
    assert d["all_correct_fraction"] == 0.25
    assert d["all_wrong_fraction"] == 0.25
    assert d["learnable_fraction"] == 0.5
    assert abs(d["success_rate_mean"] - (1 + 0 + 1 / 3 + 2 / 3) / 4) < 1e-15
    assert abs(d["focal_weight_mean"] - (0 + 1 + 2 / 3 + 1 / 3) / 4) < 1e-15
    assert d["focal_weight_min"] == 0.0 and d["focal_weight_max"] == 1.0
    assert torch.equal(stats.mixed, torch.tensor([False, False, True, True]))
    assert torch.equal(stats.learnable, torch.tensor([False, False, True, True]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.learnable_fraction = 1.0  # frozen


def test_no_grad_and_dtype_preserved():
    rewards = torch.tensor([[1.0, 0.0]], requires_grad=True)
    adv, _ = group_advantages(rewards)
    assert not adv.requires_grad and adv.dtype == torch.float32
    adv_int, _ = group_advantages(torch.tensor([[1, 0, 1]]))
    assert adv_int.is_floating_point()


def test_input_validation():
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.tensor([[1.0, 0.0]]), eps=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        group_advantages(torch.tensor([[1.0, 0.0]]), gamma=-1.0)
    with pytest.raises(ValueError, match="B == 0"):
        group_advantages(torch.zeros(0, 4))


# ---------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_mask_binary_threshold_flags_and_fallback():
    binary = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert torch.equal(dynamic_sampling_mask(binary), torch.tensor([False, False, True]))
    partial = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.2, 0.2], [0.3, 0.3, 0.3]])
    assert torch.equal(dynamic_sampling_mask(partial, success_threshold=1.0), torch.tensor([False, True, False]))
    # Fallback without a success definition: non-zero reward std.
    assert torch.equal(dynamic_sampling_mask(partial), torch.tensor([True, True, False]))
    flags = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    assert torch.equal(dynamic_sampling_mask(partial, correct=flags), torch.tensor([False, True, False]))
