"""The reward pool: a plain grader, its thin Ray actor, and the driver-side pool over N actors.

* :class:`RewardGrader` grades ``GradeRequest`` records in sandboxed child processes (no Ray needed).
* ``RewardWorker`` is ``ray.remote(RewardWorkerImpl)``, created on first access so that importing
  this module never imports Ray.
* :class:`RewardPool` (driver side) creates N ``RewardWorker`` actors, splits each batch over them and
  re-joins the grades by ``(prompt_id, sample_index)``; an actor that dies is replaced and its chunk
  re-graded (a bounded number of times); every failure names the phase ("reward") and the actor index.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

from rlsys.records import GRADE_INVALID, GRADE_OK, GRADE_STATUSES, Grade, GradeRequest
from rlsys.rewards.sandbox import ChildConfig, Job, VerifierSandbox
from rlsys.rewards.verifiers import NO_ANSWER_DETAIL, check_spec_allowed, is_builtin, split_spec, truncate

log = logging.getLogger("rlsys.rewards")

DEFAULT_MAX_COMPLETION_CHARS = 64 * 1024
# Counter keys besides the statuses: child replacements, and ok-but-unanswered grades (the model did
# not state a final answer in the expected format: worth watching, it is the classic silent zero).
COUNTER_KEYS = (*GRADE_STATUSES, "no_answer", "restarts")


class RewardGrader:
    """Grades completions with sandboxed verifiers; ``grade`` never raises for a bad completion.

    ``num_procs`` children verify in parallel, each request under a hard ``timeout_s`` wall-clock
    limit (the child is SIGKILLed and replaced on overrun: status "timeout"; a child that dies gives
    status "error"). User functions (``"module:function"`` / ``"file.py:function"``) run only when
    listed in ``allowed_functions`` (or as ``"module:*"``); built-ins and ``rlsys.*`` modules are always
    allowed. A completion (or gold answer) longer than ``max_completion_chars`` is graded "invalid"
    without running. ``memory_limit_mb`` caps each child's address space (None/0: no cap).
    ``success_threshold`` decides ``correct`` for verifiers returning a bare float.
    Relative ``file.py`` specs resolve against ``base_dir`` (default: the current directory).
    """

    def __init__(
        self,
        num_procs: int = 1,
        timeout_s: float = 5.0,
        success_threshold: float = 1.0,
        allowed_functions: Iterable[str] = (),
        memory_limit_mb: int | None = 2048,
        *,
        max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
        max_detail_chars: int = 200,
        startup_timeout_s: float = 120.0,
        base_dir: str | None = None,
    ):
        self.allowed_functions = tuple(allowed_functions)
        for entry in self.allowed_functions:
            if is_builtin(entry):
                continue
            if entry.endswith(":*") and entry[:-2].strip():
                continue  # every function of a module/file
            try:
                split_spec(entry)
            except ValueError as exc:
                raise ValueError(f"RewardGrader allowed_functions entry {entry!r} is malformed: {exc}") from None
        if max_completion_chars < 1:
            raise ValueError(f"RewardGrader max_completion_chars must be >= 1, got {max_completion_chars}")
        self.timeout_s = float(timeout_s)
        self.max_completion_chars = int(max_completion_chars)
        self.max_detail_chars = int(max_detail_chars)
        self._validated: set[str] = set()
        self._counts = dict.fromkeys(COUNTER_KEYS, 0)
        config = ChildConfig(
            allowed_functions=self.allowed_functions,
            base_dir=os.path.abspath(base_dir or os.getcwd()),
            success_threshold=float(success_threshold),
            memory_limit_mb=memory_limit_mb,
            max_detail_chars=self.max_detail_chars,
        )
        self._sandbox = VerifierSandbox(
            num_procs=num_procs,
            timeout_s=timeout_s,
            config=config,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def num_procs(self) -> int:
        return self._sandbox.num_procs

    def validate_specs(self, specs: Iterable[str]) -> None:
        """Check and import every verifier spec now, so a typo fails at start-up and not mid-run.

        Raises ValueError naming each bad spec: not allowed (and how to allow it), malformed,
        module/file missing, import failure, no such function. Already-validated specs are skipped.
        """
        new = [s for s in dict.fromkeys(specs) if s not in self._validated]
        if not new:
            return
        for spec in new:
            if not isinstance(spec, str):
                raise ValueError(f"verifier spec must be a string, got {type(spec).__name__}: {spec!r:.80}")
            check_spec_allowed(spec, self.allowed_functions)
        errors = self._sandbox.resolve([s for s in new if not is_builtin(s)])
        if errors:
            raise ValueError("invalid verifier spec(s): " + "; ".join(errors.values()))
        self._validated.update(new)

    def _precheck(self, request: GradeRequest) -> str:
        """Return why ``request`` is graded invalid without running, or "" when it may run."""
        if not isinstance(request.completion, str):
            return f"completion is {type(request.completion).__name__}, expected str"
        if not isinstance(request.answer, str):
            return f"answer is {type(request.answer).__name__}, expected str"
        if len(request.completion) > self.max_completion_chars:
            return f"completion has {len(request.completion)} chars, over the {self.max_completion_chars} limit"
        if len(request.answer) > self.max_completion_chars:
            return f"answer has {len(request.answer)} chars, over the {self.max_completion_chars} limit"
        return ""

    def grade(self, requests: Sequence[GradeRequest]) -> list[Grade]:
        """Return one Grade per request, in request order.

        Raises ValueError only for a verifier spec that is not allowed or cannot be resolved (a
        config error, checked once per spec); bad completions become non-"ok" grades instead.
        """
        self.validate_specs(r.verifier for r in requests)
        grades: list[Grade | None] = [None] * len(requests)
        jobs: list[Job] = []
        job_rows: list[int] = []
        for row, request in enumerate(requests):
            why = self._precheck(request)
            if why:
                grades[row] = Grade(
                    request.prompt_id, request.sample_index, 0.0, False, GRADE_INVALID, truncate(why, self.max_detail_chars)
                )
            else:
                jobs.append(Job(request.verifier, request.completion, request.answer))
                job_rows.append(row)
        for row, ((reward, correct, status, detail), seconds) in zip(job_rows, self._sandbox.run(jobs)):
            request = requests[row]
            reward = float(reward) if status == GRADE_OK and math.isfinite(reward) else 0.0
            grades[row] = Grade(
                request.prompt_id,
                request.sample_index,
                reward,
                bool(correct) and status == GRADE_OK,
                status,
                truncate(detail, self.max_detail_chars),
                seconds,
            )
        out: list[Grade] = []
        for row, grade in enumerate(grades):
            if grade is None:  # every row is filled by the precheck or the sandbox
                raise RuntimeError(f"RewardGrader lost request {row} (a bug: every request must get a grade)")
            self._counts[grade.status] += 1
            if grade.detail == NO_ANSWER_DETAIL:
                self._counts["no_answer"] += 1
            out.append(grade)
        return out

    def counters(self) -> dict[str, int]:
        """Cumulative counts: one per status in GRADE_STATUSES, "no_answer", and "restarts"."""
        return {**self._counts, "restarts": self._sandbox.restarts}

    def isolation(self) -> list[dict[str, Any]]:
        """Per verifier process: pid, scratch dir, and whether netns / seccomp / a code launcher are on."""
        return self._sandbox.isolation()

    def close(self) -> None:
        """Kill the verifier children (idempotent)."""
        self._sandbox.close()

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


_REMOTE_WORKER: Any = None


def _remote_worker_class() -> Any:
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        import ray

        _REMOTE_WORKER = ray.remote(RewardWorkerImpl)
    return _REMOTE_WORKER


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


class RewardPool:
    """Driver-side pool of ``num_workers`` RewardWorker actors (requires a running ``ray.init``).

    ``grade(requests)`` splits the batch into contiguous chunks (a group's completions share a gold
    answer, so they stay together), grades them concurrently and returns one Grade per request in
    request order, joined back by ``(prompt_id, sample_index)``. Each chunk has a time bound of
    ``ceil(chunk / procs_per_worker) * (timeout_s + restart_allowance_s) + call_margin_s``, enough even
    if every request in it hangs; overrunning it or a grade going missing raises RuntimeError naming
    the "reward" phase and the actor index. ``actor_options`` go to ``RewardWorker.options``;
    ``num_cpus`` (default 1) is used unless they name their own. The actor itself mostly waits: its
    ``procs_per_worker`` verifier processes do the work.

    Worker deaths: an actor that dies (see :func:`rlsys.workers.supervision.is_actor_death`) is
    killed for good and replaced by a fresh one (same options, the verifier specs validated so far
    re-imported), and the calls it had in flight are re-issued there: a chunk is re-graded with a
    fresh time bound (a grade is a pure function of its request, so re-grading is safe). At most
    ``max_restarts`` replacements per actor over the pool's life; one more death raises RuntimeError
    naming the actor, what it was doing and the last error. ``restarts`` counts replacements.
    ``counters()`` keeps the counts a dead actor reported the last time ``counters()`` asked it.
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
        max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
        startup_timeout_s: float = 120.0,
        call_margin_s: float = 60.0,
        restart_allowance_s: float = 5.0,
        base_dir: str | None = None,
        max_restarts: int = 3,
        restart_backoff_s: float = 0.5,
    ):
        from rlsys.workers.supervision import RestartBudget, RestartPolicy

        if num_workers < 1:
            raise ValueError(f"RewardPool num_workers must be >= 1, got {num_workers}")
        self.timeout_s = float(timeout_s)
        self.procs_per_worker = int(procs_per_worker)
        self.call_margin_s = float(call_margin_s)
        self.restart_allowance_s = float(restart_allowance_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.allowed_functions = tuple(allowed_functions)
        self._validated: set[str] = set()
        self._options = {"num_cpus": num_cpus, **dict(actor_options or {})}
        self._grader_kwargs = dict(
            num_procs=procs_per_worker,
            timeout_s=timeout_s,
            success_threshold=success_threshold,
            allowed_functions=self.allowed_functions,
            memory_limit_mb=memory_limit_mb,
            max_completion_chars=max_completion_chars,
            startup_timeout_s=startup_timeout_s,
            # Actors do not share the driver's working directory: pin relative file specs to it.
            base_dir=os.path.abspath(base_dir or os.getcwd()),
        )
        self._budget = RestartBudget(
            "reward", num_workers, RestartPolicy(max_restarts=max_restarts, backoff_s=restart_backoff_s),
            "reward.max_restarts", label=lambda index, what: f"reward phase: RewardWorker {index} died while {what}",
        )
        # Counters of dead actors (as last reported) and each live actor's last report.
        self._retired_counts = dict.fromkeys(COUNTER_KEYS, 0)
        self._last_counts: list[dict[str, int]] = [{} for _ in range(num_workers)]
        worker_cls = _remote_worker_class()
        self._actors = [worker_cls.options(**self._options).remote(**self._grader_kwargs) for _ in range(num_workers)]
        try:
            for index, ref in enumerate([a.ready.remote() for a in self._actors]):
                self._get(ref, index, self.startup_timeout_s + self.call_margin_s, "starting")
        except BaseException:
            self.shutdown()
            raise

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    @property
    def max_restarts(self) -> int:
        return self._budget.policy.max_restarts

    @property
    def restarts(self) -> int:
        """Actor replacements over the pool's life (cumulative, all actors)."""
        return self._budget.total

    @property
    def restarts_by_worker(self) -> list[int]:
        return list(self._budget.by_worker)

    def _get(self, ref: Any, index: int, timeout_s: float, what: str) -> Any:
        """``ray.get`` one actor's reply, turning Ray errors into ones that name phase and actor."""
        import ray

        try:
            return ray.get(ref, timeout=max(0.0, timeout_s))
        except Exception as exc:  # noqa: BLE001 - converted below
            self._raise_for(exc, index, timeout_s, what)

    @staticmethod
    def _raise_for(exc: BaseException, index: int, timeout_s: float, what: str) -> NoReturn:
        """Re-raise a ``ray.get`` error of actor ``index`` as one naming the phase and the actor."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if isinstance(exc, GetTimeoutError):
            raise RuntimeError(
                f"reward phase: RewardWorker {index} did not finish {what} within {timeout_s:.0f}s"
            ) from None
        if isinstance(exc, RayTaskError):
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            kind = ValueError if isinstance(cause, ValueError) else RuntimeError
            raise kind(f"reward phase: RewardWorker {index} failed while {what}: {cause}") from exc
        if isinstance(exc, RayActorError):
            raise RuntimeError(f"reward phase: RewardWorker {index} died while {what}: {exc}") from exc
        raise exc

    # ---- supervision ------------------------------------------------------------------------------

    def _retire(self, index: int) -> None:
        """Kill actor ``index`` for good and keep the counts it last reported.

        Its verifier children notice their parent is gone and exit within about a second.
        """
        import ray

        for key, value in self._last_counts[index].items():
            self._retired_counts[key] = self._retired_counts.get(key, 0) + value
        self._last_counts[index] = {}
        try:
            ray.kill(self._actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - usually already dead
            pass

    def _start(self, index: int) -> None:
        """A fresh actor in slot ``index``: up, with every verifier spec validated so far imported."""
        actor = _remote_worker_class().options(**self._options).remote(**self._grader_kwargs)
        self._actors[index] = actor  # so that _retire reaches it if anything below fails
        self._get(actor.ready.remote(), index, self.startup_timeout_s + self.call_margin_s, "starting")
        if self._validated:
            self._get(actor.validate_specs.remote(sorted(self._validated)), index, self.call_margin_s * 2,
                      "validating verifier specs")

    def _replace(self, index: int, what: str, exc: BaseException) -> None:
        """Replace dead actor ``index`` (bounded by the restart budget; RuntimeError when spent)."""
        from rlsys.workers.supervision import short_error

        doing = what
        while True:
            attempt = self._budget.charge(index, doing, exc)
            t0 = time.monotonic()
            log.warning("reward phase: RewardWorker %d died while %s (%s); restart %d/%d", index, doing,
                        short_error(exc, 200), attempt, self.max_restarts)
            self._retire(index)
            self._budget.wait_before(attempt)
            try:
                self._start(index)
            except Exception as err:  # noqa: BLE001 - a replacement that cannot start is another failure
                exc, doing = err, f"{what} (restarting it)"
                continue
            log.warning("reward phase: RewardWorker %d restarted in %.1f s", index, time.monotonic() - t0)
            return

    def _run(self, calls: dict[int, tuple[Any, float, str]]) -> dict[int, Any]:
        """Run ``calls[index] = (issue, bound_s, what)``: ``issue(actor)`` returns an ObjectRef.

        Waits for every call; a call whose actor died is re-issued on the replacement with a fresh
        bound; anything else (overrun, an error raised by the call) raises naming the actor.
        """
        import ray

        from rlsys.workers.supervision import is_actor_death

        pending: dict[Any, int] = {}
        deadline: dict[int, float] = {}
        results: dict[int, Any] = {}

        def issue(index: int) -> None:
            fn, bound, _ = calls[index]
            pending[fn(self._actors[index])] = index
            deadline[index] = time.monotonic() + bound

        for index in calls:
            issue(index)
        while pending:
            wait_s = max(0.0, min(deadline[i] for i in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready:
                for index in sorted(pending.values()):
                    if deadline[index] <= time.monotonic():
                        _, bound, what = calls[index]
                        raise RuntimeError(
                            f"reward phase: RewardWorker {index} did not finish {what} within {bound:.0f}s")
                continue
            index = pending.pop(ready[0])
            _, bound, what = calls[index]
            try:
                results[index] = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_actor_death(exc):
                    self._raise_for(exc, index, bound, what)
                self._replace(index, what, exc)
                issue(index)
        return results

    # ---- calls ------------------------------------------------------------------------------------

    def validate_specs(self, specs: Iterable[str]) -> None:
        """Check the allow-list here, then import every new spec in every actor (ValueError if bad)."""
        new = [s for s in dict.fromkeys(specs) if s not in self._validated]
        if not new:
            return
        for spec in new:
            check_spec_allowed(spec, self.allowed_functions)
        self._run({index: (lambda a: a.validate_specs.remote(new), self.call_margin_s * 2, "validating verifier specs")
                   for index in range(len(self._actors))})
        self._validated.update(new)

    def grade(self, requests: Sequence[GradeRequest]) -> list[Grade]:
        """Grade ``requests`` over the actors; one Grade per request, in request order."""
        if not requests:
            return []
        keys = [(r.prompt_id, r.sample_index) for r in requests]
        position = {key: i for i, key in enumerate(keys)}
        if len(position) != len(keys):
            seen: set[tuple[str, int]] = set()
            dups = [k for k in keys if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
            raise ValueError(f"reward phase: duplicate (prompt_id, sample_index) in the batch: {dups[:5]}")
        self.validate_specs(r.verifier for r in requests)
        calls: dict[int, tuple[Any, float, str]] = {}
        sizes: dict[int, int] = {}
        for index, (lo, hi) in enumerate(_split(len(requests), len(self._actors))):
            chunk = list(requests[lo:hi])
            waves = math.ceil(len(chunk) / max(1, self.procs_per_worker))
            bound = waves * (self.timeout_s + self.restart_allowance_s) + self.call_margin_s
            calls[index] = ((lambda a, chunk=chunk: a.grade.remote(chunk)), bound, f"grading {len(chunk)} completions")
            sizes[index] = len(chunk)
        out: list[Grade | None] = [None] * len(requests)
        for index, grades in sorted(self._run(calls).items()):
            if len(grades) != sizes[index]:
                raise RuntimeError(
                    f"reward phase: RewardWorker {index} returned {len(grades)} grades for {sizes[index]} requests")
            for grade in grades:
                row = position.get((grade.prompt_id, grade.sample_index))
                if row is None or out[row] is not None:
                    raise RuntimeError(
                        f"reward phase: RewardWorker {index} returned an unexpected or repeated grade for "
                        f"({grade.prompt_id!r}, {grade.sample_index})"
                    )
                out[row] = grade
        missing = [keys[i] for i, g in enumerate(out) if g is None]
        if missing:
            raise RuntimeError(f"reward phase: no grade for {len(missing)} requests, e.g. {missing[:5]}")
        return out  # type: ignore[return-value]

    def counters(self) -> dict[str, int]:
        """Counters summed over the actors (same keys as RewardGrader.counters), cumulative over the
        pool's life: a replaced actor's counts (as it last reported them here) are kept."""
        reports = self._run({index: (lambda a: a.counters.remote(), self.call_margin_s, "reporting counters")
                             for index in range(len(self._actors))})
        totals = dict(self._retired_counts)
        for index, report in sorted(reports.items()):
            self._last_counts[index] = dict(report)
            for key, value in report.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def shutdown(self) -> None:
        """Close every actor's verifier processes and kill the actors (idempotent, best effort).

        When the job is being stopped by a signal (rlsys.signals) the actors are killed at once
        (their verifier processes die with them: PR_SET_PDEATHSIG and a parent watch)."""
        import ray

        from rlsys.signals import stopping

        actors, self._actors = self._actors, []
        refs = []
        for actor in [] if stopping() else actors:
            try:
                refs.append(actor.close.remote())
            except Exception:  # noqa: BLE001 - a dead actor cannot be closed; it is killed below
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=10.0)
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
