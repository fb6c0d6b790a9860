"""One supervisor for every group of Ray actors: start, call with deadlines, replace, shut down.

:class:`ActorGroup` owns ``num_workers`` actors of one class and is the only place that waits on
them. The rollout, reward and learner groups hold one and add their own calls (sharding a batch,
joining results back) on top. Its contract:

* ``start()`` creates every actor, waits for its ``ready`` call within ``ready_timeout_s`` (one
  deadline for all: they start concurrently) and runs the ``on_start`` hook on each. Any failure
  kills every actor (a start-up failure cannot leak actors) and raises naming the worker.
* ``call(calls, what, timeout_s)`` issues ``calls[i](actor_i)`` (each returns an ObjectRef) and waits
  for all of them; each call has its own deadline, counted from when it was issued. An error raised
  *by* a call (a bug, a bad input) is not retried; nor is a call that overruns its deadline
  (:class:`~rlsys.workers.supervision.WorkerTimeout`).
* An actor death (:func:`~rlsys.workers.supervision.is_actor_death`) with a ``restart`` policy:
  the actor is killed for good (``on_retire`` runs), replaced after the policy's backoff by a fresh
  one that runs ``on_start`` again (e.g. re-push the latest weights), and its call is re-issued there
  with a fresh deadline; at most ``restart.max_restarts`` times per worker over the group's life
  (:class:`~rlsys.workers.supervision.RestartBudget`), a replacement that fails to start counting as
  another death. With ``restart=None`` a death is fatal and raises naming the worker: for workers
  that are one collective group (the learner ranks), where a fresh rank cannot join the others.
* Several threads may use one group (the off-policy trainer modes generate on a prefetch thread while
  the main thread pushes weights). The calls each ``call`` issues are issued together under a lock,
  so actors that form one collective group (the learner ranks) receive every thread's calls in the
  same order; ``submit`` does the same for calls issued without waiting. A replacement holds
  ``replace_lock`` (which the rollout group also lends out, see :class:`rlsys.workers.rollout.RolloutGroup`) and
  happens once per dead actor: a thread that finds the actor it called already replaced by
  another re-issues its call on the replacement instead of replacing it again.
* ``shutdown()`` calls each actor's graceful method (skipped while the job is being stopped by a
  signal, see :func:`rlsys.signals.stopping`: it would queue behind a call still running), then
  kills every actor. Idempotent.

Every message names the group's phase and worker as the group's :class:`Labels` spell them.
Importing this module does not import Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlsys.workers.supervision import (
    RestartBudget,
    RestartPolicy,
    WorkerError,
    WorkerTimeout,
    is_actor_death,
    short_error,
)

log = logging.getLogger("rlsys.workers")

#: ``call`` takes, per worker index, a function of the actor handle that issues one remote call.
Issue = Callable[[Any], Any]

_REMOTE_CLASSES: dict[type, Any] = {}


class _AlreadyReplaced:
    def __repr__(self) -> str:
        return "ALREADY_REPLACED"


#: What ``ActorGroup.replace`` returns when the actor it was asked to replace had been replaced already.
ALREADY_REPLACED: Any = _AlreadyReplaced()


def remote_class(actor_cls: type) -> Any:
    """``ray.remote(actor_cls)``, made once per class and on first use (so imports stay Ray-free)."""
    remote = _REMOTE_CLASSES.get(actor_cls)
    if remote is None:
        import ray

        remote = _REMOTE_CLASSES[actor_cls] = ray.remote(actor_cls)
    return remote


class Labels:
    """How a group's messages name its workers and phases (override per group).

    ``what`` is what the worker was doing ("grading 8 completions", "rollout", "init").
    """

    def __init__(self, group: str, worker_noun: str):
        self.group = group
        self.worker_noun = worker_noun

    def worker(self, index: int) -> str:
        return f"{self.worker_noun} {index}"

    def workers(self, indices: Sequence[int]) -> str:
        return self.worker(indices[0]) if len(indices) == 1 else f"{self.worker_noun}(s) {list(indices)}"

    def timeout(self, indices: Sequence[int], what: str, deadline_s: float, hint: str = "") -> str:
        return (
            f"phase {what}: {self.workers(indices)} did not answer within {deadline_s:g} s{' ' + hint if hint else ''}"
        )

    def failed(self, index: int, what: str, exc: BaseException) -> str:
        return f"phase {what}: {self.worker(index)} failed: {short_error(exc, 2000)}"

    def start_failed(self, index: int, exc: BaseException) -> str:
        return self.failed(index, "starting", exc)

    def died(self, index: int, what: str) -> str:
        """The start of the "used up its restarts" error and of the restart warning."""
        return f"phase {what}: {self.worker(index)} died"

    def restarted(self, index: int, what: str, seconds: float) -> str:
        return f"phase {what}: {self.worker(index)} restarted in {seconds:.1f} s"


class ActorGroup:
    """``num_workers`` actors of ``actor_cls`` under one supervision policy (see the module docstring).

    ``init_args(i)`` gives actor i's constructor ``(args, kwargs)``; ``options`` (a mapping, or a
    function of i) go to ``.options``. ``on_start(i, actor)`` runs after ``ready`` for the first actors
    and for every replacement (it may block with its own timeouts; its return value is what ``call``
    returns for a call that is not re-issued, ``redo=False``); ``on_retire(i)`` runs after actor i is
    killed (clean up what it left behind). ``restart=None``: a death is fatal. ``config_key`` names the
    setting that raises the restart budget. Errors are ``error_type`` / ``timeout_type`` (subclasses
    of WorkerError / WorkerTimeout, so a group may keep its own error class).
    """

    def __init__(
        self,
        actor_cls: type,
        num_workers: int,
        *,
        labels: Labels,
        init_args: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]],
        options: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
        ready_timeout_s: float,
        restart: RestartPolicy | None = None,
        config_key: str = "",
        on_start: Callable[[int, Any], Any] | None = None,
        on_retire: Callable[[int], None] | None = None,
        ready_method: str = "ready",
        error_type: type[WorkerError] = WorkerError,
        timeout_type: type[WorkerTimeout] = WorkerTimeout,
    ):
        if num_workers < 1:
            raise ValueError(f"{labels.group} group needs num_workers >= 1, got {num_workers}")
        self.actor_cls = actor_cls
        self.labels = labels
        self.num_workers = num_workers
        self.ready_timeout_s = float(ready_timeout_s)
        self._init_args = init_args
        self._options = options
        self._on_start = on_start
        self._on_retire = on_retire
        self._ready_method = ready_method
        self.error_type = error_type
        self.timeout_type = timeout_type
        self.restart = restart
        self._budget = (
            RestartBudget(labels.group, num_workers, restart, config_key, label=labels.died)
            if restart is not None
            else None
        )
        self.actors: list[Any] = []
        self.replace_lock = threading.RLock()  # held by every replacement; the rollout group lends it out
        self._submit_lock = threading.Lock()

    # ---- state ----------------------------------------------------------------------------------

    @property
    def max_restarts(self) -> int:
        return self.restart.max_restarts if self.restart is not None else 0

    @property
    def restarts(self) -> int:
        """Actor replacements over the group's life (cumulative, all workers)."""
        return self._budget.total if self._budget is not None else 0

    @property
    def restarts_by_worker(self) -> list[int]:
        return list(self._budget.by_worker) if self._budget is not None else [0] * self.num_workers

    # ---- errors -----------------------------------------------------------------------------------

    def error(self, message: str, *indices: int) -> WorkerError:
        return self.error_type(message, group=self.labels.group, workers=indices)

    def _timeout(self, indices: Sequence[int], what: str, deadline_s: float, hint: str = "") -> WorkerTimeout:
        return self.timeout_type(
            self.labels.timeout(indices, what, deadline_s, hint),
            group=self.labels.group,
            workers=tuple(indices),
            deadline_s=deadline_s,
        )

    def task_error(self, index: int, what: str, exc: BaseException) -> BaseException:
        """The error to raise for ``exc``, which a call (not a death) raised. Override to keep a type."""
        return self.error(self.labels.failed(index, what, exc), index)

    # ---- life cycle -------------------------------------------------------------------------------

    def _create(self, index: int) -> Any:
        args, kwargs = self._init_args(index)
        opts = self._options(index) if callable(self._options) else (self._options or {})
        return remote_class(self.actor_cls).options(**dict(opts)).remote(*args, **kwargs)

    def start(self, hint: str = "") -> list[Any]:
        """Create every actor and wait until each is ready and ``on_start`` ran; return the ``ready``
        results in worker order. On any failure every actor is killed and the error names the worker
        (``hint`` is added to a ready timeout's message)."""
        import ray

        if self.actors:
            raise RuntimeError(f"{self.labels.group} group started twice")
        try:
            for index in range(self.num_workers):
                self.actors.append(self._create(index))
            refs = {getattr(a, self._ready_method).remote(): i for i, a in enumerate(self.actors)}
            ready: list[Any] = [None] * self.num_workers
            deadline = time.monotonic() + self.ready_timeout_s
            while refs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(sorted(refs.values()), "starting", self.ready_timeout_s, hint)
                done, _ = ray.wait(list(refs), num_returns=1, timeout=remaining)
                for ref in done:
                    index = refs.pop(ref)
                    try:
                        ready[index] = ray.get(ref)
                    except Exception as exc:
                        raise self.error(self.labels.start_failed(index, exc), index) from exc
            for index, actor in enumerate(self.actors):
                if self._on_start is not None:
                    try:
                        self._on_start(index, actor)
                    except Exception as exc:
                        raise self.error(self.labels.start_failed(index, exc), index) from exc
            return ready
        except BaseException:
            # Kill rather than shut down: a graceful shutdown would queue behind actors still starting.
            self.kill_all()
            raise

    def retire(self, index: int) -> None:
        """Kill actor ``index`` for good (best effort), then run ``on_retire``."""
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception as exc:  # noqa: BLE001 - usually already dead; nothing else to do
            log.debug("%s: ray.kill: %s", self.labels.worker(index), exc)
        if self._on_retire is not None:
            self._on_retire(index)

    def kill_all(self) -> None:
        for index in range(len(self.actors)):
            self.retire(index)
        self.actors = []

    def replace(self, index: int, what: str, exc: BaseException, actor: Any = None) -> Any:
        """Replace actor ``index`` (dead, or alive but unusable: ``exc`` says why) as a death during
        ``what`` would: within the restart budget, ``on_start`` run on the replacement, whose result
        is returned. ``actor``: the handle found unusable; if another thread has replaced it
        already, nothing is done and :data:`ALREADY_REPLACED` is returned."""
        return self._replace(index, what, exc, actor)

    def _replace(self, index: int, what: str, exc: BaseException, actor: Any = None) -> Any:
        """Replace dead actor ``index`` within the restart budget (WorkerError when it is spent, or at
        once without a restart policy); return what ``on_start`` returned for the replacement, or
        :data:`ALREADY_REPLACED` when ``actor`` (the handle that died) is no longer the slot's."""
        with self.replace_lock:
            if actor is not None and index < len(self.actors) and self.actors[index] is not actor:
                log.info("%s: already replaced by another caller (%s)", self.labels.worker(index), what)
                return ALREADY_REPLACED
            return self._replace_locked(index, what, exc)

    def _replace_locked(self, index: int, what: str, exc: BaseException) -> Any:
        import ray

        if self._budget is None:
            raise self.error(self.labels.failed(index, what, exc), index) from exc
        doing = what
        while True:
            attempt = self._budget.charge(index, doing, exc)
            t0 = time.perf_counter()
            log.warning(
                "%s (%s); restart %d/%d",
                self.labels.died(index, doing),
                short_error(exc, 200),
                attempt,
                self.max_restarts,
            )
            self.retire(index)
            self._budget.wait_before(attempt)
            try:
                actor = self._create(index)
                self.actors[index] = actor  # so that retire reaches it if anything below fails
                ray.get(getattr(actor, self._ready_method).remote(), timeout=self.ready_timeout_s)
                loaded = self._on_start(index, actor) if self._on_start is not None else None
            except Exception as err:  # noqa: BLE001 - a replacement that cannot start is another failure
                exc, doing = err, f"{what}, restarting"
                continue
            log.warning("%s", self.labels.restarted(index, what, time.perf_counter() - t0))
            return loaded

    def call(
        self,
        calls: Mapping[int, Issue],
        what: str | Mapping[int, str],
        timeout_s: float | Mapping[int, float],
        *,
        redo: bool = True,
        hint: str = "",
    ) -> tuple[dict[int, Any], dict[int, int]]:
        """Issue ``calls[i](actor_i)`` and wait for every one; return (result per worker, replacements
        per worker during this call).

        ``what`` (one for all, or per worker) says what the call does, for messages; ``timeout_s``
        (one for all, or per worker) bounds each call from when it is issued. A call whose
        actor died is re-issued on the replacement (fresh deadline); with ``redo=False`` it is not and
        its result is what ``on_start`` returned for the replacement (e.g. a weight push the replacement
        has just done). Raises ``timeout_type`` naming every late worker, or ``task_error(...)`` for an
        error a call raised; neither is retried.
        """
        import ray

        def bound(index: int) -> float:
            return float(timeout_s[index] if isinstance(timeout_s, Mapping) else timeout_s)

        def doing(index: int) -> str:
            return what[index] if isinstance(what, Mapping) else what

        pending: dict[Any, int] = {}
        called: dict[int, Any] = {}  # the handle each pending call went to
        deadline: dict[int, float] = {}
        restarts = {i: 0 for i in calls}
        results: dict[int, Any] = {}

        def issue(index: int, issued_at: float | None = None) -> None:
            called[index] = self.actors[index]
            pending[calls[index](called[index])] = index
            deadline[index] = (time.monotonic() if issued_at is None else issued_at) + bound(index)

        # The first issue shares one start time, so calls with equal bounds fall due together and a
        # timeout names every worker that is late (for collective ranks: all that have not answered).
        started = time.monotonic()
        with self._submit_lock:
            for index in calls:
                issue(index, started)
        while pending:
            wait_s = max(0.0, min(deadline[i] for i in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready:
                late = sorted(i for i in pending.values() if deadline[i] <= time.monotonic())
                if late:
                    raise self._timeout(late, doing(late[0]), max(bound(i) for i in late), hint)
                continue
            index = pending.pop(ready[0])
            try:
                results[index] = ray.get(ready[0])
            except Exception as exc:
                if not is_actor_death(exc):
                    raise self.task_error(index, doing(index), exc) from exc
                loaded = self._replace(index, doing(index), exc, called[index])
                if loaded is ALREADY_REPLACED:
                    # Another thread replaced it (and ran on_start): this call goes to the replacement.
                    issue(index)
                    continue
                restarts[index] += 1
                if redo:
                    issue(index)
                else:
                    results[index] = loaded
        return results, restarts

    def submit(self, issue: Callable[[int, Any], Any]) -> list[Any]:
        """``issue(index, actor)`` for every actor, issued together (see the module doc): the
        ObjectRefs in worker order, not waited on."""
        with self._submit_lock:
            return [issue(index, actor) for index, actor in enumerate(self.actors)]

    def call_all(self, issue: Issue, what: str, timeout_s: float, **kwargs: Any) -> list[Any]:
        """``call`` with the same call on every worker; the results in worker order."""
        results, _ = self.call({i: issue for i in range(len(self.actors))}, what, timeout_s, **kwargs)
        return [results[i] for i in range(len(self.actors))]

    def shutdown(self, method: str | None = "shutdown", timeout_s: float = 60.0) -> None:
        """Call every actor's graceful ``method`` (unless the job is stopping on a signal; waits at most
        ``timeout_s`` for all), then kill every actor (``on_retire`` runs for each). Idempotent."""
        import ray

        from rlsys.signals import stopping

        if method is not None and self.actors and not stopping():
            refs: dict[Any, int] = {}
            for index, actor in enumerate(self.actors):
                try:
                    refs[getattr(actor, method).remote()] = index
                except Exception as exc:  # noqa: BLE001 - a dead actor cannot be closed; it is killed below
                    log.debug("%s: %s: %s", self.labels.worker(index), method, exc)
            done, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - best effort at teardown, logged
                    log.warning("%s: %s failed: %s", self.labels.worker(refs[ref]), method, short_error(exc, 200))
            for ref in late:
                log.warning("%s: %s did not finish within %g s", self.labels.worker(refs[ref]), method, timeout_s)
        self.kill_all()


class SupervisedGroup:
    """Base of the driver-side groups (rollout, reward, learner) built on an :class:`ActorGroup`
    held as ``self._group``: the supervision counters every group reports alike."""

    _group: ActorGroup

    @property
    def num_workers(self) -> int:
        return len(self._group.actors)

    @property
    def max_restarts(self) -> int:
        return self._group.max_restarts

    @property
    def restarts(self) -> int:
        """Actor replacements over the group's life (cumulative, all workers)."""
        return self._group.restarts

    @property
    def restarts_by_worker(self) -> list[int]:
        return self._group.restarts_by_worker
