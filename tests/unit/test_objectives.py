"""The peers' objectives (issue: RLOO, MaxRL, dual clip, sample std, batch-level scaling) against values
computed by hand, and masked importance sampling."""

from __future__ import annotations

import math

import pytest
import torch

from rlsys.algo import group_advantages
from rlsys.algo.losses import policy_loss

R = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])


def test_rloo_is_reward_minus_the_others_mean() -> None:
    adv, _ = group_advantages(R, std_normalize=False, estimator="rloo")
    # group 0: r=1 -> 1 - 0 = 1; r=0 -> 0 - 1/3
    expected = torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3], [1 - 2 / 3, 1 - 2 / 3, 0 - 1.0, 1 - 2 / 3], [0.0] * 4])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_maxrl_divides_by_the_group_mean() -> None:
    adv, _ = group_advantages(R, std_normalize=False, estimator="maxrl")
    # group 0: mean 1/4 -> (1 - 1/4) / (1/4) = 3, (0 - 1/4) / (1/4) = -1; group 1: mean 3/4 -> 1/3, -1
    expected = torch.tensor([[3.0, -1.0, -1.0, -1.0], [1 / 3, 1 / 3, -1.0, 1 / 3], [0.0] * 4])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rewards >= 0"):
        group_advantages(R - 0.5, std_normalize=False, estimator="maxrl")


def test_focal_weight_multiplies_every_estimator() -> None:
    for est in ("rloo", "maxrl"):
        plain, _ = group_advantages(R, std_normalize=False, estimator=est)
        focal, st = group_advantages(R, gamma=0.5, std_normalize=False, estimator=est)
        torch.testing.assert_close(focal, plain * st.focal_weight.unsqueeze(-1))
        assert st.focal_weight[0] == pytest.approx(math.sqrt(0.75))


def test_sample_std_is_bessel_corrected() -> None:
    pop, _ = group_advantages(R, eps=0.0)
    sample, _ = group_advantages(R, eps=0.0, std="sample")
    # group 0: mean 1/4, population std sqrt(3)/4, sample std sqrt(3/4 * 4/3 ... ) = sqrt(1/4) = 0.5
    assert pop[0, 0].item() == pytest.approx(0.75 / (math.sqrt(3) / 4))
    assert sample[0, 0].item() == pytest.approx(0.75 / 0.5)
    # everywhere: sample = population * sqrt((G - 1) / G), 1 / 1.069 at G = 8
    torch.testing.assert_close(sample, pop * math.sqrt(3 / 4))


def test_batch_scope_uses_one_std_over_the_batch() -> None:
    adv, _ = group_advantages(R, eps=0.0, std_scope="batch")
    flat = R.reshape(-1)
    sd = float(flat.std(correction=0))  # 4 ones of 12: sqrt(1/3 * 2/3)
    assert sd == pytest.approx(math.sqrt(2) / 3)
    assert adv[0, 0].item() == pytest.approx(0.75 / sd)
    assert adv[1, 2].item() == pytest.approx(-0.75 / sd)
    assert (adv[2] == 0).all()  # an all-equal group stays exactly 0
    trl, _ = group_advantages(R, eps=0.0, std_scope="batch", std="sample")
    assert trl[0, 0].item() == pytest.approx(0.75 / float(flat.std(correction=1)))


def test_estimators_refuse_a_std() -> None:
    with pytest.raises(ValueError, match="std_normalize=False"):
        group_advantages(R, estimator="rloo")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(R, estimator="ppo")


def _one_token(ratio: float, adv: float, **kw):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old = torch.zeros(1, 1)
    loss, m = policy_loss(lp, old, torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool), **kw)
    loss.backward()
    assert lp.grad is not None
    return float(loss.detach()), float(lp.grad[0, 0]), m


def test_dual_clip_caps_negative_advantage_terms() -> None:
    # A = -1, ratio 5: PPO's term max(-rA, -clip(r)A) = 5; the dual clip with c = 3 caps it at 3, no gradient.
    loss, grad, m = _one_token(5.0, -1.0)
    assert loss == pytest.approx(5.0) and grad != 0
    loss, grad, m = _one_token(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0 and m["clip_fraction"] == 1.0
    # below c the term is PPO's own; a positive advantage is never dual-clipped
    assert _one_token(2.0, -1.0, dual_clip=3.0)[0] == pytest.approx(2.0)
    assert _one_token(5.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        _one_token(1.0, 1.0, dual_clip=1.0)
    with pytest.raises(ValueError, match="cispo"):
        _one_token(1.0, 1.0, dual_clip=3.0, loss_type="cispo")


def test_masked_importance_sampling_drops_tokens_over_the_cap() -> None:
    """Two tokens, pi_old / pi_behaviour = e^0.5 (kept, weight e^0.5) and e^2 (over cap 2: weight 0 when
    masked, 2 when truncated)."""
    lp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2)
    behaviour = torch.tensor([[-0.5, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([1.0])
    lt, mt = policy_loss(lp, old, adv, mask, tis_mode="truncate", rollout_logprobs=behaviour, tis_cap=2.0)
    lm, mm = policy_loss(lp, old, adv, mask, tis_mode="mask", rollout_logprobs=behaviour, tis_cap=2.0)
    assert float(lt) == pytest.approx(-(math.exp(0.5) + 2.0) / 2)
    assert float(lm) == pytest.approx(-math.exp(0.5) / 2)
    assert mt["tis_clip_fraction"] == mm["tis_clip_fraction"] == 0.5
    assert mm["tis_weight_mean"] == pytest.approx(math.exp(0.5) / 2)
    with pytest.raises(ValueError, match="tis_mode"):
        policy_loss(lp, old, adv, mask, tis_mode="clip", rollout_logprobs=behaviour, tis_cap=2.0)
