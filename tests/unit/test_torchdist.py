"""The torchdist weight transport (rlsys.workers.torchdist): bucket plan, stream checks, and real gloo
groups between processes: exact delivery, a dying and a hanging receiver dropped without harming the
others."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from rlsys.workers.torchdist import (
    TensorMeta,
    TransferError,
    WeightSender,
    checked,
    init_group,
    plan_buckets,
    receive_buckets,
    receiver_timeout_s,
)


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(300, 200, generator=g)),  # 240000 B
        ("b", torch.randn(7, generator=g).to(torch.bfloat16)),  # odd size: the next tensor must still align
        ("c", torch.randn(100, 30, generator=g).half()),
        ("d", torch.arange(5)),  # int64 needs an 8-byte aligned offset
        ("e", torch.randn(64, 64, generator=g)),
        ("f", torch.randn(50, 50, generator=g)),
    ]


def test_the_bucket_plan_closes_a_bucket_once_it_holds_the_budget():
    meta = [TensorMeta("x", "float32", (10,)), TensorMeta("y", "float32", (100,)), TensorMeta("z", "float32", (1,))]
    assert plan_buckets(meta, 40) == [range(0, 1), range(1, 2), range(2, 3)]  # 40 B fills the first
    assert plan_buckets(meta, 41) == [range(0, 2), range(2, 3)]  # a tensor over the budget closes its bucket
    assert plan_buckets(meta, 10_000) == [range(0, 3)]
    assert plan_buckets([], 10) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(meta, 0)
    with pytest.raises(ValueError, match="dtype"):
        plan_buckets([TensorMeta("q", "int8", (3,))], 10)


def test_the_stream_check_names_the_first_disagreement():
    named = _weights()
    meta = [TensorMeta.of(n, t) for n, t in named]
    assert [n for n, _ in checked(iter(named), meta)] == [n for n, _ in named]
    swapped = [named[1], named[0], *named[2:]]
    with pytest.raises(TransferError, match="tensor 0 is .*name='b'"):
        list(checked(iter(swapped), meta))
    with pytest.raises(TransferError, match="ended after 5 tensors"):
        list(checked(iter(named[:5]), meta))
    with pytest.raises(TransferError, match="past the 6"):
        list(checked(iter([*named, ("f", torch.zeros(1))]), meta))
    recast = [(n, t.double() if n == "e" else t) for n, t in named]
    with pytest.raises(TransferError, match="dtype='float64'"):
        list(checked(iter(recast), meta))


def test_receiver_timeout_outlasts_the_senders_wait_on_a_hung_peer():
    assert receiver_timeout_s(5.0) > 2 * 5.0


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _receive(addr, meta, bucket, piece, mode, queue, ready):  # runs in a spawned process
    ready.put(mode)  # torch imported: the sender's join need not cover a spawn's start-up
    group = init_group(addr, 1, "gloo", receiver_timeout_s(4.0))
    got: dict[str, torch.Tensor] = {}
    calls = [0]

    def load(pairs):
        calls[0] += 1
        # At the first bucket: the second is already posted (two in flight), the third is not, so the
        # sender sees the failure on the third.
        if mode == "die" and calls[0] == 1:
            os._exit(3)
        if mode == "hang" and calls[0] == 1:
            time.sleep(60)
        got.update(pairs)  # keeps the views: each bucket must be a fresh buffer

    try:
        got_stats = receive_buckets(group, meta, bucket, piece, torch.device("cpu"), load)
        digest, nbytes = got_stats["digest"], got_stats["nbytes"]
        # As plain bytes: tensors on a queue travel as shared fds that die with this process.
        queue.put((mode, digest, nbytes, {k: (v.dtype, tuple(v.shape), _bytes(v)) for k, v in got.items()}, calls[0]))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((mode, "error", str(exc)[:200], {}, calls[0]))


def test_gloo_groups_deliver_exact_bytes_and_drop_a_dead_and_a_hung_receiver():
    named = _weights()
    meta = [TensorMeta.of(n, t) for n, t in named]
    bucket, piece = 20_000, 50_000  # several buckets, the first one in several pieces
    assert len(plan_buckets(meta, bucket)) >= 3
    sender = WeightSender("gloo", torch.device("cpu"), timeout_s=4.0)
    ctx = mp.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Queue()
    modes = ["ok", "ok", "die", "hang"]
    addrs = {g: sender.open(g, 2) for g in range(len(modes))}
    procs = [
        ctx.Process(target=_receive, args=(addrs[g], meta, bucket, piece, m, queue, ready)) for g, m in enumerate(modes)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        for g in addrs:
            sender.join(g)
        t0 = time.monotonic()
        report = sender.send(iter(named), meta, bucket, piece)
        took = time.monotonic() - t0
        assert sorted(report.failed) == [2, 3], report.failed
        assert took < 4.0 + 10.0  # the hung group costs one sender timeout, not one per piece
        assert sender.groups == [0, 1]  # failed groups are closed
        results = [queue.get(timeout=60) for _ in range(2)]
        for mode, digest, nbytes, got, calls in results:
            assert mode == "ok"
            assert (digest, nbytes) == (report.digest, report.nbytes)
            assert calls == len(plan_buckets(meta, bucket))
            for name, t in named:
                assert got[name] == (t.dtype, tuple(t.shape), _bytes(t)), name
    finally:
        sender.close_all()
        for p in procs:
            p.kill()
            p.join(10)


def test_sender_refuses_a_stream_that_disagrees_with_its_metadata():
    named = _weights()
    meta = [TensorMeta.of(n, t) for n, t in named]
    sender = WeightSender("gloo", torch.device("cpu"), timeout_s=1.0)
    with pytest.raises(TransferError, match="tensor 0"):
        sender.send(iter(named[1:]), meta, 1 << 20, 1 << 20, groups=[])


def test_a_replacement_receives_the_learners_version_even_before_it_is_pushed(monkeypatch):
    """TorchDistPath labels what a fresh engine receives with the version the learners hold
    (``trained``), which runs ahead of the pushed one between a train phase and its push; at
    version 0 a fresh engine already has the weights (nothing is sent)."""
    import threading
    from types import SimpleNamespace

    from rlsys.workers.weight_path import TorchDistPath

    rollout = SimpleNamespace(weights_lock=threading.RLock(), workers=["engine0"])
    path = TorchDistPath(None, rollout, backend="gloo", bucket_bytes=1, piece_bytes=1, timeout_s=1.0)
    sent: list[tuple[list, int]] = []

    def transfer(actors, version):
        sent.append((sorted(actors), version))
        return SimpleNamespace(nbytes=8, seconds=0.0, wait_seconds=0.0), {}, {}

    monkeypatch.setattr(path, "_connect", lambda actors: None)
    monkeypatch.setattr(path, "_transfer", transfer)
    assert path.attach(0, "fresh") == 0 and sent == []  # the initial weights: nothing to send
    path.push(1)
    assert (path.version, path.held) == (1, 1)
    path.trained(2)  # the learners hold v2; the engines still v1
    assert path.attach(0, "fresh") == 8
    assert sent[-1] == ([0], 2) and path.version == 1
    path.push(2)
    assert sent[-1] == ([0], 2) and (path.version, path.held) == (2, 2)
