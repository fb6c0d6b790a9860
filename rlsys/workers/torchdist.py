"""The torchdist weight transport: packed byte buckets broadcast over a stateless torch.distributed group.

One group per rollout engine: rank 0 is learner rank 0 (the sender), ranks 1..tp are that engine's
tensor-parallel workers (every TP rank receives the full checkpoint-format tensors and its loader
slices its own shard, as vLLM's own NCCL engine does). Gloo when the engine runs on CPU, NCCL on CUDA;
nothing else differs. A group per engine, rather than one for all, is what lets a replaced engine
join on its own and take the current weights without touching the others, and what keeps one dead or
hung engine from stalling the rest: the sender drops a failed group and carries on.

Both sides derive the same bucket plan from the same metadata (:func:`plan_buckets`), so only the
metadata (names, dtypes, shapes: static across syncs) travels on the control plane and only bytes on
the group. Each bucket is one contiguous uint8 buffer, broadcast in pieces of at most
``piece_bytes`` (large single broadcasts are slow on loopback gloo). Both sides hash the bytes
(``zlib.crc32``, chained over buckets) so a receiver can prove it got exactly what was sent.

Pure torch and the standard library: the sender runs in a learner process that need not have vLLM.
"""

from __future__ import annotations

import math
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

__all__ = [
    "BACKENDS",
    "GroupAddress",
    "SendReport",
    "TensorMeta",
    "TransferError",
    "WeightSender",
    "checked",
    "init_group",
    "plan_buckets",
    "receive_buckets",
    "receiver_timeout_s",
]

BACKENDS = ("gloo", "nccl")

#: Dtypes the transport carries (names as ``str(torch.dtype)`` without the ``torch.`` prefix).
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}


def receiver_timeout_s(timeout_s: float) -> float:
    """A receiver's per-collective timeout for a sender whose timeout is ``timeout_s``.

    Longer than the sender's on purpose: when one group hangs the sender waits ``timeout_s`` on it
    before dropping it, and meanwhile every healthy receiver waits for its next piece; with equal
    timeouts the healthy receivers would give up too."""
    return 2.0 * timeout_s + 30.0


class TransferError(RuntimeError):
    """A transfer failed: a peer died or timed out, or the stream disagreed with its metadata."""


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of the stream: HF checkpoint name, dtype name, shape."""

    name: str
    dtype: str  # a key of _DTYPES
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize

    @staticmethod
    def of(name: str, t: torch.Tensor) -> TensorMeta:
        return TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(int(s) for s in t.shape))


def plan_buckets(meta: Sequence[TensorMeta], bucket_bytes: int) -> list[range]:
    """Indices of ``meta`` per bucket: tensors in order, a bucket closed once it holds ``bucket_bytes``
    or more (so a tensor larger than that is a bucket of its own). Sender and receivers both call this
    on the same metadata; that is what makes their buffer boundaries agree."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[range] = []
    start, size = 0, 0
    for i, m in enumerate(meta):
        if m.dtype not in _DTYPES:
            raise ValueError(f"weight {m.name!r} has dtype {m.dtype}; the transport carries {sorted(_DTYPES)}")
        size += m.nbytes
        if size >= bucket_bytes:
            buckets.append(range(start, i + 1))
            start, size = i + 1, 0
    if start < len(meta):
        buckets.append(range(start, len(meta)))
    return buckets


_ALIGN = 64  # every tensor starts at a multiple of this in its bucket: its view needs an aligned offset


