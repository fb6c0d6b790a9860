"""Unit tests for rlsys.algo.losses.policy_loss (paper-notes Sec. 2)."""

import math

import pytest
import torch

from rlsys.algo import AGG_MODES, DEFAULT_CLIP, LOSS_TYPES, kl_k3, policy_loss

F64 = torch.float64


def _data(n=5, t=7, seed=0, spread=0.3, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log(torch.rand(n, t, generator=g, dtype=F64) * 0.9 + 0.05)
    old = logp + spread * torch.randn(n, t, generator=g, dtype=F64)
    ref = logp + 0.2 * torch.randn(n, t, generator=g, dtype=F64)
    ent = torch.rand(n, t, generator=g, dtype=F64) * 2
    adv = torch.randn(n, generator=g, dtype=F64)
    mask = torch.rand(n, t, generator=g) < 0.7
    mask[0, 0] = True
    if empty_row:
        mask[-1] = False
    return logp, old, ref, ent, adv, mask


def _reference(
    logp,
    old,
    adv,
    mask,
    loss_type,
    agg,
    eps_low=None,
    eps_high=None,
    ref=None,
    kl_coef=0.0,
    ent=None,
    ent_coef=0.0,
    normalizer=None,
    token_sum_constant=None,
):
    """Slow pure-python loop: (loss, dloss/dlogp as nested lists, dloss/dentropy as nested lists)."""
    d_low, d_high = DEFAULT_CLIP[loss_type]
    el = d_low if eps_low is None else eps_low
    eh = d_high if eps_high is None else eps_high
    n_rows, n_tok = len(logp), len(logp[0])
    per_tok = [[0.0] * n_tok for _ in range(n_rows)]
    dlp = [[0.0] * n_tok for _ in range(n_rows)]
    dent = [[0.0] * n_tok for _ in range(n_rows)]
    for i in range(n_rows):
        for t in range(n_tok):
            if not mask[i][t]:
                continue
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            r = math.exp(logp[i][t] - old[i][t])
            if loss_type in ("grpo", "dapo"):
                s1 = r * a
                s2 = min(max(r, 1 - el), 1 + eh) * a
                loss = -min(s1, s2)
                grad = -a * r if s1 <= s2 else 0.0
            else:
                w = min(max(r, 1 - el), 1 + eh)
                loss = -w * a * logp[i][t]
                grad = -w * a
            if kl_coef:
                d = ref[i][t] - logp[i][t]
                loss += kl_coef * (math.exp(d) - d - 1)
                grad += kl_coef * (1 - math.exp(d))
            if ent_coef:
                loss -= ent_coef * ent[i][t]
                dent[i][t] = -ent_coef
            per_tok[i][t] = loss
            dlp[i][t] = grad
    counts = [sum(1 for t in range(n_tok) if mask[i][t]) for i in range(n_rows)]
    if agg == "token_mean":
        norm = normalizer if normalizer is not None else max(sum(counts), 1)
        scale = [[1.0 / norm] * n_tok for _ in range(n_rows)]
    else:
        norm = normalizer if normalizer is not None else max(sum(1 for c in counts if c > 0), 1)
        if agg == "seq_mean_token_mean":
            scale = [[1.0 / (max(counts[i], 1) * norm)] * n_tok for i in range(n_rows)]
        else:
            scale = [[1.0 / (token_sum_constant * norm)] * n_tok for _ in range(n_rows)]
    total = sum(per_tok[i][t] * scale[i][t] for i in range(n_rows) for t in range(n_tok))
    g_lp = [[dlp[i][t] * scale[i][t] for t in range(n_tok)] for i in range(n_rows)]
    g_ent = [[dent[i][t] * scale[i][t] for t in range(n_tok)] for i in range(n_rows)]
    return total, g_lp, g_ent


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_slow_reference(loss_type, agg):
    logp, old, ref, ent, adv, mask = _data(spread=0.4)
    if loss_type == "cispo":
        old[1, :3] = logp[1, :3] - 2.5  # ratios ~12 > 6: the IS weight is clipped
    kw = dict(token_sum_constant=9.0) if agg == "seq_mean_token_sum_norm" else {}
    lp = logp.clone().requires_grad_(True)
    en = ent.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        lp,
        old,
        adv,
        mask,
        loss_type=loss_type,
        agg=agg,
        ref_logprobs=ref,
        kl_coef=0.05,
        entropy=en,
        entropy_coef=0.01,
        **kw,
    )
    loss.backward()
    exp_loss, exp_glp, exp_gent = _reference(
        logp.tolist(),
        old.tolist(),
        adv.tolist(),
        mask.tolist(),
        loss_type,
        agg,
        ref=ref.tolist(),
        kl_coef=0.05,
        ent=ent.tolist(),
        ent_coef=0.01,
        **kw,
    )
    assert abs(loss.item() - exp_loss) < 1e-12
    assert torch.allclose(lp.grad, torch.tensor(exp_glp, dtype=F64), rtol=0, atol=1e-12)
    assert torch.allclose(en.grad, torch.tensor(exp_gent, dtype=F64), rtol=0, atol=1e-12)
    assert metrics["num_tokens"] == float(mask.sum())
    assert metrics["num_sequences"] == float((mask.sum(-1) > 0).sum())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_custom_clip_and_token_level_advantages(loss_type):
    logp, old, _, _, adv, mask = _data(seed=3, spread=0.5)
    adv_tok = adv.unsqueeze(-1).expand_as(logp).clone()
    adv_tok[0] *= 2.0
    loss, _ = policy_loss(logp, old, adv_tok, mask, loss_type=loss_type, clip_low=0.1, clip_high=0.4)
    exp_loss, _, _ = _reference(
        logp.tolist(), old.tolist(), adv_tok.tolist(), mask.tolist(), loss_type, "token_mean", eps_low=0.1, eps_high=0.4
    )
    assert abs(loss.item() - exp_loss) < 1e-12
    # [N] advantages broadcast exactly like the equivalent [N, T] tensor.
    l1, _ = policy_loss(logp, old, adv, mask, loss_type=loss_type)
    l2, _ = policy_loss(logp, old, adv.unsqueeze(-1).expand_as(logp), mask, loss_type=loss_type)
    assert l1.item() == l2.item()


