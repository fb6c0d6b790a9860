"""rlsys.prefetch.Prefetcher: order, the ahead bound, errors, settle and preload, on plain callables."""

from __future__ import annotations

import threading
import time

import pytest

from rlsys.prefetch import Prefetcher


class Recorder:
    """produce(step) records which steps the loop had taken when it started, optionally blocking."""

    def __init__(self) -> None:
        self.taken = 0
        self.started: list[tuple[int, int]] = []  # (step, steps taken by the loop then)
        self.gate: dict[int, threading.Event] = {}
        self.fail_at: int | None = None

    def __call__(self, step: int) -> str:
        self.started.append((step, self.taken))
        if step in self.gate:
            self.gate[step].wait(5)
        if step == self.fail_at:
            raise ValueError(f"boom at {step}")
        return f"batch-{step}"


def take(p: Prefetcher, rec: Recorder, step: int) -> str:
    value = p.take(step, timeout_s=5).value
    rec.taken = step
    return value


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_batches_come_in_order_and_never_more_than_ahead(ahead: int) -> None:
    rec = Recorder()
    p = Prefetcher(rec, first=1, last=8, ahead=ahead)
    try:
        got = []
        for step in range(1, 9):
            time.sleep(0.01)  # let the producer run as far as the bound allows
            got.append(take(p, rec, step))
        assert got == [f"batch-{s}" for s in range(1, 9)]
        assert [s for s, _ in rec.started] == list(range(1, 9))  # each produced once, in order
        # Step s starts only once the loop took step s - ahead: never more than `ahead` beyond the taken one.
        for step, taken in rec.started:
            assert step - taken <= ahead, (step, taken)
        assert any(step - taken == ahead for step, taken in rec.started[1:])  # and it does run ahead
    finally:
        p.close()


def test_take_out_of_order_is_refused() -> None:
    p = Prefetcher(lambda s: s, first=3, last=5, ahead=1)
    try:
        with pytest.raises(ValueError, match="expected step 3"):
            p.take(4)
    finally:
        p.close()


def test_a_producer_error_is_raised_by_take_of_that_step() -> None:
    rec = Recorder()
    rec.fail_at = 2
    p = Prefetcher(rec, first=1, last=4, ahead=1)
    try:
        assert take(p, rec, 1) == "batch-1"
        with pytest.raises(RuntimeError, match="step 2 failed: boom at 2") as info:
            p.take(2, timeout_s=5)
        assert isinstance(info.value.__cause__, ValueError)
    finally:
        p.close()


def test_settle_waits_for_the_batches_in_flight_and_consumes_nothing() -> None:
    rec = Recorder()
    rec.gate[3] = threading.Event()
    p = Prefetcher(rec, first=1, last=6, ahead=2)
    try:
        take(p, rec, 1)  # the producer may now run steps 2 and 3; 3 blocks on its gate
        threading.Timer(0.2, rec.gate[3].set).start()
        t0 = time.perf_counter()
        assert p.settle(timeout_s=5) == {2: "batch-2", 3: "batch-3"}
        assert time.perf_counter() - t0 >= 0.15  # it waited for step 3
        assert take(p, rec, 2) == "batch-2"  # still there
    finally:
        p.close()


def test_preloaded_batches_are_returned_not_produced_again() -> None:
    rec = Recorder()
    p = Prefetcher(rec, first=5, last=8, ahead=2, preloaded={5: "saved-5", 6: "saved-6"})
    try:
        assert [take(p, rec, s) for s in (5, 6, 7, 8)] == ["saved-5", "saved-6", "batch-7", "batch-8"]
        assert [s for s, _ in rec.started] == [7, 8]
    finally:
        p.close()
    with pytest.raises(ValueError, match="preloaded steps"):
        Prefetcher(rec, first=5, last=8, ahead=2, preloaded={6: "x"})


def test_nothing_is_produced_past_the_last_step() -> None:
    rec = Recorder()
    p = Prefetcher(rec, first=1, last=2, ahead=3)
    try:
        take(p, rec, 1)
        take(p, rec, 2)
        assert p.settle(timeout_s=5) == {}
        assert [s for s, _ in rec.started] == [1, 2]
    finally:
        p.close()
