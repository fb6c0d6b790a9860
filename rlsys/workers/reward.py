"""The Ray side of grading: the thin reward actor and the driver-side group of N of them.

* :class:`RewardSpec` is everything config decides about grading (built by the one place that turns
  config into objects); it has no defaults, so a forgotten field fails loudly.
* ``RewardWorker`` is ``ray.remote(RewardWorkerImpl)``, created on first access so that importing
  this module never imports Ray. The grading itself is :class:`rlsys.rewards.grader.RewardGrader`
  (Ray-free).
* :class:`RewardGroup` (driver side) creates N ``RewardWorker`` actors, splits each batch over them and
  re-joins the grades by ``(prompt_id, sample_index)``; an actor that dies is replaced and its chunk
  re-graded (a bounded number of times); every failure names the phase ("reward") and the actor index.
  :class:`RewardPool` is the same group built from keyword arguments (the older constructor).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlsys.records import Grade, GradeRequest
from rlsys.rewards.grader import COUNTER_KEYS, DEFAULT_MAX_COMPLETION_CHARS, RewardGrader
from rlsys.rewards.verifiers import check_spec_allowed
from rlsys.workers.group import ActorGroup, Labels, SupervisedGroup
from rlsys.workers.supervision import RestartPolicy, WorkerError, is_actor_death

__all__ = ["COUNTER_KEYS", "RewardGrader", "RewardGroup", "RewardPool", "RewardSpec", "RewardWorkerImpl"]


@dataclass(frozen=True)
class RewardSpec:
    """What config decides about the reward actors (``cfg.reward``); no defaults on purpose.

    ``num_workers`` actors, each grading with ``procs_per_worker`` sandboxed verifier processes under
    a ``timeout_s`` wall-clock limit per request; ``success_threshold`` decides ``correct`` for bare
    float rewards; ``memory_limit_mb`` caps each verifier process (0: no cap); only built-ins and
    ``allowed_functions`` may run; ``num_cpus`` is each actor's Ray CPU reservation; an actor that dies
    is replaced at most ``max_restarts`` times over the run.
    """

    num_workers: int
    procs_per_worker: int
    timeout_s: float
    success_threshold: float
    memory_limit_mb: int
    allowed_functions: tuple[str, ...]
    num_cpus: float
    max_restarts: int

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"RewardPool num_workers must be >= 1, got {self.num_workers}")
        if not isinstance(self.allowed_functions, tuple):
            # A list would make the spec unhashable and mutable behind a frozen facade.
            object.__setattr__(self, "allowed_functions", tuple(self.allowed_functions))


class RewardWorkerImpl:
    """The body of the ``RewardWorker`` Ray actor: a RewardGrader behind remote methods.

    The grader (and so the child processes importing math-verify) is built in the constructor,
    inside the actor process; keyword arguments are RewardGrader's.
    """

    def __init__(self, **grader_kwargs: Any):
        self._grader = RewardGrader(**grader_kwargs)

    def ready(self) -> int:
        """Return the number of verifier processes (an RPC to wait for the constructor)."""
        return self._grader.num_procs

    def pid(self) -> int:
        return os.getpid()

    def validate_specs(self, specs: list[str]) -> None:
        self._grader.validate_specs(specs)

    def grade(self, requests: list[GradeRequest]) -> list[Grade]:
        return self._grader.grade(requests)

    def counters(self) -> dict[str, int]:
        return self._grader.counters()

    def isolation(self) -> list[dict[str, Any]]:
        return self._grader.isolation()

    def close(self) -> None:
        self._grader.close()


def _remote_worker_class() -> Any:
    from rlsys.workers.group import remote_class

    return remote_class(RewardWorkerImpl)


def __getattr__(name: str) -> Any:
    # ``RewardWorker`` is created lazily so that importing this module does not import Ray.
    if name == "RewardWorker":
        return _remote_worker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into at most ``parts`` contiguous, non-empty, balanced (start, stop) slices."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return [b for b in bounds if b[1] > b[0]]


class RewardGroup(SupervisedGroup):
    """Driver-side group of ``spec.num_workers`` RewardWorker actors (requires a running ``ray.init``).

    ``grade(requests)`` splits the batch into contiguous chunks (a group's completions share a gold
    answer, so they stay together), grades them concurrently and returns one Grade per request in
    request order, joined back by ``(prompt_id, sample_index)``. Each chunk has a time bound of
    ``ceil(chunk / procs_per_worker) * (timeout_s + restart_allowance_s) + call_margin_s``, enough even
    if every request in it hangs; overrunning it raises :class:`~rlsys.workers.supervision.WorkerTimeout`
    and a grade going missing :class:`~rlsys.workers.supervision.WorkerError` (both RuntimeErrors),
    naming the "reward" phase and the actor index. ``actor_options`` go to ``RewardWorker.options``;
    ``spec.num_cpus`` is used unless they name their own. The actor itself mostly waits: its
    ``procs_per_worker`` verifier processes do the work.

    Worker deaths: an actor that dies (see :func:`rlsys.workers.supervision.is_actor_death`) is
    killed for good and replaced by a fresh one (same options, the verifier specs validated so far
    re-imported), and the calls it had in flight are re-issued there: a chunk is re-graded with a
    fresh time bound (a grade is a pure function of its request, so re-grading is safe). At most
    ``spec.max_restarts`` replacements per actor over the group's life; one more death raises
    WorkerError naming the actor, what it was doing and the last error. ``restarts`` counts
    replacements. ``counters()`` keeps the counts a dead actor reported the last time ``counters()``
    asked it.

    The keyword arguments are operational knobs that config does not decide.
    """

    def __init__(
        self,
        spec: RewardSpec,
        *,
        actor_options: Mapping[str, Any] | None = None,
        max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
        startup_timeout_s: float = 120.0,
        call_margin_s: float = 60.0,
        restart_allowance_s: float = 5.0,
        base_dir: str | None = None,
        restart_backoff_s: float = 0.5,
    ):
        self.spec = spec
        self.timeout_s = float(spec.timeout_s)
        self.procs_per_worker = int(spec.procs_per_worker)
        self.call_margin_s = float(call_margin_s)
        self.restart_allowance_s = float(restart_allowance_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.allowed_functions = tuple(spec.allowed_functions)
        self._validated: set[str] = set()
        grader_kwargs = dict(
            num_procs=spec.procs_per_worker,
            timeout_s=spec.timeout_s,
            success_threshold=spec.success_threshold,
            allowed_functions=self.allowed_functions,
            memory_limit_mb=spec.memory_limit_mb,
            max_completion_chars=max_completion_chars,
            startup_timeout_s=startup_timeout_s,
            # Actors do not share the driver's working directory: pin relative file specs to it.
            base_dir=os.path.abspath(base_dir or os.getcwd()),
        )
        # Counters of dead actors (as last reported) and each live actor's last report.
        self._retired_counts = dict.fromkeys(COUNTER_KEYS, 0)
        self._last_counts: list[dict[str, int]] = [{} for _ in range(spec.num_workers)]
        self._group = _RewardActors(
            RewardWorkerImpl,
            spec.num_workers,
            labels=_RewardLabels("reward", "RewardWorker"),
            init_args=lambda index: ((), grader_kwargs),
            options={"num_cpus": spec.num_cpus, **dict(actor_options or {})},
            ready_timeout_s=self.startup_timeout_s + self.call_margin_s,
            restart=RestartPolicy(max_restarts=spec.max_restarts, backoff_s=restart_backoff_s),
            config_key="reward.max_restarts",
            on_start=self._on_start,
            on_retire=self._on_retire,
        )
        self._group.start()

    def _on_start(self, index: int, actor: Any) -> None:
        """A fresh actor imports every verifier spec validated so far (none for the first actors)."""
        import ray

        if self._validated:
            ray.get(actor.validate_specs.remote(sorted(self._validated)), timeout=self.call_margin_s * 2)

    def _on_retire(self, index: int) -> None:
        """Keep the counts a killed actor last reported (its verifier children exit within ~1 s)."""
        for key, value in self._last_counts[index].items():
            self._retired_counts[key] = self._retired_counts.get(key, 0) + value
        self._last_counts[index] = {}

    @property
    def _actors(self) -> list[Any]:
        return self._group.actors

    # ---- calls ------------------------------------------------------------------------------------

    def validate_specs(self, specs: Iterable[str]) -> None:
        """Check the allow-list here, then import every new spec in every actor (ValueError if bad)."""
        new = [s for s in dict.fromkeys(specs) if s not in self._validated]
        if not new:
            return
        for spec in new:
            check_spec_allowed(spec, self.allowed_functions)
        self._group.call_all(
            lambda a: a.validate_specs.remote(new), "validating verifier specs", self.call_margin_s * 2
        )
        self._validated.update(new)

    def grade(self, requests: Sequence[GradeRequest]) -> list[Grade]:
        """Grade ``requests`` over the actors; one Grade per request, in request order."""
        if not requests:
            return []
        keys = [(r.prompt_id, r.sample_index) for r in requests]
        position = {key: i for i, key in enumerate(keys)}
        if len(position) != len(keys):
            dups = [k for k, n in Counter(keys).items() if n > 1]
            raise ValueError(f"reward phase: duplicate (prompt_id, sample_index) in the batch: {dups[:5]}")
        self.validate_specs(r.verifier for r in requests)
        calls: dict[int, Any] = {}
        bounds: dict[int, float] = {}
        doing: dict[int, str] = {}
        sizes: dict[int, int] = {}
        for index, (lo, hi) in enumerate(_split(len(requests), self.num_workers)):
            chunk = list(requests[lo:hi])
            waves = math.ceil(len(chunk) / max(1, self.procs_per_worker))
            bounds[index] = waves * (self.timeout_s + self.restart_allowance_s) + self.call_margin_s
            calls[index] = lambda a, chunk=chunk: a.grade.remote(chunk)
            doing[index] = f"grading {len(chunk)} completions"
            sizes[index] = len(chunk)
        results, _ = self._group.call(calls, doing, bounds)
        out: list[Grade | None] = [None] * len(requests)
        for index, grades in sorted(results.items()):
            if len(grades) != sizes[index]:
                raise WorkerError(
                    f"reward phase: RewardWorker {index} returned {len(grades)} grades for {sizes[index]} requests",
                    group="reward",
                    workers=(index,),
                )
            for grade in grades:
                row = position.get((grade.prompt_id, grade.sample_index))
                if row is None or out[row] is not None:
                    raise WorkerError(
                        f"reward phase: RewardWorker {index} returned an unexpected or repeated grade for "
                        f"({grade.prompt_id!r}, {grade.sample_index})",
                        group="reward",
                        workers=(index,),
                    )
                out[row] = grade
        graded = [g for g in out if g is not None]
        if len(graded) != len(out):
            missing = [keys[i] for i, g in enumerate(out) if g is None]
            raise WorkerError(f"reward phase: no grade for {len(missing)} requests, e.g. {missing[:5]}", group="reward")
        return graded

    def counters(self) -> dict[str, int]:
        """Counters summed over the actors (same keys as RewardGrader.counters), cumulative over the
        group's life: a replaced actor's counts (as it last reported them here) are kept."""
        reports = self._group.call_all(lambda a: a.counters.remote(), "reporting counters", self.call_margin_s)
        totals = dict(self._retired_counts)
        for index, report in enumerate(reports):
            self._last_counts[index] = dict(report)
            for key, value in report.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def shutdown(self) -> None:
        """Close every actor's verifier processes and kill the actors (idempotent, best effort).

        When the job is being stopped by a signal (rlsys.signals) the actors are killed at once
        (their verifier processes die with them: PR_SET_PDEATHSIG and a parent watch)."""
        self._group.shutdown("close", timeout_s=10.0)


class _RewardLabels(Labels):
    """Messages in the reward phase's words: "reward phase: RewardWorker 1 died while grading ..."."""

    def timeout(self, indices: Sequence[int], what: str, deadline_s: float, hint: str = "") -> str:
        return f"reward phase: {self.workers(indices)} did not finish {what} within {deadline_s:.0f}s"

    def failed(self, index: int, what: str, exc: BaseException) -> str:
        return f"reward phase: {self.worker(index)} failed while {what}: {_cause(exc)}"

    def start_failed(self, index: int, exc: BaseException) -> str:
        if is_actor_death(exc):
            return f"reward phase: {self.worker(index)} died while starting: {exc}"
        return self.failed(index, "starting", exc)

    def died(self, index: int, what: str) -> str:
        return f"reward phase: {self.worker(index)} died while {what}"

    def restarted(self, index: int, what: str, seconds: float) -> str:
        return f"reward phase: {self.worker(index)} restarted in {seconds:.1f} s"