def test_cispo_no_gradient_through_is_weight():
    logp, old, _, _, adv, mask = _data(seed=5, spread=0.8)
    old[0, :4] = logp[0, :4] - 3.0  # ratio e^3 ~ 20 -> weight clipped to 6
    mask[0, :4] = True
    lp = logp.clone().requires_grad_(True)
    norm = 17.0
    loss, metrics = policy_loss(lp, old, adv, mask, loss_type="cispo", normalizer=norm)
    loss.backward()
    w = torch.clamp(torch.exp(logp - old), 0.0, 6.0)
    expected = -w * adv.unsqueeze(-1) * mask.to(F64) / norm
    assert torch.allclose(lp.grad, expected, rtol=0, atol=1e-15)
    clipped = ((torch.exp(logp - old) > 6.0) & mask).sum().item()
    assert clipped >= 4
    assert metrics["clip_fraction"] == clipped / mask.sum().item()


def _one_token(ratio, adv, loss_type):
    lp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
    loss, metrics = policy_loss(
        lp,
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([adv], dtype=F64),
        torch.ones(1, 1, dtype=torch.bool),
        loss_type=loss_type,
    )
    loss.backward()
    return loss.item(), lp.grad.item(), metrics["clip_fraction"]


def test_dapo_clip_higher_is_asymmetric():
    # High side: ratio 1.25 with A > 0 is inside DAPO's 1.28 but outside GRPO's 1.2.
    loss, grad, clip = _one_token(1.25, 1.0, "dapo")
    assert clip == 0.0 and abs(grad + 1.25) < 1e-12 and abs(loss + 1.25) < 1e-12
    loss, grad, clip = _one_token(1.25, 1.0, "grpo")
    assert clip == 1.0 and grad == 0.0 and abs(loss + 1.2) < 1e-12
    loss, grad, clip = _one_token(1.3, 1.0, "dapo")
    assert clip == 1.0 and grad == 0.0 and abs(loss + 1.28) < 1e-12
    # Low side: both clip at 0.8 for A < 0.
    loss, grad, clip = _one_token(0.79, -1.0, "dapo")
    assert clip == 1.0 and grad == 0.0 and abs(loss - 0.8) < 1e-12
    loss, grad, clip = _one_token(0.81, -1.0, "dapo")
    assert clip == 0.0 and abs(grad - 0.81) < 1e-12
    # Pessimism: ratio 1.5 with A < 0 keeps the unclipped (worse) branch and its gradient.
    loss, grad, clip = _one_token(1.5, -1.0, "dapo")
    assert clip == 0.0 and abs(loss - 1.5) < 1e-12 and abs(grad - 1.5) < 1e-12


