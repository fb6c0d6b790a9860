"""Worker supervision policy shared by every actor group: which errors mean "the actor died", how
many times a worker may be replaced before the run gives up, and the errors a group raises.

A group that sees an actor death replaces the actor and re-issues that actor's in-flight work (by
prompt id for rollouts, by (prompt_id, sample_index) for grades); :class:`RestartBudget` bounds the
replacements per worker across the whole run, so a worker that keeps dying fails the run with an
error naming the worker, the phase and the last exception instead of looping forever. The loop that
applies this policy is :class:`rlsys.workers.group.ActorGroup`. Importing this module imports no Ray.

Errors: every failure of a group's worker is a :class:`WorkerError` (a RuntimeError) naming the
group and the worker(s); a call that overruns its deadline is a :class:`WorkerTimeout` (also a
TimeoutError) that carries the deadline too.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class WorkerError(RuntimeError):
    """A worker of an actor group failed (or died for good); the message names the phase and worker.

    ``group`` is the group's name ("rollout", "reward", "learner"), ``workers`` the indices (ranks)
    concerned, possibly empty when the error is about the group as a whole.
    """

    def __init__(self, message: str, *, group: str = "", workers: Sequence[int] = ()):
        super().__init__(message)
        self.group = group
        self.workers = tuple(workers)

    @property
    def worker(self) -> int | None:
        """The first worker concerned (None when the error names none)."""
        return self.workers[0] if self.workers else None

    def __reduce__(self):  # keyword-only fields: pickle (Ray, multiprocessing) would drop them
        return (_rebuild_error, (type(self), str(self), dict(self.__dict__)))


class WorkerTimeout(WorkerError, TimeoutError):
    """A call to the worker(s) did not finish within ``deadline_s`` seconds (not retried).

    Also a TimeoutError, so code that caught the rollout group's former TimeoutError still does.
    """

    def __init__(self, message: str, *, group: str = "", workers: Sequence[int] = (), deadline_s: float = 0.0):
        super().__init__(message, group=group, workers=workers)
        self.deadline_s = float(deadline_s)


def _rebuild_error(cls: type, message: str, fields: dict) -> BaseException:
    err = cls(message)  # every field has a default; the real values are restored next
    err.__dict__.update(fields)
    return err


# Kept small and explicit: an error raised *by the task* (RayTaskError, also when it wraps one of
# these, since Ray builds RayTaskError subclasses of the cause's type) is a bug or a bad input, and
# re-running it on a fresh actor would only fail again.
_DEATH_ERROR_NAMES = (
    "ActorDiedError",  # the actor's process exited (SIGKILL, segfault, os._exit)
    "RayActorError",  # base class of the above; older Ray raises it directly
    "ActorUnavailableError",  # the actor is unreachable (its node or process is going away)
    "WorkerCrashedError",  # the worker process executing the task crashed
    "ObjectLostError",  # the reply object was lost with the process holding it
    "OutOfMemoryError",  # Ray's memory monitor killed the worker
)


def death_error_types() -> tuple[type, ...]:
    """The Ray exception classes that mean "the actor (or its reply) is gone"."""
    import ray.exceptions as rex

    return tuple(getattr(rex, name) for name in _DEATH_ERROR_NAMES if hasattr(rex, name))


def is_actor_death(exc: BaseException) -> bool:
    """True when ``exc`` (from ``ray.get``) says the actor or its reply is gone, so replacing the
    actor and re-issuing the call can succeed; False for errors the task itself raised."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        return False
    return isinstance(exc, death_error_types())


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_error(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` on one line, ANSI colours stripped, at most ~``limit`` characters.

    Ray's death messages run to dozens of lines and put the root cause (e.g. the exception a
    failed constructor raised) last, so a long message keeps its head and its tail.
    """
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if len(text) > limit:
        head = limit // 3
        text = f"{text[:head]} [...] {text[-(limit - head) :]}"
    return f"{type(exc).__name__}: {text}"


@dataclass(frozen=True)
class RestartPolicy:
    """How a pool replaces dead workers.

    ``max_restarts``: replacements allowed per worker across the run (0 = fail on the first death).
    ``backoff_s`` / ``backoff_max_s``: wait before the n-th replacement of a worker
    (``backoff_s * 2**(n-1)``, capped), so a worker killed by a transient condition (memory
    pressure) is not replaced in a tight loop.
    """

    max_restarts: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(f"restart backoff must be >= 0, got {self.backoff_s}/{self.backoff_max_s}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based) of one worker."""
        if attempt <= 0 or self.backoff_s == 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))


class RestartBudget:
    """Per-worker restart counts against a :class:`RestartPolicy`.

    ``charge(worker, phase, exc)`` records one more restart of ``worker`` and returns its attempt
    number, or raises :class:`WorkerError` (naming the pool, worker, phase, count and the last exception)
    when the worker has used up ``max_restarts``. ``total`` is the number of restarts charged.
    ``label(worker, phase)`` starts that error message (default ``"phase P: <pool> worker W died"``).
    """

    def __init__(
        self,
        pool: str,
        num_workers: int,
        policy: RestartPolicy,
        config_key: str,
        label: Callable[[int, str], str] | None = None,
    ):
        self.pool = pool
        self.policy = policy
        self.config_key = config_key
        self.label = label or (lambda worker, phase: f"phase {phase}: {pool} worker {worker} died")
        self.by_worker = [0] * num_workers
        self.total = 0

    def charge(self, worker: int, phase: str, exc: BaseException) -> int:
        if self.by_worker[worker] >= self.policy.max_restarts:
            raise WorkerError(
                f"{self.label(worker, phase)} and has used up its restarts "
                f"({self.by_worker[worker]} of {self.config_key}={self.policy.max_restarts} per worker per run). "
                f"Last error: {short_error(exc)}. Check the worker's log under the Ray session dir "
                f"(/tmp/ray/session_latest/logs) for the cause (out of memory? a crash at start-up?), "
                f"or raise {self.config_key}",
                group=self.pool,
                workers=(worker,),
            ) from exc
        self.by_worker[worker] += 1
        self.total += 1
        return self.by_worker[worker]

    def wait_before(self, attempt: int) -> None:
        delay = self.policy.backoff(attempt)
        if delay > 0:
            time.sleep(delay)


def same_node(node_id: str | None) -> bool:
    """True when ``node_id`` is the calling process's Ray node (so its files are ours to see)."""
    if not node_id:
        return False
    import ray

    try:
        return ray.get_runtime_context().get_node_id() == node_id
    except Exception:  # noqa: BLE001 - outside a Ray context nothing is on "our" node
        return False


def remove_files(paths: list[str]) -> list[str]:
    """Unlink the given files where they still exist (best effort); return the ones removed."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not ours to remove (permissions) or already being cleaned up: leave it
    return removed
