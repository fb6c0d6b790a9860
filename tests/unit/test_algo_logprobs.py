"""rlsys.algo.logprobs: the chunked LM head equals a full-vocabulary log_softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlsys.algo import LogprobHead, auto_chunk_tokens, chunk_logprob_entropy, token_logprobs


def _reference(
    hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full [B, L-1, V] logits -> (logprobs, entropy) [B, L], aligned with ids, 0 off-response."""
    logp = torch.log_softmax(torch.nn.functional.linear(hidden[:, :-1], weight, bias).float(), -1)
    lp = torch.nn.functional.pad(logp.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    ent = torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0))
    return torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)


def _case(seed: int, b: int = 4, length: int = 9, h: int = 8, v: int = 13, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    lm_head = torch.nn.Linear(h, v, bias=bias)
    with torch.no_grad():
        # Logits of order 1, as in a trained LM head (larger ones only add fp32 cancellation noise to
        # the entropy, in both computations alike).
        lm_head.weight.copy_(torch.randn(v, h, generator=g) / h**0.5)
        if bias:
            lm_head.bias.copy_(torch.randn(v, generator=g))
    hidden = torch.randn(b, length, h, generator=g)
    ids = torch.randint(0, v, (b, length), generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[0, 2:7] = True  # a response in the middle, prompt before, padding after
    mask[1, 5:] = True  # a response running to the end of the row
    # row 2: no response token at all (a fully masked / padded row)
    if b > 3:
        mask[3, 4:] = True  # a second response running to the end
    return lm_head, hidden, ids, mask


def test_chunked_logprob_head_matches_full_softmax() -> None:
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 2:5] = mask[2, 1:6] = True  # row 1: no response token
    lp, ent = LogprobHead(lm_head, chunk_tokens=3)(hidden, ids, mask, True)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and lm_head.weight.grad is not None
    g_chunked = (hidden.grad.clone(), lm_head.weight.grad.clone())
    hidden.grad = lm_head.weight.grad = None

    logp = torch.log_softmax(lm_head(hidden[:, :-1]), -1)
    ref_lp = torch.nn.functional.pad(logp.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0)) * mask
    ref_ent = torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0)) * mask
    (ref_lp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(g_chunked, (hidden.grad, lm_head.weight.grad))


# 14 response tokens in _case(): chunks of 1, 3 and 5 do not divide it, 7 does, 14 is one chunk,
# 100 is larger than the whole response.
@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 14, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_full_logits_reference_fp32(chunk: int, bias: bool) -> None:
    lm_head, hidden, ids, mask = _case(seed=chunk, bias=bias)
    assert int(mask[:, 1:].sum()) == 14
    with torch.no_grad():
        lp, ent = token_logprobs(hidden, ids, mask, lm_head.weight, lm_head.bias, chunk)
        ref_lp, ref_ent = _reference(hidden, ids, mask, lm_head.weight, lm_head.bias)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == ids.shape
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
    # Off-response positions (column 0, prompt, padding, the empty row) are exactly 0.
    assert torch.all(lp[~mask] == 0) and torch.all(ent[~mask] == 0)
    assert torch.all(lp[2] == 0) and torch.all(lp[:, 0] == 0)
    assert torch.all(lp[mask] < 0) and torch.all(ent[mask] > 0)


@pytest.mark.parametrize("chunk", [2, 5, 14])
def test_gradients_equal_full_logits_reference(chunk: int) -> None:
    lm_head, hidden, ids, mask = _case(seed=10 + chunk, bias=True)
    hidden.requires_grad_(True)
    head = LogprobHead(lm_head, chunk)
    assert head.weight is lm_head.weight and head.bias is lm_head.bias  # shared, not copied
    lp, ent = head(hidden, ids, mask, True)
    bias = lm_head.bias
    assert bias is not None
    inputs = (hidden, lm_head.weight, bias)
    got = torch.autograd.grad(lp.sum() + 0.3 * ent.sum(), inputs)
    ref_lp, ref_ent = _reference(hidden, ids, mask, lm_head.weight, bias)
    want = torch.autograd.grad(ref_lp.sum() + 0.3 * ref_ent.sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_entropy_grad_only_when_asked() -> None:
    lm_head, hidden, ids, mask = _case(seed=3)
    lp, ent = token_logprobs(hidden, ids, mask, lm_head.weight, None, 4, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    _, ent = token_logprobs(hidden, ids, mask, lm_head.weight, None, 4, entropy_grad=True)
    assert ent.requires_grad


def test_no_response_token_still_touches_the_head() -> None:
    # ZeRO's gradient hooks expect the head's parameters in the graph on every rank, even with no
    # response token: the result is all zeros but still differentiable w.r.t. the weight.
    lm_head, hidden, ids, _ = _case(seed=4)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    lp, ent = LogprobHead(lm_head, 3)(hidden, ids, mask, False)
    assert torch.all(lp == 0) and torch.all(ent == 0)
    (lp.sum() + ent.sum()).backward()
    assert lm_head.weight.grad is not None and torch.all(lm_head.weight.grad == 0)


def test_chunk_helpers() -> None:
    lm_head, hidden, ids, _ = _case(seed=5)
    h, t = hidden[0], ids[0]
    lp, ent = chunk_logprob_entropy(h, t, lm_head.weight, None, False)
    logp = torch.log_softmax(h @ lm_head.weight.T, -1)
    torch.testing.assert_close(lp, logp.gather(-1, t[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1))
    assert auto_chunk_tokens(1024) == 256 * 1024 * 1024 // (4 * 1024)
    assert auto_chunk_tokens(10**12) == 1
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(hidden, ids, ids > 0, lm_head.weight, None, 0)
