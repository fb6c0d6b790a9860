"""The learner as Ray actors: :data:`LearnerWorker` (one :class:`Learner` per actor) and :class:`LearnerGroup`.

:class:`LearnerGroup` is the driver's handle on ``num_workers`` actors; every call fans out to all
ranks (they are collectives) and errors name the rank and the phase. Nothing here imports Ray,
torch or DeepSpeed at module import: the actor body builds its Learner in the actor process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlsys.records import TrainBatch, TrainStats
from rlsys.workers.batching import num_micro_batches, plan_shards, take_rows
from rlsys.workers.group import ActorGroup, Labels, remote_class
from rlsys.workers.learner.errors import PEER_FAILED, LearnerError, LearnerTimeout
from rlsys.workers.learner.spec import LearnerSpec

__all__ = ["LearnerGroup", "LearnerWorker"]


class _LearnerActor:
    """Ray actor body: one :class:`Learner`; every method is a thin call-through."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, init_file: str) -> None:
        from rlsys.workers.learner.engine import Learner

        self.learner = Learner(spec, rank, world_size, init_file)

    def ready(self) -> dict[str, Any]:
        import torch

        lr = self.learner
        dtype = str(next(lr.engine.module.parameters()).dtype).removeprefix("torch.")
        return {
            "rank": lr.rank,
            "world_size": lr.world_size,
            "device": str(lr.device),
            "init_seconds": lr.init_seconds,
            "pid": os.getpid(),
            "dtype": dtype,
            "threads": torch.get_num_threads(),
        }

    def train_step(self, batch: TrainBatch) -> TrainStats:
        return self.learner.train_step(batch)

    def compute_logprobs(self, batch: TrainBatch) -> np.ndarray:
        return self.learner.compute_logprobs(batch)

    def export_weight_buckets(self, bucket_bytes: int, dtype: str | None = None) -> list:
        """Rank 0: ``ray.put`` each bucket, return the refs (the caller ships them on); others: []."""
        import ray

        # One bucket at a time: each is copied into the object store before the next is packed.
        return [ray.put(b) for b in self.learner.iter_weight_buckets(bucket_bytes, dtype)]

    # ---- the torchdist weight transport (rlsys.workers.torchdist); rank 0 is every group's sender ----

    def weight_meta(self) -> list:
        return self.learner.weight_meta()

    def _sender(self, backend: str, timeout_s: float) -> Any:
        from rlsys.workers.torchdist import WeightSender

        sender = getattr(self, "sender", None)
        if sender is None:
            # NCCL sends from the learner's device; gloo from host memory.
            import torch

            device = self.learner.device if backend == "nccl" else torch.device("cpu")
            host = os.environ.get("RLSYS_TRANSFER_HOST") or _node_ip()
            sender = self.sender = WeightSender(backend, device, timeout_s, host=host)
        return sender

    def open_weight_group(self, group_id: int, world_size: int, backend: str, timeout_s: float) -> Any:
        """Rank 0: a fresh transfer group's address for rollout engine ``group_id``."""
        return self._sender(backend, timeout_s).open(group_id, world_size)

    def join_weight_group(self, group_id: int) -> None:
        """Rank 0: block until the engine's ranks have joined group ``group_id``."""
        self.sender.join(group_id)

    def send_weights(self, meta: list, bucket_bytes: int, piece_bytes: int, groups: list[int] | None) -> Any:
        """Every rank: stream the weights (a collective under ZeRO-3); rank 0 broadcasts them to
        ``groups`` (None: every joined group), checked against ``meta`` (what the receivers were told),
        and returns the SendReport; other ranks return None."""
        named = self.learner.iter_named_weights(copy=False)  # the sender copies each into its bucket
        if self.learner.rank != 0:
            for _ in named:
                pass
            return None
        return self.sender.send(named, meta, bucket_bytes, piece_bytes, groups)

    def save_hf(self, path: str, dtype: str | None = None) -> str | None:
        return self.learner.save_hf(path, dtype)

    def save_state(self, path: str) -> None:
        self.learner.save_state(path)

    def load_state(self, path: str) -> None:
        self.learner.load_state(path)

    def close(self) -> None:
        self.learner.close()


