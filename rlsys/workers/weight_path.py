"""Weight paths: how one sync moves the learners' weights into every rollout engine (``sync.transport``).

* :class:`ObjectStorePath` - rank 0 ``ray.put``s weight buckets, each engine pulls them into one
  ``reload_weights`` call (in-process engines only; :mod:`rlsys.workers.weight_sync`).
* :class:`TorchDistPath` - vLLM's weight-transfer protocol over one stateless gloo/NCCL group per
  engine (:mod:`rlsys.workers.torchdist`, :class:`rlsys.workers.vllm_ext.TorchDistTransferEngine`).

Both have ``push(version) -> SyncReport`` and the same contract: when ``push`` returns, every engine
holds ``version`` (verified: for torchdist, each TP rank's crc32 of the received bytes equals the
sender's) or the call raised. A rollout worker that dies, hangs or fails during a torchdist transfer
is named in a warning, replaced within ``rollout.max_restarts``, and the replacement joins a fresh
group and receives the same weights before ``push`` returns: no engine samples from half-updated
weights (an engine whose transfer failed refuses to sample until it is replaced).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from rlsys.workers.supervision import WorkerError, short_error
from rlsys.workers.torchdist import TensorMeta, TransferError, receiver_timeout_s

log = logging.getLogger("rlsys.sync")

__all__ = ["ObjectStorePath", "SyncReport", "TorchDistPath", "TransferMismatch"]


@dataclass(frozen=True)
class SyncReport:
    """What one push did: bytes sent per engine, the sender's seconds (0 when unknown), and the
    rollout workers replaced because their transfer failed."""

    transport: str
    nbytes: int
    seconds: float  # the whole push, replacements included
    replaced: tuple[int, ...] = field(default_factory=tuple)
    send_seconds: float = 0.0  # torchdist: learner rank 0 streaming, packing and broadcasting
    send_wait_seconds: float = 0.0  # of which waiting on the broadcasts
    # torchdist: per engine, each TP rank's transfer state (TorchDistTransferEngine.last)
    engines: dict[int, list[dict]] = field(default_factory=dict)


class TransferMismatch(RuntimeError):
    """An engine reported other bytes (crc32) or another version than the sender sent."""


class ObjectStorePath:
    """Buckets through Ray's object store (the rollout group keeps the refs to re-push a replacement)."""

    transport = "object_store"

    def __init__(self, learners: Any, rollout: Any, bucket_bytes: int) -> None:
        self.learners, self.rollout, self.bucket_bytes = learners, rollout, bucket_bytes

    def push(self, version: int) -> SyncReport:
        t0 = time.perf_counter()
        with self.rollout.weights_lock:  # no replacement in the middle (rlsys.workers.rollout)
            refs = self.learners.export_weight_buckets(self.bucket_bytes)
            self.rollout.load_weight_buckets(refs, version)
        return SyncReport(self.transport, 0, time.perf_counter() - t0)

    def trained(self, version: int) -> None:
        """The learners now hold ``version`` (not pushed yet). A replacement is re-pushed the kept
        buckets, which are the engines' version, so there is nothing to track."""


