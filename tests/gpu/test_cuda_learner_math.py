"""The learner's math on CUDA (the ``gpu`` tier): the tiny Qwen2 through the chunked LM head and the
F-GRPO loss, on the GPU in float32 and bfloat16, against the same computation on the CPU in float32.

Runs where CUDA is visible (``pytest -m gpu``); a CPU-only machine skips it with the reason (tests/conftest.py).
``RLSYS_GPU_TESTS_ON=cpu`` runs the same checks with the CPU as the "device", which tests the tests
themselves on a machine without a GPU (the comparisons then hold trivially tighter).

Needs only torch and transformers (the GPU machines' image has no vLLM, Ray or DeepSpeed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rlsys.algo import LogprobHead, focal_weight, group_advantages, policy_loss

pytestmark = pytest.mark.gpu

G, T_PROMPT, T_RESP = 4, 6, 10  # one group of G rollouts, each a prompt then a response


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device(os.environ.get("RLSYS_GPU_TESTS_ON", "cuda"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlsys.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    model.train()  # dropout is 0 in the tiny config: train mode only turns on autograd bookkeeping
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [G, T], response_mask [G, T] (bool), rewards [G] (binary: 1 of 4 correct)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (G, T_PROMPT + T_RESP), generator=g)
    mask = torch.zeros(G, T_PROMPT + T_RESP, dtype=torch.bool)
    for i, n in enumerate((10, 7, 4, 10)):  # responses of different lengths, padding after them
        mask[i, T_PROMPT : T_PROMPT + n] = True
    return ids, mask, torch.tensor([1.0, 0.0, 0.0, 0.0])


def _loss_and_grads(model: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One F-GRPO (gamma 0.5) loss on the batch, on-policy (old = current, detached); returns
    (token logprobs [G, T] float32 on the CPU, the loss, every parameter's gradient as float32 on the CPU)."""
    ids, mask, rewards = _batch()
    ids, mask = ids.to(device), mask.to(device)
    head = LogprobHead(model.get_output_embeddings(), chunk_tokens=7)  # several chunks, a ragged last one
    hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    logprobs, _ = head(hidden, ids, mask, False)
    adv = group_advantages(rewards.view(1, G), gamma=0.5)[0].view(G, 1).expand_as(mask).to(device)
    loss, _ = policy_loss(logprobs, logprobs.detach(), adv.float(), mask, loss_type="grpo")
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach().cpu(), loss.detach().cpu(), grads


@pytest.fixture(scope="module")
def cpu_reference(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    return _loss_and_grads(_model(model_dir, torch.device("cpu"), torch.float32), torch.device("cpu"))


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def test_float32_on_the_device_matches_the_cpu(model_dir: Path, device: torch.device, cpu_reference: Any) -> None:
    ref_lp, ref_loss, ref_grads = cpu_reference
    lp, loss, grads = _loss_and_grads(_model(model_dir, device, torch.float32), device)
    _, mask, _ = _batch()
    assert (lp[~mask] == 0).all()  # off-response positions are exactly 0 on every device
    # float32 on both: only the kernels' summation order differs (TF32 is off by default for matmul).
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads)  # every parameter got a gradient, the tied head included
    torch.testing.assert_close(_flat(grads), _flat(ref_grads), rtol=1e-3, atol=1e-6)


def test_bfloat16_on_the_device_stays_within_bf16_noise(
    model_dir: Path, device: torch.device, cpu_reference: Any
) -> None:
    ref_lp, ref_loss, ref_grads = cpu_reference
    lp, loss, grads = _loss_and_grads(_model(model_dir, device, torch.bfloat16), device)
    _, mask, _ = _batch()
    # bf16 weights and activations (8 bits of mantissa) through 2 layers: per-token log-probs move by
    # a few hundredths of a nat, not by tenths (a wrong head, mask or alignment gives O(1) errors).
    diff = (lp - ref_lp)[mask].abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1, (diff.mean().item(), diff.max().item())
    g, ref = _flat(grads), _flat(ref_grads)
    cosine = torch.nn.functional.cosine_similarity(g, ref, dim=0)
    assert cosine > 0.99, cosine.item()  # the update points the same way
    assert 0.9 < g.norm() / ref.norm() < 1.1
    assert torch.isfinite(loss) and abs(loss - ref_loss) < 0.02


def test_the_focal_weight_scales_the_device_gradient(model_dir: Path, device: torch.device) -> None:
    """F-GRPO's g = (1 - success rate)^gamma multiplies the group's advantages (paper Eq. 7), so with
    one correct rollout in 4 the gamma=1 gradient is exactly 0.75 of the gamma=0 (GRPO) one."""
    model = _model(model_dir, device, torch.float32)
    ids, mask, rewards = _batch()
    ids, mask = ids.to(device), mask.to(device)
    head = LogprobHead(model.get_output_embeddings(), chunk_tokens=64)
    flats = []
    for gamma in (0.0, 1.0):
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        logprobs, _ = head(hidden, ids, mask, False)
        adv = group_advantages(rewards.view(1, G), gamma=gamma)[0].view(G, 1).expand_as(mask).to(device)
        loss, _ = policy_loss(logprobs, logprobs.detach(), adv.float(), mask, loss_type="grpo")
        model.zero_grad(set_to_none=True)
        loss.backward()
        flats.append(torch.cat([p.grad.flatten().cpu() for _, p in sorted(model.named_parameters())]))
    assert float(focal_weight(torch.tensor([0.25]), 1.0)) == pytest.approx(0.75)
    # atol: float32 rounding of the largest gradient entries, not a tolerance on the 0.75 itself
    torch.testing.assert_close(flats[1], 0.75 * flats[0], rtol=1e-4, atol=1e-5 * float(flats[0].abs().max()))
