"""Rollout workers: each owns one vLLM engine and samples G completions per prompt.

``RolloutEngine`` is a plain class (testable without Ray); ``RolloutWorkerActor`` is its thin Ray
actor; ``RolloutGroup`` (older name ``RolloutPool``) is the driver-side handle that spreads prompts
over the workers and joins the results back by prompt id. The group survives worker deaths: a dead
worker is replaced, brought to the latest pushed weights, and its in-flight prompts are re-issued
with the same seeds (see :class:`RolloutGroup`).

Naming: ``RolloutGroup`` here is the group of rollout *actors*; :class:`rlsys.records.RolloutGroup`
is one prompt's group of G completions (the GRPO group). This module refers to the record as
``records.RolloutGroup`` to keep the two apart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from rlsys import records
from rlsys.records import RolloutRequest
from rlsys.workers.group import ActorGroup, Labels, SupervisedGroup
from rlsys.workers.supervision import RestartPolicy, remove_files, same_node, short_error
from rlsys.workers.vllm_engine import AsyncRolloutEngine, GenerationStats, RolloutEngine, RolloutSpec

log = logging.getLogger("rlsys.rollout")


def _iter_bucket_refs(refs: list) -> Iterator[tuple[str, Any]]:
    """Pull weight buckets from Ray's object store one at a time (bounded memory)."""
    import ray

    from rlsys.workers.weight_sync import unpack_bucket

    for ref in refs:
        bucket = ray.get(ref)
        yield from unpack_bucket(bucket)
        del bucket


_SHM_PREFIX = "/dev/shm/psm_"  # multiprocessing.shared_memory segments (vLLM's shm message queues)


def _mapped_shm() -> set[str]:
    """The Python shared-memory segments this process has mapped or open (empty without /proc)."""
    paths: set[str] = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith(_SHM_PREFIX) and not parts[5].endswith("(deleted)\n"):
                    paths.add(parts[5].strip())
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(_SHM_PREFIX) and not target.endswith("(deleted)"):
                paths.add(target)
    except OSError:
        pass  # not Linux: only the rendezvous file is known
    return paths


def _rank_scratch(worker: Any) -> list[str]:
    """Runs in each of vLLM's worker ranks (via collective_rpc): the rendezvous file the engine started
    with and the segments the rank maps (a TP rank creates queues the actor itself never maps)."""
    paths = _mapped_shm()
    uri = str(getattr(worker, "distributed_init_method", "") or "")
    if uri.startswith("file://"):
        paths.add(uri[len("file://") :])
    return sorted(paths)


class RolloutWorkerActor:
    """Ray actor shell around RolloutEngine (heavy imports happen in the engine's constructor)."""

    def __init__(self, spec: RolloutSpec, worker_id: int):
        self.engine = RolloutEngine(spec, worker_id)

    def ready(self) -> int:
        return self.engine.worker_id

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        return self.engine.describe()

    def scratch_files(self) -> dict:
        """Where this process runs and the files it leaves behind if it is killed without shutdown.

        ``{"node_id": ..., "pid": ..., "paths": [...]}``: vLLM's file-store rendezvous
        (``vllm_dist_*`` in the temp dir) and the Python shared-memory segments
        (``/dev/shm/psm_*``, vLLM's message queues) this process or any of its TP ranks has mapped or open. Other
        ``/dev/shm`` files (Ray's object store) are not vLLM's and never listed. The engine's
        ``shutdown`` removes these; after a SIGKILL the pool removes them instead.
        """
        import ray

        paths = _mapped_shm()
        llm = self.engine.llm
        if llm is not None:
            for rank_paths in llm.collective_rpc(_rank_scratch):
                paths.update(rank_paths)
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "paths": sorted(paths)}

    def generate(self, requests: list[RolloutRequest], group_size: int, seeds: list[int]):
        return self.engine.generate(requests, group_size, seeds)

    def load_weight_buckets(self, bucket_refs: list, version: int) -> int:
        # The refs arrive inside a list, so Ray does not resolve them eagerly: each bucket is
        # fetched only when the loader reaches it.
        return self.engine.load_weights(_iter_bucket_refs(bucket_refs), version)

    def join_weight_group(self, addr: Any, backend: str, timeout_s: float) -> None:
        self.engine.join_weight_group(addr, backend, timeout_s)

    def receive_weights(self, meta: list, version: int, bucket_bytes: int, piece_bytes: int) -> list[dict]:
        return self.engine.receive_weights(meta, version, bucket_bytes, piece_bytes)

    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        return self.engine.sequence_logprobs(token_ids)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def vllm_weight_version(self) -> str:
        """The version vLLM itself holds (set by the transfer protocol's finish step)."""
        return str(self.engine.llm.get_weight_version())

    def shutdown(self) -> None:
        self.engine.shutdown()