class TorchDistPath:
    """One transfer group per rollout engine, learner rank 0 the sender of all (see the module doc).

    ``start()`` forms every group (the engines' initial weights are version 0, so nothing is sent) and
    makes this path the rollout group's weight feed, so a worker replaced at any time (during a
    rollout too) joins a fresh group and receives the current weights. ``tp_size``: ranks per engine.
    """

    transport = "torchdist"

    def __init__(
        self,
        learners: Any,
        rollout: Any,
        *,
        backend: str,
        bucket_bytes: int,
        piece_bytes: int,
        timeout_s: float,
        tp_size: int = 1,
    ) -> None:
        self.learners, self.rollout = learners, rollout
        self.backend, self.bucket_bytes, self.piece_bytes = backend, bucket_bytes, piece_bytes
        self.timeout_s, self.tp_size = float(timeout_s), tp_size
        self.version = 0  # pushed to every engine
        # What the learners hold: ahead of ``version`` between the end of a train phase and its push,
        # when a replacement (attach) receives these weights and must carry their version.
        self.held = 0
        self.meta: list[TensorMeta] = []

    # ---- groups ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.meta = list(self.learners.weight_meta())
        self._connect({i: w for i, w in enumerate(self.rollout.workers)})
        self.rollout.set_weight_feed(self)
        log.info(
            "sync: torchdist (%s) groups formed with %d rollout engine(s); %d tensors, %.1f MB per sync",
            self.backend,
            len(self.rollout.workers),
            len(self.meta),
            sum(m.nbytes for m in self.meta) / 1e6,
        )

    def _connect(self, actors: dict[int, Any]) -> None:
        """Form a fresh group with each of ``actors`` (engine id -> actor): both ends join at once."""
        import ray

        joins = []
        for i, actor in actors.items():
            addr = self.learners.open_weight_group(i, 1 + self.tp_size, self.backend, self.timeout_s)
            joins.append(actor.join_weight_group.remote(addr, self.backend, receiver_timeout_s(self.timeout_s)))
            joins.append(self.learners.join_weight_group_async(i))
        ray.get(joins, timeout=self.timeout_s + 60)

    def attach(self, index: int, actor: Any) -> int:
        """A fresh actor for worker ``index``: join a new group; past version 0 receive the weights
        the learners hold, labelled ``held`` (a failure here counts as another failure of the
        worker). Runs under the rollout group's ``weights_lock``. Returns the bytes sent."""
        self._connect({index: actor})
        if self.held == 0:
            return 0
        report, failed, _ = self._transfer({index: actor}, self.held)
        if failed:
            raise failed[index]
        return report.nbytes

    # ---- one sync -------------------------------------------------------------------------------

    def trained(self, version: int) -> None:
        """The learners now hold ``version`` (pushed later): what a replacement receives until then."""
        self.held = int(version)

    def push(self, version: int) -> SyncReport:
        t0 = time.perf_counter()
        with self.rollout.weights_lock:  # no replacement in the middle (rlsys.workers.rollout)
            actors = dict(enumerate(self.rollout.workers))
            report, failed, states = self._transfer(actors, version)
            self.version = self.held = int(version)
            replaced = []
            for i, exc in sorted(failed.items()):
                log.warning(
                    "phase sync: rollout worker %d failed receiving weights v%d: %s", i, version, short_error(exc)
                )
                # The replacement joins a fresh group and receives v`version` (attach) before this returns.
                self.rollout.restart_worker(i, f"sync (receiving weights v{version})", exc, actors[i])
                replaced.append(i)
        return SyncReport(
            self.transport,
            report.nbytes,
            time.perf_counter() - t0,
            tuple(replaced),
            send_seconds=report.seconds,
            send_wait_seconds=report.wait_seconds,
            engines=states,
        )

    def _transfer(self, actors: dict[int, Any], version: int) -> tuple[Any, dict[int, BaseException], dict]:
        """Send the current weights as ``version`` to ``actors``' groups; return (the sender's
        SendReport, the workers whose transfer failed -> why, the others' TP-rank states). A learner
        failure raises."""
        import ray

        groups = sorted(actors)
        # Receivers first, then the sender: every end must be in the collective before any waits.
        recv = {
            i: a.receive_weights.remote(self.meta, version, self.bucket_bytes, self.piece_bytes)
            for i, a in actors.items()
        }
        send = self.learners.send_weights_async(self.meta, self.bucket_bytes, self.piece_bytes, groups)
        deadline = time.monotonic() + receiver_timeout_s(self.timeout_s) + 60
        try:
            reports = ray.get(send, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            for ref in recv.values():
                ray.cancel(ref, force=False)
            raise WorkerError(
                f"phase sync: the learners failed sending weights v{version}: {short_error(exc)}", group="learner"
            ) from exc
        report = reports[0]
        # Every receiver the sender did not drop holds all the bytes now; loading what is left must
        # fit in one more sync.timeout_s.
        deadline = time.monotonic() + self.timeout_s
        failed: dict[int, BaseException] = {
            g: TransferError(f"the sender dropped its group: {why}") for g, why in report.failed.items()
        }
        received: dict[int, list[dict]] = {}
        for i, ref in recv.items():
            if i in failed:
                continue  # hung or dead: the replacement kills it; do not wait on it
            try:
                states = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - death, timeout or a receive error: all mean replace
                failed[i] = exc
                continue
            bad = [s for s in states if s["version"] != version or s["digest"] != report.digest]
            if bad:
                failed[i] = TransferMismatch(
                    f"rollout worker {i} received {bad[0]} but the learner sent version {version}, crc32 "
                    f"{report.digest} ({report.nbytes} bytes)"
                )
            else:
                received[i] = states
        return report, failed, received