def _layout(items: Sequence[TensorMeta]) -> tuple[list[int], int]:
    """Byte offset of each tensor in its bucket buffer, and the buffer's size."""
    offsets, off = [], 0
    for m in items:
        offsets.append(off)
        off += -(-m.nbytes // _ALIGN) * _ALIGN
    return offsets, off


def _pieces(nbytes: int, piece_bytes: int) -> Iterator[slice]:
    for a in range(0, nbytes, piece_bytes):
        yield slice(a, min(a + piece_bytes, nbytes))


def checked(
    named: Iterable[tuple[str, torch.Tensor]], meta: Sequence[TensorMeta]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``named`` unchanged, raising :class:`TransferError` as soon as it disagrees with ``meta``
    (name, dtype, shape, order or count): a sender that sent other bytes than the receivers expect
    would leave them loading garbage."""
    it = iter(named)
    for i, m in enumerate(meta):
        try:
            name, t = next(it)
        except StopIteration:
            raise TransferError(f"weight stream ended after {i} tensors; the metadata lists {len(meta)}") from None
        got = TensorMeta.of(name, t)
        if got != m:
            raise TransferError(f"weight stream tensor {i} is {got}, the metadata says {m}")
        yield name, t
    for name, _ in it:
        raise TransferError(f"weight stream has a tensor {name!r} past the {len(meta)} in the metadata")


@dataclass(frozen=True)
class GroupAddress:
    """Where a transfer group meets: the sender's TCP store (``host:port``) and the group's size."""

    host: str
    port: int
    world_size: int
    name: str  # unique per group incarnation: a rejoining engine never talks to a stale store


def init_group(
    addr: GroupAddress, rank: int, backend: str, timeout_s: float, listen_socket: socket.socket | None = None
) -> Group:
    """This process's member of the group at ``addr``: a gloo or NCCL backend whose collectives take
    group-local ranks (``pg.broadcast(tensor, 0).wait()``). Rank 0 hosts the store; with
    ``listen_socket`` it serves on that already-bound socket (no race for the port). Blocks until every
    rank has arrived or ``timeout_s`` passed. Every collective on it times out after ``timeout_s``."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"transfer backend must be one of {BACKENDS}, got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        addr.host,
        addr.port,
        addr.world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listen_socket.fileno() if listen_socket is not None else None,
    )
    prefixed = dist.PrefixStore(addr.name, store)
    pg: Any
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, addr.world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, addr.world_size, opts)
    return Group(pg, store)