def _cause(exc: BaseException) -> BaseException:
    """The exception a remote call raised (``RayTaskError.cause``), else ``exc`` itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class _RewardActors(ActorGroup):
    def task_error(self, index: int, what: str, exc: BaseException) -> BaseException:
        # A verifier spec that cannot be imported is a config error: keep it a ValueError.
        if isinstance(_cause(exc), ValueError):
            return ValueError(self.labels.failed(index, what, exc))
        return super().task_error(index, what, exc)


class RewardPool(RewardGroup):
    """:class:`RewardGroup` built from keyword arguments, with the defaults of the older constructor.

    Kept so that callers and tests written against ``RewardPool(num_workers=..., ...)`` keep working;
    new code builds a :class:`RewardSpec` (from config, in one place) and a ``RewardGroup``.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        procs_per_worker: int = 1,
        success_threshold: float = 1.0,
        allowed_functions: Iterable[str] = (),
        memory_limit_mb: int | None = 2048,
        actor_options: Mapping[str, Any] | None = None,
        *,
        num_cpus: float = 1.0,
        max_restarts: int = 3,
        **operational: Any,
    ):
        """The first arguments and ``num_cpus`` / ``max_restarts`` make the :class:`RewardSpec`;
        ``operational`` are :class:`RewardGroup`'s keyword arguments (``startup_timeout_s`` ...)."""
        spec = RewardSpec(
            num_workers=num_workers,
            procs_per_worker=procs_per_worker,
            timeout_s=timeout_s,
            success_threshold=success_threshold,
            memory_limit_mb=memory_limit_mb or 0,  # None and 0: no cap
            allowed_functions=tuple(allowed_functions),
            num_cpus=num_cpus,
            max_restarts=max_restarts,
        )
        super().__init__(spec, actor_options=actor_options, **operational)