def _node_ip() -> str:
    """This node's address as Ray knows it (the loopback on a local cluster)."""
    import ray

    return str(ray.util.get_node_ip_address())


class _LazyRemote:
    """``LearnerWorker.options(...)`` / ``.remote(...)`` without importing ray at module import."""

    def __getattr__(self, name: str) -> Any:
        return getattr(remote_class(_LearnerActor), name)


#: The Ray actor class: ``LearnerWorker.options(num_cpus=..., ...).remote(spec, rank, world_size, init_file)``.
LearnerWorker = _LazyRemote()


class _LearnerLabels(Labels):
    """Messages as "learner rank 1 failed in phase 'train': ..." (the whole error: it says what is wrong)."""

    def __init__(self) -> None:
        super().__init__("learner", "learner rank")

    @staticmethod
    def _phase(what: str) -> str:
        return "init" if what == "starting" else what

    def timeout(self, indices: Sequence[int], what: str, deadline_s: float, hint: str = "") -> str:
        return (
            f"learner phase {self._phase(what)!r}: rank(s) {sorted(indices)} did not finish within "
            f"{deadline_s:.0f}s (ranks wait for each other in collectives, so one dead or slow rank stalls "
            f"all; check that rank's log).{' ' + hint if hint else ''} Raise the timeout if the model "
            "is just slow."
        )

    def failed(self, index: int, what: str, exc: BaseException) -> str:
        return f"learner rank {index} failed in phase {self._phase(what)!r}: {type(exc).__name__}: {exc}"

    def start_failed(self, index: int, exc: BaseException) -> str:
        return self.failed(index, "init", exc)