@dataclass
class Group:
    """A member of a transfer group: the backend (group-local ranks) and the store it met through,
    which must outlive it (rank 0 serves it)."""

    pg: Any
    store: Any

    def broadcast(self, tensor: torch.Tensor, root: int) -> Any:
        return self.pg.broadcast(tensor, root)

    def shutdown(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.pg = self.store = None


def receive_buckets(
    pg: Group,
    meta: Sequence[TensorMeta],
    bucket_bytes: int,
    piece_bytes: int,
    device: torch.device,
    load: Callable[[list[tuple[str, torch.Tensor]]], None],
) -> dict[str, Any]:
    """Receive one weight stream from rank 0 of ``pg`` and hand each bucket's (name, tensor) pairs to
    ``load``; return ``{"digest": crc32 of the bytes, "nbytes", "load_s": seconds inside load,
    "wait_s": seconds waiting on the broadcasts}``.

    Each bucket lands in a fresh buffer and the tensors handed to ``load`` are views of it: a loader
    may keep them (vLLM's layerwise reload holds a layer's tensors until the layer is complete)."""
    digest, total, load_s, wait_s = 0, 0, 0.0, 0.0
    buckets = plan_buckets(meta, bucket_bytes)

    def post(bucket: range) -> tuple[list[TensorMeta], list[int], torch.Tensor, list[Any]]:
        items = [meta[i] for i in bucket]
        offsets, nbytes = _layout(items)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return items, offsets, buf, [pg.broadcast(buf[p], 0) for p in _pieces(nbytes, piece_bytes)]

    # Two buckets in flight: the next one arrives while this one is hashed and loaded.
    nxt = post(buckets[0]) if buckets else None
    for k in range(len(buckets)):
        assert nxt is not None
        items, offsets, buf, works = nxt
        t0 = time.perf_counter()
        for work in works:
            work.wait()
        wait_s += time.perf_counter() - t0
        nxt = post(buckets[k + 1]) if k + 1 < len(buckets) else None
        digest = _crc(buf, digest)
        total += buf.numel()
        t0 = time.perf_counter()
        load([(m.name, buf[o : o + m.nbytes].view(_DTYPES[m.dtype]).view(m.shape)) for m, o in zip(items, offsets)])
        load_s += time.perf_counter() - t0
    return {"digest": digest, "nbytes": total, "load_s": load_s, "wait_s": wait_s}


def _crc(buf: torch.Tensor, digest: int) -> int:
    host = buf if buf.device.type == "cpu" else buf.cpu()
    return zlib.crc32(host.numpy().data, digest)


@dataclass
class SendReport:
    """What one :meth:`WeightSender.send` did: the stream's crc32 and size, and the groups it dropped
    (group id -> the error); every other group got the whole stream."""

    digest: int
    nbytes: int
    seconds: float
    failed: dict[int, str] = field(default_factory=dict)
    wait_seconds: float = 0.0  # of ``seconds``, waiting on the broadcasts (the rest: the stream, packing, crc)


class WeightSender:
    """Learner rank 0's end of every transfer group, one per rollout engine (keyed by engine id).

    ``open`` binds a listening socket and returns the group's address (the caller hands it to the
    engine); ``join`` then blocks until the engine's ranks arrive; ``send`` broadcasts one weight
    stream to the given groups at once, dropping (and reporting) any group that fails; ``close``
    releases a group. A group is never reused after a failure: the engine gets a fresh one."""

    def __init__(self, backend: str, device: torch.device, timeout_s: float, host: str = "127.0.0.1") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"transfer backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.device = device
        self.timeout_s = float(timeout_s)
        self.host = host
        self._sockets: dict[int, socket.socket] = {}
        self._addrs: dict[int, GroupAddress] = {}
        self._groups: dict[int, Group] = {}
        self._serial = 0

    def open(self, group_id: int, world_size: int) -> GroupAddress:
        """A fresh address for group ``group_id`` (any earlier group of that id is closed)."""
        self.close(group_id)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        self._serial += 1
        addr = GroupAddress(self.host, sock.getsockname()[1], world_size, f"rlsys_wt_{group_id}_{self._serial}")
        self._sockets[group_id], self._addrs[group_id] = sock, addr
        return addr

    def join(self, group_id: int) -> None:
        """Block until every rank of group ``group_id`` has joined (``timeout_s``)."""
        addr = self._addrs[group_id]
        sock = self._sockets.pop(group_id)
        try:
            self._groups[group_id] = init_group(addr, 0, self.backend, self.timeout_s, listen_socket=sock)
        finally:
            # The store serves on the socket's fd from now on and closes it; Python must not.
            sock.detach()

    @property
    def groups(self) -> list[int]:
        return sorted(self._groups)

    def send(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        meta: Sequence[TensorMeta],
        bucket_bytes: int,
        piece_bytes: int,
        groups: Sequence[int] | None = None,
    ) -> SendReport:
        """Broadcast the stream ``named`` (checked against ``meta``) to ``groups`` (default: all joined).

        The stream is packed once per bucket and each piece is broadcast on every live group before
        any is waited on, so the groups receive concurrently; the next bucket is packed while the
        previous one is still on the wire. A group whose broadcast fails (its
        engine died, or did not take a piece within ``timeout_s``) is closed and reported in
        ``failed``; the others get the whole stream. The stream is always drained (under ZeRO-3 the
        other learner ranks gather in step with it)."""
        t0 = time.perf_counter()
        live = {g: self._groups[g] for g in (self.groups if groups is None else groups)}
        failed: dict[int, str] = {}
        stream = checked(named, meta)
        digest, total, wait_s = 0, 0, 0.0

        def drop(g: int, exc: Exception) -> None:
            """A broken group is closed and reported, not fatal: the others carry on."""
            failed[g] = f"{type(exc).__name__}: {exc}"
            live.pop(g, None)
            self.close(g)

        def settle(works: dict[int, list[Any]]) -> None:
            """Wait on one bucket's broadcasts."""
            for g, ws in works.items():
                for work in ws:
                    if g in failed:
                        break
                    try:
                        work.wait()
                    except Exception as exc:  # noqa: BLE001 - see drop
                        drop(g, exc)

        # Two buckets in flight: the next one is packed (and the stream advanced) while the
        # previous one is on the wire and the receivers load it.
        inflight: dict[int, list[Any]] = {}
        for bucket in plan_buckets(meta, bucket_bytes):
            items = [meta[i] for i in bucket]
            offsets, nbytes = _layout(items)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            end = 0
            for m, o in zip(items, offsets):
                buf[end:o].zero_()  # the padding is hashed too
                buf[o : o + m.nbytes].copy_(next(stream)[1].contiguous().view(-1).view(torch.uint8))
                end = o + m.nbytes
            buf[end:].zero_()
            digest = _crc(buf, digest)
            total += nbytes
            works: dict[int, list[Any]] = {}
            for g, pg in list(live.items()):
                try:
                    works[g] = [pg.broadcast(buf[p], 0) for p in _pieces(nbytes, piece_bytes)]
                except Exception as exc:  # noqa: BLE001 - see drop
                    drop(g, exc)
            t_wait = time.perf_counter()
            settle(inflight)
            wait_s += time.perf_counter() - t_wait
            inflight = works
        t_wait = time.perf_counter()
        settle(inflight)
        wait_s += time.perf_counter() - t_wait
        for _ in stream:  # raises if the stream runs past the metadata
            pass
        return SendReport(digest, total, time.perf_counter() - t0, failed, wait_s)

    def close(self, group_id: int) -> None:
        """Release group ``group_id`` (idempotent)."""
        pg = self._groups.pop(group_id, None)
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass
        self._addrs.pop(group_id, None)
        sock = self._sockets.pop(group_id, None)
        if sock is not None:
            sock.close()

    def close_all(self) -> None:
        for g in list(self._addrs):
            self.close(g)