class AsyncRolloutWorkerActor:
    """Ray async actor around :class:`~rlsys.workers.vllm_engine.AsyncRolloutEngine`: its methods share
    one event loop, so ``receive_weights`` runs while ``generate`` calls are in flight (they pause,
    then continue under the new weights)."""

    def __init__(self, spec: RolloutSpec, worker_id: int):
        self.engine = AsyncRolloutEngine(spec, worker_id)

    async def ready(self) -> int:
        return self.engine.worker_id

    async def pid(self) -> int:
        return os.getpid()

    async def describe(self) -> dict:
        return await self.engine.describe()

    async def scratch_files(self) -> dict:
        # AsyncLLM's engine core is a child process of this actor and exits when the actor dies
        # (tests/integration/test_async_engine.py); it talks to the actor over sockets, and a SIGKILLed
        # async worker was seen to leave no /dev/shm segment and no rendezvous file behind.
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "paths": []}

    async def generate(self, requests: list[RolloutRequest], group_size: int, seeds: list[int]):
        return await self.engine.generate(requests, group_size, seeds)

    async def load_weight_buckets(self, bucket_refs: list, version: int) -> int:
        raise RuntimeError(
            f"rollout worker {self.engine.worker_id}: the async engine takes weights through "
            "sync.transport=torchdist only"
        )

    async def join_weight_group(self, addr: Any, backend: str, timeout_s: float) -> None:
        await self.engine.join_weight_group(addr, backend, timeout_s)

    async def receive_weights(self, meta: list, version: int, bucket_bytes: int, piece_bytes: int) -> list[dict]:
        return await self.engine.receive_weights(meta, version, bucket_bytes, piece_bytes)

    async def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        return await self.engine.sequence_logprobs(token_ids)

    async def weight_version(self) -> int:
        return self.engine.weight_version

    async def vllm_weight_version(self) -> str:
        return await self.engine.vllm_weight_version()

    async def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutGroup(SupervisedGroup):
    """Driver-side handle over ``num_workers`` rollout actors that survives worker deaths.

    Contract:

    * ``generate`` returns exactly one group per requested prompt, in request order, or raises;
      a missing, unexpected or duplicated group is an error, never a silent loss.
    * A worker whose actor dies (SIGKILL, OOM, crash; see
      :func:`rlsys.workers.supervision.is_actor_death`) during ``generate``, ``load_weight_buckets``
      or ``sequence_logprobs`` is killed for good, replaced by a fresh actor with the same worker
      id, brought to the latest weights pushed through ``load_weight_buckets`` (a fresh engine
      starts from ``spec.model_path``), and only that worker's calls are re-issued, with the same
      per-prompt seeds: re-issued groups come from the same (weights, prompt, seed).
    * Replacements are bounded: more than ``max_restarts`` per worker over the group's life raises
      :class:`~rlsys.workers.supervision.WorkerError` naming the worker, the phase and the last
      error. A replacement that fails to start counts as another failure of that worker. Errors
      raised *by* a call (bad input, a bug: WorkerError) and calls overrunning ``timeout_s``
      (:class:`~rlsys.workers.supervision.WorkerTimeout`) are not retried.
    * With a weight feed set (``set_weight_feed``: the torchdist path) a replacement is brought up
      to date by the feed (a fresh transfer group, the current weights). Without one, the group keeps
      the latest weight-bucket refs to re-push (one copy of the model in Ray's object store between
      syncs) until the next ``load_weight_buckets`` replaces them.

    * Thread use: ``generate`` may run on one thread (the off-policy modes' prefetch thread) while
      another pushes weights. ``weights_lock`` (an RLock) is held by every replacement and by the
      weight paths' pushes, so a replacement never interleaves with a push, and the driver holds it
      while the learners train, so a replacement never reads weights half-way between versions.
      An actor that two threads see die is replaced once.

    ``restarts`` counts replacements over the group's life; ``GenerationStats.restarts`` the ones
    during one generate call. The supervision itself is :class:`rlsys.workers.group.ActorGroup`.
    """

    def __init__(
        self,
        spec: RolloutSpec,
        num_workers: int,
        num_cpus: float,
        num_gpus: float = 0.0,
        timeout_s: float = 600.0,
        ready_timeout_s: float = 600.0,
        max_restarts: int = 3,
        restart_backoff_s: float = 0.5,
        num_threads: int | None = None,
        sync_timeout_s: float | None = None,
    ):
        from rlsys.cluster import actor_options

        if num_workers < 1:
            raise ValueError(f"RolloutPool needs num_workers >= 1, got {num_workers}")
        self.spec = spec
        self.timeout_s = float(timeout_s)
        # A weight push (``load_weight_buckets``, also into a replacement) has its own deadline
        # (``sync.timeout_s``); None: ``timeout_s`` like every other call.
        self.sync_timeout_s = self.timeout_s if sync_timeout_s is None else float(sync_timeout_s)
        self.ready_timeout_s = float(ready_timeout_s)
        self._weights: tuple[list, int] | None = None  # latest (bucket refs, version) pushed
        # A weight path that brings a fresh worker to the current weights itself (torchdist: join its
        # transfer group and receive them); None: re-push the kept bucket refs.
        self._feed: WeightFeed | None = None
        self._scratch: list[dict] = [{} for _ in range(num_workers)]
        self._group = ActorGroup(
            AsyncRolloutWorkerActor if spec.engine == "async" else RolloutWorkerActor,
            num_workers,
            labels=_RolloutLabels(spec.model_path, self.timeout_s, lambda: self.weight_version),
            init_args=lambda i: ((spec, i), {}),
            options=actor_options(num_cpus, num_gpus, num_threads=num_threads),
            ready_timeout_s=self.ready_timeout_s,
            restart=RestartPolicy(max_restarts=max_restarts, backoff_s=restart_backoff_s),
            config_key="rollout.max_restarts",
            on_start=self._on_start,
            on_retire=self._on_retire,
        )
        self._group.start()

    @property
    def workers(self) -> list[Any]:
        """The live actor handles, by worker id (empty after ``shutdown``)."""
        return self._group.actors

    @property
    def weight_version(self) -> int:
        """Version of the latest weights pushed (0: the initial ones)."""
        if self._feed is not None:
            return self._feed.version
        return self._weights[1] if self._weights is not None else 0

    @property
    def weights_lock(self) -> threading.RLock:
        """Held by every replacement and weight push (see the class doc)."""
        return self._group.replace_lock

    def set_weight_feed(self, feed: WeightFeed | None) -> None:
        """From now on a replaced worker is brought up to date by ``feed.attach(index, actor)``."""
        self._feed = feed

    def restart_worker(self, index: int, what: str, exc: BaseException, actor: Any = None) -> None:
        """Replace worker ``index`` (it is alive but unusable, or hung: ``exc`` says why) within the
        restart budget; the replacement is brought to the current weights like any other. ``actor``:
        the handle that failed (nothing is done if another thread has replaced it already)."""
        self._group.replace(index, what, exc, actor)

    # ---- supervision hooks ------------------------------------------------------------------------

    def _on_start(self, i: int, worker: Any) -> int | None:
        """A fresh actor for worker i (engine up): record its scratch files, load the latest weights.

        Returns the number of tensors loaded (None when no weights were pushed yet: the engine's
        initial ``spec.model_path`` weights are version 0).
        """
        import ray

        self._scratch[i] = ray.get(worker.scratch_files.remote(), timeout=60)
        if self._feed is not None:
            return self._feed.attach(i, worker)
        if self._weights is None:
            return None
        refs, version = self._weights
        return ray.get(worker.load_weight_buckets.remote(refs, version), timeout=self.sync_timeout_s)

    def _on_retire(self, i: int) -> None:
        """Worker i's actor was killed: remove the files a killed engine leaves behind."""
        scratch, self._scratch[i] = self._scratch[i], {}
        if scratch.get("paths") and same_node(scratch.get("node_id")):
            # The process may take a moment to go after ray.kill; its files are unique to it
            # (random names), so removing them now cannot hurt another engine.
            removed = remove_files(scratch["paths"])
            if removed:
                log.info(
                    "rollout worker %d: removed %d file(s) left by the dead engine: %s",
                    i,
                    len(removed),
                    ", ".join(removed),
                )

    def _run(
        self, calls: dict[int, Callable[[Any], Any]], phase: str, redo: bool = True, timeout_s: float | None = None
    ) -> tuple[dict[int, Any], dict[int, int]]:
        """``ActorGroup.call`` with ``timeout_s`` (default: the group's) per call (see there for
        deaths, redo and errors)."""
        return self._group.call(calls, phase, self.timeout_s if timeout_s is None else timeout_s, redo=redo)

    # ---- calls ------------------------------------------------------------------------------------

    def generate(
        self, requests: list[RolloutRequest], group_size: int, seeds: dict[str, int]
    ) -> tuple[list[records.RolloutGroup], list[GenerationStats]]:
        """Spread requests over the workers; return one group per request, in request order.

        Results are joined by prompt id; a missing or duplicated group is an error, never a silent
        loss. ``seeds`` maps prompt id -> sampler seed; a shard whose worker dies is re-issued to the
        replacement with the same seeds. Stats: one per busy worker, in worker order.
        """
        ids = [r.prompt_id for r in requests]
        if len(set(ids)) != len(ids):
            dups = sorted(p for p, n in Counter(ids).items() if n > 1)
            raise ValueError(f"phase rollout: duplicate prompt ids in one generate call: {dups[:5]}")
        unseeded = [p for p in ids if p not in seeds]
        if unseeded:
            raise ValueError(f"phase rollout: no seed for prompts {unseeded[:5]}")
        shards: dict[int, list[RolloutRequest]] = {}
        for k, r in enumerate(requests):
            shards.setdefault(k % len(self.workers), []).append(r)

        def call(shard: list[RolloutRequest]) -> Callable[[Any], Any]:
            shard_seeds = [seeds[r.prompt_id] for r in shard]
            return lambda w: w.generate.remote(shard, group_size, shard_seeds)

        results, restarts = self._run({i: call(shard) for i, shard in shards.items()}, "rollout")
        by_id: dict[str, records.RolloutGroup] = {}
        stats = []
        for i in sorted(results):
            groups, st = results[i]
            expected = {r.prompt_id for r in shards[i]}
            for g in groups:
                if g.prompt_id not in expected:
                    raise RuntimeError(
                        f"phase rollout: worker {i} returned a group for prompt {g.prompt_id!r}, "
                        f"which it was not asked for"
                    )
                if g.prompt_id in by_id:
                    raise RuntimeError(f"phase rollout: prompt {g.prompt_id} came back twice")
                by_id[g.prompt_id] = g
            stats.append(replace(st, restarts=restarts[i]))
        missing = [p for p in ids if p not in by_id]
        if missing:
            raise RuntimeError(f"phase rollout: no group came back for prompts {missing[:5]}")
        return [by_id[p] for p in ids], stats

    def load_weight_buckets(self, bucket_refs: list, version: int) -> list[int]:
        """Load the learner's weight buckets into every worker and set their weight version.

        The pool keeps ``bucket_refs`` (the list and the objects it references stay alive until
        the next call) so that a worker replaced later is brought to these weights; callers may
        drop their own references. Returns the number of tensors each worker loaded.
        """
        refs, version = list(bucket_refs), int(version)
        # Recorded first: a worker replaced during this very push must come up with these weights.
        self._weights = (refs, version)
        calls = {i: (lambda w: w.load_weight_buckets.remote(refs, version)) for i in range(len(self.workers))}
        results, _ = self._run(calls, f"sync (loading weights v{version})", redo=False, timeout_s=self.sync_timeout_s)
        return [results[i] for i in range(len(self.workers))]

    def sequence_logprobs(self, token_ids: list[int], worker: int | None = None) -> list[np.ndarray]:
        """Probe logprobs from every worker (or one): one [L - 1] array per worker."""
        targets = range(len(self.workers)) if worker is None else [worker]
        results, _ = self._run({i: (lambda w: w.sequence_logprobs.remote(token_ids)) for i in targets}, "sync check")
        return [results[i] for i in targets]

    def describe(self) -> list[dict]:
        """Per worker: the dtype its engine computes in and its compute threads (what really runs)."""
        import ray

        return ray.get([w.describe.remote() for w in self.workers], timeout=60)

    def shutdown(self) -> None:
        """Shut every engine down, kill the actors, remove files a killed engine left (idempotent).

        When the job is being stopped by a signal (rlsys.signals) the engines are killed without
        the graceful call, which would queue behind a generate call still running."""
        self._group.shutdown("shutdown", timeout_s=60.0)
        self._weights = None