class LearnerGroup:
    """Driver-side handle on ``num_workers`` learner actors (data-parallel ranks 0..n-1).

    ``actor_options`` go to ``LearnerWorker.options`` (resources, runtime_env; default
    ``num_cpus=1``; a ``name`` gets ``-{rank}`` appended). ``init_dir`` must be visible to every
    actor (same host, or a shared file system): the process group meets through a fresh file in it.
    The constructor returns once every rank is initialised. Calls block with a timeout and raise
    :class:`LearnerError` naming the phase and the rank that failed (:class:`LearnerTimeout`, also a
    :class:`~rlsys.workers.supervision.WorkerTimeout`, naming the ranks that are late). The ranks
    are one collective group, so a dead rank is not replaced: the group's
    :class:`~rlsys.workers.group.ActorGroup` has no restart policy, and the error names the rank.
    """

    def __init__(
        self,
        spec: LearnerSpec,
        num_workers: int,
        actor_options: dict | None = None,
        init_dir: str | None = None,
        *,
        ready_timeout_s: float = 900.0,
        call_timeout_s: float = 1800.0,
    ) -> None:
        import tempfile

        spec.validate()
        if num_workers < 1:
            raise ValueError(f"LearnerGroup num_workers must be >= 1, got {num_workers}")
        self.spec = spec
        self.num_workers = num_workers
        self.call_timeout_s = call_timeout_s
        # Absolute: the actors resolve it in their own working directory, which is not ours.
        root = Path(init_dir or tempfile.gettempdir()).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        init_file = self.init_file = str(root / f"rlsys_learner_pg_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        if os.path.exists(init_file):
            os.unlink(init_file)  # a stale store would make the ranks disagree on the group
        base = dict(actor_options or {})
        base.setdefault("num_cpus", 1)

        def options(rank: int) -> dict:
            opts = dict(base)
            if "name" in opts:
                opts["name"] = f"{opts['name']}-{rank}"
            return opts

        self._group = ActorGroup(
            _LearnerActor,
            num_workers,
            labels=_LearnerLabels(),
            init_args=lambda rank: ((spec, rank, num_workers, init_file), {}),
            options=options,
            ready_timeout_s=ready_timeout_s,
            restart=None,
            error_type=LearnerError,
            timeout_type=LearnerTimeout,
        )
        try:
            self.ready_info = self._group.start(
                hint="An actor that never starts usually means the cluster lacks the resources asked for "
                f"({base.get('num_cpus')} CPU, {base.get('num_gpus', 0)} GPU per learner)."
            )
        except BaseException:
            self.shutdown()  # the actors are already killed; this removes the rendezvous file
            raise

    @property
    def actors(self) -> list:
        """The rank actors, by rank (empty after ``shutdown``)."""
        return self._group.actors

    def _wait(
        self, issue: Callable[[int, Any], Any], phase: str, timeout: float, refs: dict[int, Any] | None = None
    ) -> list:
        """Run ``issue(rank, actor)`` (an ObjectRef) on every rank and wait for all; fail fast on the
        first error, naming rank and phase. ``refs``, when given, receives each rank's ObjectRef."""

        def on(rank: int) -> Callable[[Any], Any]:
            def call(actor: Any) -> Any:
                ref = issue(rank, actor)
                if refs is not None:
                    refs[rank] = ref
                return ref

            return call

        results, _ = self._group.call({rank: on(rank) for rank in range(self.num_workers)}, phase, timeout)
        return [results[rank] for rank in range(self.num_workers)]

    def shard(self, batch: TrainBatch, pad_token_id: int = 0) -> list[TrainBatch]:
        """The global batch split into one part per rank (see ``batching.shard_train_batch``)."""
        from rlsys.workers.batching import shard_train_batch

        return shard_train_batch(batch, self.num_workers, self.spec.micro_batch_size, pad_token_id)

    def train_step(self, global_batch_parts: list[TrainBatch]) -> TrainStats:
        """One optimizer step over the global batch given as one part per rank; rank 0's (= global) stats."""
        parts = list(global_batch_parts)
        if len(parts) != self.num_workers:
            raise ValueError(
                f"LearnerGroup.train_step: got {len(parts)} batch parts for {self.num_workers} "
                "learners; pass one part per rank (LearnerGroup.shard(batch))"
            )
        sizes = (self.spec.micro_batch_size, self.spec.logprob_micro_batch_size or self.spec.micro_batch_size)
        counts = {tuple(num_micro_batches(p.num_rows, m) for m in sizes) for p in parts}
        if len(counts) != 1:
            raise ValueError(
                f"LearnerGroup.train_step: parts with {[p.num_rows for p in parts]} rows would run "
                "different numbers of micro-batches on different ranks, and the ranks would wait on "
                "each other forever; split the global batch with LearnerGroup.shard(batch)"
            )
        norms = {p.loss_normalizer for p in parts}
        if len(norms) != 1:
            raise ValueError(
                f"LearnerGroup.train_step: parts carry different loss_normalizers {sorted(norms)}; all "
                "must carry the global batch's normalizer"
            )
        return self._wait(lambda r, a: a.train_step.remote(parts[r]), "train", self.call_timeout_s)[0]

    def compute_logprobs(self, batch: TrainBatch, pad_token_id: int = 0) -> np.ndarray:
        """Log-probs [N, L] of a whole batch, its rows spread over the ranks; same layout as the batch."""
        plans = plan_shards(
            batch.attention_mask.sum(axis=1),
            self.num_workers,
            self.spec.logprob_micro_batch_size or self.spec.micro_batch_size,
        )
        rows = [take_rows(batch, plan, pad_token_id) for plan in plans]
        results = self._wait(lambda r, a: a.compute_logprobs.remote(rows[r]), "compute_logprobs", self.call_timeout_s)
        out = np.zeros(batch.input_ids.shape, dtype=np.float32)
        for plan, part in zip(plans, results):
            real = plan >= 0
            out[plan[real]] = part[real]
        return out

    def export_weight_buckets(self, bucket_bytes: int, dtype: str | None = None) -> list:
        """Refs to rank 0's weight buckets (``ray.get`` one -> WeightBucket; unpack_weight_bucket)."""
        return self._wait(
            lambda r, a: a.export_weight_buckets.remote(bucket_bytes, dtype), "export_weights", self.call_timeout_s
        )[0]

    # ---- the torchdist weight transport ---------------------------------------------------------

    def weight_meta(self) -> list:
        """Rank 0's (name, dtype, shape) list of the weight stream, in stream order."""
        return self._rank0("weight_meta", lambda a: a.weight_meta.remote(), 60.0)

    def open_weight_group(self, group_id: int, world_size: int, backend: str, timeout_s: float) -> Any:
        """A fresh transfer group (address) on rank 0 for rollout engine ``group_id``."""
        return self._rank0(
            "open_weight_group", lambda a: a.open_weight_group.remote(group_id, world_size, backend, timeout_s), 60.0
        )

    def join_weight_group_async(self, group_id: int) -> Any:
        """Rank 0 starts waiting for the engine to join group ``group_id``: the ObjectRef (the engine's
        join must be issued before this is waited on)."""
        return self.actors[0].join_weight_group.remote(group_id)

    def send_weights_async(self, meta: list, bucket_bytes: int, piece_bytes: int, groups: list[int] | None) -> list:
        """Every rank starts streaming the weights (rank 0 broadcasting, checked against ``meta``): one
        ObjectRef per rank, rank 0's resolving to the SendReport. The receivers must be issued before
        these are waited on."""
        return self._group.submit(lambda _, a: a.send_weights.remote(meta, bucket_bytes, piece_bytes, groups))

    def _rank0(self, phase: str, issue: Callable[[Any], Any], timeout: float) -> Any:
        results, _ = self._group.call({0: issue}, phase, timeout)
        return results[0]

    def save_hf(self, path: str, dtype: str | None = None) -> str:
        """Hugging Face checkpoint at ``path`` (written by rank 0 on its file system)."""
        return self._wait(lambda r, a: a.save_hf.remote(path, dtype), "save_hf", self.call_timeout_s)[0]

    def save_state(self, path: str, timeout_s: float | None = None) -> None:
        """Every rank's training state into the directory ``path`` (see :meth:`Learner.save_state`).

        ``path`` must be visible to every learner (same host or a shared file system) and hold no
        learner state yet; it is complete when this returns (``learner_state.json`` written last).
        Raises :class:`LearnerError` naming the rank that failed or is late (``timeout_s``, default
        ``call_timeout_s``).
        """
        self._wait_state(
            lambda r, a: a.save_state.remote(path),
            "save_state",
            self.call_timeout_s if timeout_s is None else timeout_s,
        )

    def load_state(self, path: str, timeout_s: float | None = None) -> None:
        """Restore every rank from ``path`` (see :meth:`Learner.load_state`); the next train_step continues
        exactly where the run that saved it would have. The group must have the same number of learners,
        ZeRO stage and dtype; otherwise, or if ``path`` is incomplete, :class:`LearnerError` (wrapping a
        :class:`LearnerStateError` that says what is wrong) and no rank is changed.
        """
        self._wait_state(
            lambda r, a: a.load_state.remote(path),
            "load_state",
            self.call_timeout_s if timeout_s is None else timeout_s,
        )

    def _wait_state(self, issue: Callable[[int, Any], Any], phase: str, timeout: float) -> None:
        """``_wait``, but report the rank that failed, not a rank that stopped because of it.

        save_state/load_state fail on every rank together (they agree before any collective), so
        the first error to arrive may be a bystander's "rank(s) [r] failed"; rank r's own error
        (already raised by then) says what is wrong.
        """
        import ray

        refs: dict[int, Any] = {}
        try:
            self._wait(issue, phase, timeout, refs)
        except LearnerError as e:
            if PEER_FAILED not in str(e):
                raise
            for rank in sorted(refs):
                try:
                    ray.get(refs[rank], timeout=60)
                except Exception as own:
                    if PEER_FAILED not in str(own):
                        raise LearnerError(
                            self._group.labels.failed(rank, phase, own), group="learner", workers=(rank,)
                        ) from own
            raise

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Leave the process group, kill the actors, remove the rendezvous file. Idempotent.

        When the job is being stopped by a signal (rlsys.signals) the actors are killed without
        the graceful close, which would queue behind a train step (or a collective) still running."""
        self._group.shutdown("close", timeout_s=timeout_s)
        if self.init_file and os.path.exists(self.init_file):
            try:
                os.unlink(self.init_file)
            except OSError:
                pass
