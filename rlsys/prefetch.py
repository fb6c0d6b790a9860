"""Batches produced ahead of the step that trains on them (the off-policy trainer modes).

:class:`Prefetcher` runs ``produce(step)`` on one background thread, in step order, at most
``ahead`` steps beyond the step the loop last took: while step k trains, the batches of steps
k+1 .. k+ahead are generated and graded. ``trainer.mode=one_step_off`` is ``ahead=1``;
``trainer.mode=async`` is ``ahead=trainer.max_staleness``. With ``ahead`` batches in flight,
a batch taken at step k was started after the weights of step k - ahead - 1 had been pushed, so
its samples are at most ``ahead`` versions old (the driver measures it from the recorded versions
and drops, counted, any group beyond the bound).

Pure standard library: it knows nothing of Ray or of what a batch is, so the loop's control flow
around it is unit-tested with plain callables (tests/unit/test_prefetch.py).

Lifetime: every batch produced is either taken by the loop or handed to a checkpoint
(:meth:`Prefetcher.settle`), and a resumed run puts them back (``preloaded``): none is lost and
none produced twice. An error in ``produce`` is raised by the :meth:`take` of that step, in the
loop's thread, with the producer's traceback chained.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("rlsys.prefetch")

__all__ = ["Prefetcher", "Produced"]


class Produced(Generic[T]):
    """One produced batch: the value, and when the producer started and finished it (perf_counter)."""

    __slots__ = ("value", "started", "finished", "waited_s")

    def __init__(self, value: T, started: float, finished: float, waited_s: float) -> None:
        self.value = value
        self.started = started
        self.finished = finished
        self.waited_s = waited_s  # how long the producer sat idle, held back by the bound, before starting it


class Prefetcher(Generic[T]):
    """Produce the batches of steps ``first .. last`` ahead of the loop, at most ``ahead`` beyond the taken one.

    ``produce(step)`` runs on a daemon thread. ``take(step)`` (steps in order, from ``first``) waits for
    that step's batch and lets the producer start step ``step + ahead``. ``preloaded``: batches a
    checkpoint saved (steps ``first ..``), returned by ``take`` without producing them again.
    """

    def __init__(
        self,
        produce: Callable[[int], T],
        first: int,
        last: int,
        ahead: int,
        preloaded: dict[int, T] | None = None,
    ) -> None:
        if ahead < 1:
            raise ValueError(f"Prefetcher: ahead must be >= 1, got {ahead}")
        self._produce = produce
        self._last = last
        self._ahead = ahead
        self._cond = threading.Condition()
        self._done: dict[int, Produced[T]] = {}
        self._errors: dict[int, BaseException] = {}
        self._taken = first - 1  # the last step the loop took
        self._next = first  # the next step the producer will start
        self._busy: int | None = None
        self._closed = False
        for step, value in sorted((preloaded or {}).items()):
            if step != self._next:
                raise ValueError(
                    f"Prefetcher: preloaded steps must be {first}, {first + 1}, ...; got {sorted(preloaded or {})}"
                )
            now = time.perf_counter()
            self._done[step] = Produced(value, now, now, 0.0)
            self._next += 1
        self._thread = threading.Thread(target=self._run, name="rlsys-prefetch", daemon=True)
        self._thread.start()

    # ---- producer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle0 = time.perf_counter()
            with self._cond:
                while not self._closed and not (self._next <= self._last and self._next <= self._taken + self._ahead):
                    self._cond.wait()
                if self._closed:
                    return
                step = self._next
                self._busy = step
            started = time.perf_counter()
            try:
                value = self._produce(step)
            except BaseException as e:  # noqa: BLE001 - handed to the loop's take(step), which raises it
                with self._cond:
                    self._errors[step] = e
                    self._busy = None
                    self._cond.notify_all()
                return
            with self._cond:
                self._done[step] = Produced(value, started, time.perf_counter(), started - idle0)
                self._busy = None
                self._next += 1
                self._cond.notify_all()

    # ---- the loop's side ------------------------------------------------------------------------

    def take(self, step: int, timeout_s: float | None = None) -> Produced[T]:
        """The batch of ``step`` (the next one in order), once produced; lets the producer run on."""
        with self._cond:
            if step != self._taken + 1:
                raise ValueError(f"Prefetcher.take: expected step {self._taken + 1}, got {step}")
            self._taken = step
            self._cond.notify_all()
            deadline = None if timeout_s is None else time.perf_counter() + timeout_s
            while step not in self._done:
                if step in self._errors:
                    raise RuntimeError(f"producing the batch of step {step} failed: {self._errors[step]}") from (
                        self._errors[step]
                    )
                if self._closed:
                    raise RuntimeError(f"Prefetcher.take({step}): the prefetcher was closed")
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the batch of step {step} was not produced within {timeout_s:g} s")
                self._cond.wait(left)
            return self._done.pop(step)

    def wait(self, step: int, timeout_s: float | None = None) -> None:
        """Block until the batch of ``step`` (taken + 1 .. taken + ahead) is produced; nothing is consumed.
        ``trainer.mode=one_step_off`` waits so before each push: the next batch is then entirely the
        previous weights' samples, whatever the timing."""
        with self._cond:
            if not self._taken < step <= self._taken + self._ahead:
                raise ValueError(
                    f"Prefetcher.wait: step {step} is not in flight (taken {self._taken}, ahead {self._ahead})"
                )
            deadline = None if timeout_s is None else time.perf_counter() + timeout_s
            while step not in self._done:
                if step in self._errors:
                    raise RuntimeError(f"producing the batch of step {step} failed: {self._errors[step]}") from (
                        self._errors[step]
                    )
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the batch of step {step} was not produced within {timeout_s:g} s")
                self._cond.wait(left)

    def settle(self, timeout_s: float | None = None) -> dict[int, T]:
        """Wait until the producer is idle (held back by the bound) and return the batches produced but
        not yet taken, by step: what a checkpoint taken now must keep. Nothing is consumed."""
        with self._cond:
            deadline = None if timeout_s is None else time.perf_counter() + timeout_s
            while self._busy is not None or (self._next <= self._last and self._next <= self._taken + self._ahead):
                if self._errors:
                    step, err = next(iter(self._errors.items()))
                    raise RuntimeError(f"producing the batch of step {step} failed: {err}") from err
                left = None if deadline is None else deadline - time.perf_counter()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the in-flight batches did not finish within {timeout_s:g} s")
                self._cond.wait(left)
            return {step: p.value for step, p in sorted(self._done.items())}

    def close(self) -> None:
        """Stop producing (a batch being produced finishes or fails on its own: the thread is a daemon)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