class WeightFeed(Protocol):
    """What a rollout group needs from a weight path that delivers weights itself (torchdist)."""

    @property
    def version(self) -> int: ...

    def attach(self, index: int, actor: Any) -> Any:
        """Bring the fresh actor of worker ``index`` to the current weights (a no-op at version 0)."""
        ...


#: The older name of :class:`RolloutGroup` (same class).
RolloutPool = RolloutGroup


class _RolloutLabels(Labels):
    """Messages as "phase rollout: rollout worker 1 died"; the restart line names the weight version."""

    def __init__(self, model_path: str, timeout_s: float, weight_version: Callable[[], int]):
        super().__init__("rollout", "rollout worker")
        self.model_path = model_path
        self.timeout_s = timeout_s
        self.weight_version = weight_version

    def workers(self, indices: Sequence[int]) -> str:
        return f"rollout worker(s) {list(indices)}"

    def timeout(self, indices: Sequence[int], what: str, deadline_s: float, hint: str = "") -> str:
        if what == "starting":
            return f"{self.workers(indices)} did not start a vLLM engine from {self.model_path} within {deadline_s:g} s"
        key = "sync.timeout_s" if what.startswith("sync (loading") else "rollout.timeout_s"
        return f"phase {what}: {self.workers(indices)} did not answer within {key}={deadline_s:g} s"

    def start_failed(self, index: int, exc: BaseException) -> str:
        return f"rollout worker {index} failed to start its vLLM engine from {self.model_path}: {short_error(exc)}"

    def restarted(self, index: int, what: str, seconds: float) -> str:
        return (
            f"phase {what}: rollout worker {index} restarted in {seconds:.1f} s at weight version "
            f"{self.weight_version()}"
        )