def test_metrics_hand_computed():
    ratios = [1.0, 1.25, 0.5]
    lp = torch.tensor([[math.log(r) for r in ratios] + [0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    ref = torch.zeros(1, 4, dtype=F64)
    ent = torch.tensor([[0.5, 1.0, 1.5, 9.0]], dtype=F64)
    loss, m = policy_loss(
        lp, torch.zeros(1, 4, dtype=F64), torch.tensor([1.0], dtype=F64), mask, ref_logprobs=ref, entropy=ent
    )
    assert m["num_tokens"] == 3.0
    assert abs(m["clip_fraction"] - 1 / 3) < 1e-15
    assert abs(m["ratio_mean"] - sum(ratios) / 3) < 1e-15
    assert abs(m["ratio_min"] - 0.5) < 1e-15 and abs(m["ratio_max"] - 1.25) < 1e-15
    assert abs(m["approx_kl"] - sum(r - 1 - math.log(r) for r in ratios) / 3) < 1e-15
    assert abs(m["pg_loss"] - (-1.0 - 1.2 - 0.5) / 3) < 1e-15
    assert abs(m["kl"] - sum(1 / r + math.log(r) - 1 for r in ratios) / 3) < 1e-15
    assert abs(m["entropy"] - 1.0) < 1e-15
    assert abs(loss.item() - m["pg_loss"]) < 1e-15  # kl_coef = entropy_coef = 0: logged, not added
    assert all(type(v) is float for v in m.values())


def test_kl_k3_values():
    lp = torch.tensor([0.0, -1.0, -2.0], dtype=F64)
    ref = torch.tensor([0.0, -0.5, -3.0], dtype=F64)
    exp = [math.exp(r - p) - (r - p) - 1 for p, r in zip(lp.tolist(), ref.tolist())]
    assert torch.allclose(kl_k3(lp, ref), torch.tensor(exp, dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_and_data_parallel_shards_match_full_batch(agg):
    logp, old, ref, ent, adv, mask = _data(n=8, t=6, seed=7, spread=0.4)
    mask[3] = False  # an empty row in the middle
    kw = dict(token_sum_constant=6.0) if agg == "seq_mean_token_sum_norm" else {}
    common = dict(loss_type="dapo", agg=agg, kl_coef=0.1, **kw)
    lp = logp.clone().requires_grad_(True)
    full, _ = policy_loss(lp, old, adv, mask, ref_logprobs=ref, **common)
    full.backward()
    g_full = lp.grad.clone()
    global_norm = mask.sum().item() if agg == "token_mean" else (mask.sum(-1) > 0).sum().item()

    # 4 micro-batches of 2 rows, each passing the global normalizer (as a tensor for variety).
    lp.grad = None
    total = torch.zeros((), dtype=F64)
    for s in range(0, 8, 2):
        part, _ = policy_loss(
            lp[s : s + 2],
            old[s : s + 2],
            adv[s : s + 2],
            mask[s : s + 2],
            ref_logprobs=ref[s : s + 2],
            normalizer=torch.tensor(float(global_norm), dtype=F64),
            **common,
        )
        part.backward()
        total = total + part.detach()
    assert abs(total.item() - full.item()) < 1e-12
    assert torch.allclose(lp.grad, g_full, rtol=0, atol=1e-12)

    # 2 data-parallel shards: DDP AVERAGES gradients over W ranks, so each rank passes global / W.
    world = 2
    shard_grads, shard_losses = [], []
    for rank in range(world):
        rows = slice(rank * 4, rank * 4 + 4)
        lp_r = logp[rows].clone().requires_grad_(True)
        loss_r, _ = policy_loss(
            lp_r, old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows], normalizer=global_norm / world, **common
        )
        loss_r.backward()
        shard_grads.append(lp_r.grad)
        shard_losses.append(loss_r.item())
    assert abs(sum(shard_losses) / world - full.item()) < 1e-12
    assert torch.allclose(torch.cat(shard_grads) / world, g_full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradcheck(loss_type, agg):
    logp, old, ref, ent, adv, mask = _data(n=3, t=4, seed=11, spread=0.3)
    kw = dict(token_sum_constant=5.0) if agg == "seq_mean_token_sum_norm" else {}
    if loss_type == "cispo":
        # Finite differences see the IS weight's dependence on logprobs, which CISPO deliberately
        # stops; make the weight constant (every ratio e > 1 + clip_high) so the check is meaningful.
        # The stop-gradient itself is tested exactly in test_cispo_no_gradient_through_is_weight.
        old = logp - 1.0
        kw.update(clip_low=1.0, clip_high=0.0)

    def f(lp, en):
        return policy_loss(
            lp,
            old,
            adv,
            mask,
            loss_type=loss_type,
            agg=agg,
            ref_logprobs=ref,
            kl_coef=0.1,
            entropy=en,
            entropy_coef=0.02,
            **kw,
        )[0]

    assert torch.autograd.gradcheck(
        f, (logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)), eps=1e-6, atol=1e-9, rtol=1e-7
    )


def test_masked_garbage_does_not_leak():
    logp, old, ref, ent, adv, mask = _data(seed=2)
    logp[~mask] = float("-inf")
    old[~mask] = float("nan")
    ref[~mask] = float("inf")
    for loss_type in LOSS_TYPES:
        lp = logp.clone().requires_grad_(True)
        loss, m = policy_loss(lp, old, adv, mask, loss_type=loss_type, ref_logprobs=ref, kl_coef=0.1)
        loss.backward()
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
        assert torch.isfinite(lp.grad).all() and torch.equal(lp.grad[~mask], torch.zeros_like(lp.grad[~mask]))


def test_empty_call_gives_zero_loss_and_neutral_metrics():
    lp = torch.randn(2, 3, dtype=F64, requires_grad=True)
    for agg in AGG_MODES:
        kw = dict(token_sum_constant=3.0) if agg == "seq_mean_token_sum_norm" else {}
        loss, m = policy_loss(
            lp, lp.detach(), torch.ones(2, dtype=F64), torch.zeros(2, 3, dtype=torch.bool), agg=agg, **kw
        )
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))
        assert m["num_tokens"] == 0.0 and m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0
        assert m["clip_fraction"] == 0.0 and m["pg_loss"] == 0.0
        lp.grad = None


def test_integer_mask_accepted():
    logp, old, _, _, adv, mask = _data(seed=4)
    l_bool, _ = policy_loss(logp, old, adv, mask)
    l_int, _ = policy_loss(logp, old, adv, mask.long())
    assert l_bool.item() == l_int.item()


def test_validation_errors():
    logp, old, ref, ent, adv, mask = _data()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, old, adv, mask, loss_type="ppo2")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(logp, old, adv, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old, adv, mask, clip_low=float("nan"))
    with pytest.raises(ValueError, match="token_sum_constant"):
        policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=-1.0)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(logp, old, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss(logp, old, adv, mask.to(F64) * 2)
    with pytest.raises(ValueError, match="normalizer"):
        policy_loss(logp, old, adv, mask, normalizer=0)
    with pytest.raises(ValueError, match="logprobs"):
        policy_loss(logp[0], old[0], adv, mask[0])


# ---- truncated importance sampling (tis_cap) ----------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_tis_weights_each_tokens_pg_gradient_by_the_truncated_ratio(loss_type, agg):
    """With tis_cap, the loss is the same sum with every policy-gradient token term multiplied by the
    constant min(exp(old - rollout), cap): gradient per token = (plain gradient) x that weight."""
    logp, old, _, _, adv, mask = _data(seed=11, spread=0.2)
    g = torch.Generator().manual_seed(12)
    rollout = old + 0.6 * torch.randn(old.shape, generator=g, dtype=F64)  # some weights far above cap 2
    rollout[~mask] = float("-inf")  # padding garbage: must not leak
    kw = dict(loss_type=loss_type, agg=agg, token_sum_constant=7.0)
    lp0 = logp.clone().requires_grad_(True)
    plain, _ = policy_loss(lp0, old, adv, mask, **kw)
    plain.backward()
    lp1 = logp.clone().requires_grad_(True)
    loss, m = policy_loss(lp1, old, adv, mask, rollout_logprobs=rollout, tis_cap=2.0, **kw)
    loss.backward()
    w = torch.where(mask, torch.clamp(torch.exp(old - rollout), max=2.0), torch.ones_like(old))
    assert torch.allclose(lp1.grad, lp0.grad * w, rtol=1e-12, atol=1e-15)
    assert torch.isfinite(loss)
    capped = ((torch.exp(old - rollout) > 2.0) & mask).sum().item()
    assert 0 < capped < mask.sum().item()
    assert m["tis_clip_fraction"] == pytest.approx(capped / mask.sum().item(), abs=1e-12)
    assert m["tis_weight_mean"] == pytest.approx(w[mask].mean().item(), rel=1e-12)


def test_tis_with_matching_sampler_is_the_plain_loss():
    logp, old, ref, ent, adv, mask = _data(seed=3)
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    plain, pm = policy_loss(logp, old, adv, mask, **kw)
    same, sm = policy_loss(logp, old, adv, mask, rollout_logprobs=old.clone(), tis_cap=2.0, **kw)
    assert same.item() == plain.item()
    assert sm["tis_weight_mean"] == 1.0 and sm["tis_clip_fraction"] == 0.0
    assert "tis_weight_mean" not in pm


def test_tis_does_not_weight_kl_and_entropy():
    logp, old, ref, ent, adv, mask = _data(seed=4)
    zero_adv = torch.zeros_like(adv)  # only the KL and entropy terms remain
    kw = dict(ref_logprobs=ref, kl_coef=0.3, entropy=ent, entropy_coef=0.05)
    plain, _ = policy_loss(logp, old, zero_adv, mask, **kw)
    tis, _ = policy_loss(logp, old, zero_adv, mask, rollout_logprobs=old - 1.0, tis_cap=2.0, **kw)
    assert tis.item() == pytest.approx(plain.item(), rel=1e-14)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tis_cap=2.0), "tis_cap needs rollout_logprobs"),
        (dict(tis_cap=0.5, rollout_logprobs="old"), "tis_cap must be"),
        (dict(tis_cap=float("inf"), rollout_logprobs="old"), "tis_cap must be"),
        (dict(tis_cap=True, rollout_logprobs="old"), "tis_cap must be"),
        (dict(tis_cap=2.0, rollout_logprobs="short"), "rollout_logprobs"),
    ],
)
def test_tis_validation(kwargs, match):
    logp, old, _, _, adv, mask = _data()
    if kwargs.get("rollout_logprobs") == "old":
        kwargs["rollout_logprobs"] = old
    elif kwargs.get("rollout_logprobs") == "short":
        kwargs["rollout_logprobs"] = old[:, :3]
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old, adv, mask, **kwargs)
