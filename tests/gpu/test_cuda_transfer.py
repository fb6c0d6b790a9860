"""The torchdist weight transport on CUDA (the ``gpu`` tier): learner-side ``WeightSender`` on one GPU
broadcasting packed buckets over NCCL to a torch.distributed receiver on another GPU, the same code the
CPU path runs over gloo (only the backend string and the device differ).

NCCL refuses two ranks on one GPU, so the NCCL case needs two visible GPUs; on a one-GPU machine the
test runs the CUDA buffers over gloo (gloo broadcasts CUDA tensors through host staging), which still
checks that packing, piece slicing and the loader's views work on device memory. With
``RLSYS_GPU_TESTS_ON=cpu`` the same checks run on CPU tensors (tests the test itself).

Needs only torch (the GPU machines' image has no vLLM or Ray): the vLLM end of the protocol is
covered on CPU by tests/integration/test_weight_transfer.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from rlsys.workers.torchdist import TensorMeta, WeightSender, init_group, receive_buckets, receiver_timeout_s

pytestmark = pytest.mark.gpu


def _setup() -> tuple[str, torch.device, torch.device]:
    """(backend, sender device, receiver device) for this machine."""
    if os.environ.get("RLSYS_GPU_TESTS_ON") == "cpu":
        return "gloo", torch.device("cpu"), torch.device("cpu")
    if torch.cuda.device_count() >= 2:
        return "nccl", torch.device("cuda:0"), torch.device("cuda:1")
    return "gloo", torch.device("cuda:0"), torch.device("cuda:0")


def _weights(device: torch.device) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        ("embed", torch.randn(512, 256, generator=g).to(device, torch.bfloat16)),
        ("norm", torch.randn(256, generator=g).to(device)),
        ("proj", torch.randn(256, 768, generator=g).to(device, torch.bfloat16)),
        ("bias", torch.randn(7, generator=g).to(device, torch.float16)),
    ]


def _receive(addr, meta, backend, device_str, queue):  # a spawned process: one engine rank
    device = torch.device(device_str)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = init_group(addr, 1, backend, receiver_timeout_s(30.0))
    sums: dict[str, float] = {}

    def load(pairs):
        for name, t in pairs:
            assert t.device.type == device.type, (name, t.device)
            sums[name] = float(t.double().sum())

    got = receive_buckets(group, meta, 64 << 10, 32 << 10, device, load)
    queue.put((got["digest"], got["nbytes"], sums))
    group.shutdown()


def test_a_bucketed_broadcast_delivers_the_exact_weights_on_device() -> None:
    backend, send_dev, recv_dev = _setup()
    named = _weights(send_dev)
    meta = [TensorMeta.of(n, t) for n, t in named]
    sender = WeightSender(backend, send_dev, timeout_s=30.0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    addr = sender.open(0, 2)
    proc = ctx.Process(target=_receive, args=(addr, meta, backend, str(recv_dev), queue))
    proc.start()
    try:
        sender.join(0)
        report = sender.send(iter(named), meta, 64 << 10, 32 << 10)
        assert report.failed == {}
        digest, nbytes, sums = queue.get(timeout=120)
        assert (digest, nbytes) == (report.digest, report.nbytes)
        assert nbytes >= sum(m.nbytes for m in meta)  # buckets pad each tensor to 64-byte offsets
        for name, t in named:
            assert sums[name] == float(t.double().sum()), name
    finally:
        sender.close_all()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
