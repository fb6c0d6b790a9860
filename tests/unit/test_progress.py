"""rlsys.progress: ETA math on an injected clock, formatting, throttled lines, bar vs plain lines."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from rlsys.progress import Progress, format_duration, format_rate, interval_from_env, want_bar


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lines_tracker(total, clock, **kw):
    kw.setdefault("logger", logging.getLogger("test.progress"))
    return Progress(total, kw.pop("desc", "step"), bar=False, clock=clock, **kw)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0.0s"),
        (4.24, "4.2s"),
        (9.96, "10s"),
        (35.4, "35s"),
        (59.6, "1m00s"),
        (250, "4m10s"),
        (3599.4, "59m59s"),
        (3600, "1h00m"),
        (3725, "1h02m"),
        (86340, "23h59m"),
        (86399, "1d00h"),
        (86400 + 3 * 3600, "1d03h"),
        (-3, "0.0s"),
        (None, "?"),
        (float("nan"), "?"),
        (float("inf"), "?"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_rate():
    assert format_rate(2.5, "prompt") == "2.5 prompt/s"
    assert format_rate(1 / 0.62, "step") == "1.6 step/s"
    assert format_rate(0.5, "step") == "2.00 s/step"
    assert format_rate(None, "step") == "? s/step"
    assert format_rate(0.0, "step") == "? s/step"


def test_eta_math_on_an_injected_clock():
    clock = Clock()
    p = lines_tracker(10, clock)
    assert p.rate is None and p.eta is None and p.elapsed == 0
    assert "ETA ?" in p.timing()
    clock.t += 20
    p.update(4, emit=False)
    assert p.elapsed == pytest.approx(20)
    assert p.rate == pytest.approx(0.2)
    assert p.eta == pytest.approx(30)  # 6 left at 0.2/s
    assert p.timing() == "20s elapsed, ETA 30s, 5.00 s/step"
    assert p.counts() == "4/10 (40%)"
    clock.t += 10
    p.advance(emit=False)
    assert p.done == 5 and p.eta == pytest.approx(30)
    clock.t += 30
    p.update(10, emit=False)
    assert p.eta == 0.0 and p.timing() == "done in 1m00s, 6.00 s/step"


def test_resumed_run_counts_only_the_units_done_since_the_start():
    clock = Clock()
    p = lines_tracker(100, clock, initial=60)
    assert p.counts() == "60/100 (60%)" and p.eta is None
    clock.t += 40
    p.update(70, emit=False)
    assert p.rate == pytest.approx(0.25) and p.eta == pytest.approx(120)
    p.update(5, emit=False)  # never below the units done before the start
    assert p.done == 60
    p.update(500, emit=False)  # nor above the total
    assert p.done == 100


def test_line_format():
    clock = Clock()
    p = lines_tracker(600, clock, desc="SFT step")
    clock.t += 74.4
    p.update(120, emit=False)
    assert (
        p.line("batch NLL/token 0.853")
        == "SFT step 120/600 (20%) | batch NLL/token 0.853 | 1m14s elapsed, ETA 4m58s, 1.6 step/s"
    )
    q = lines_tracker(8, clock, desc="eval: sampled", unit="prompt", counts_fmt="{done}/{total} prompts x 4 ({pct}%)")
    assert q.line().startswith("eval: sampled 0/8 prompts x 4 (0%) | 0.0s elapsed, ETA ?")
    assert lines_tracker(0, clock).counts() == "0/0 (100%)"


def test_plain_lines_are_throttled_first_and_last_always(caplog):
    clock = Clock()
    p = lines_tracker(100, clock, interval_s=15, desc="SFT step")
    emitted = []
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for step in range(1, 101):
            clock.t += 1.0  # one second per step
            if p.update(step, info=f"nll {step}"):
                emitted.append(step)
    # the first unit, then one every 15 s, then the last
    assert emitted == [1, 16, 31, 46, 61, 76, 91, 100]
    assert len(caplog.records) == len(emitted)
    assert caplog.records[0].getMessage() == "SFT step 1/100 (1%) | nll 1 | 1.0s elapsed, ETA 1m39s, 1.0 step/s"
    assert caplog.records[-1].getMessage().endswith("| nll 100 | done in 1m40s, 1.0 step/s")


def test_forced_lines_reset_the_timer_and_suppressed_lines_do_not(caplog):
    clock = Clock()
    p = lines_tracker(50, clock, interval_s=10)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.t += 1
        assert p.update(1)  # first
        clock.t += 8
        assert p.update(2, emit=True)  # forced (e.g. a log_every point), resets the timer
        clock.t += 9
        assert not p.update(3)  # 9 s after the forced line: not due
        clock.t += 1
        assert p.update(4)  # 10 s: due
        clock.t += 100
        assert not p.update(5, emit=False)
        assert p.update(50)  # the last unit
        assert not p.update(50)  # only once
    assert len(caplog.records) == 4


def test_a_single_unit_job_logs_one_line(caplog):
    clock = Clock()
    p = lines_tracker(8, clock, unit="prompt", interval_s=15)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.t += 2
        assert p.update(8)
    assert len(caplog.records) == 1 and "done in 2.0s, 4.0 prompt/s" in caplog.text


def test_interval_from_env(monkeypatch):
    monkeypatch.delenv("RLSYS_PROGRESS_INTERVAL_S", raising=False)
    assert interval_from_env() == 15.0
    monkeypatch.setenv("RLSYS_PROGRESS_INTERVAL_S", "5")
    assert interval_from_env() == 5.0 and lines_tracker(3, Clock()).interval_s == 5.0
    monkeypatch.setenv("RLSYS_PROGRESS_INTERVAL_S", "soon")
    assert interval_from_env() == 15.0


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bar_only_on_a_terminal_unless_the_env_says_otherwise(monkeypatch):
    monkeypatch.delenv("RLSYS_PROGRESS", raising=False)
    assert want_bar(FakeStream(True)) and not want_bar(FakeStream(False))
    assert not want_bar(object())  # no isatty at all
    closed = io.StringIO()
    closed.close()
    assert not want_bar(closed)  # isatty() raises ValueError
    monkeypatch.setenv("RLSYS_PROGRESS", "lines")
    assert not want_bar(FakeStream(True))
    monkeypatch.setenv("RLSYS_PROGRESS", "bar")
    assert want_bar(FakeStream(False))


def test_non_tty_stream_gets_plain_lines(monkeypatch):
    monkeypatch.delenv("RLSYS_PROGRESS", raising=False)
    p = Progress(5, "x", stream=FakeStream(False), clock=Clock())
    assert not p.uses_bar
    p.close()  # no-op


def test_tty_stream_gets_a_bar_and_log_lines_go_around_it(monkeypatch):
    monkeypatch.delenv("RLSYS_PROGRESS", raising=False)
    stream = FakeStream(True)
    root = logging.getLogger()
    console = logging.StreamHandler(stream)
    saved = root.handlers[:], root.level
    root.handlers, root.level = [console], logging.INFO
    monkeypatch.setattr(sys, "stderr", stream)  # the console handler must count as one
    try:
        clock = Clock()
        with Progress(3, "SFT step", stream=stream, clock=clock, interval_s=0, logger=logging.getLogger("t.bar")) as p:
            assert p.uses_bar
            assert console not in root.handlers  # redirected through tqdm.write
            clock.t += 1
            assert not p.update(1, info="nll 1.0")  # the bar is the display: no automatic lines...
            assert p.update(2, info="nll 0.9 | held-out 0.8", emit=True)  # ...except forced ones
            clock.t += 1
            assert p.update(3)  # and the last unit
        assert root.handlers == [console]  # restored on close
    finally:
        root.handlers, root.level = saved
    out = stream.getvalue()
    assert "SFT step 2/3 (66%) | nll 0.9 | held-out 0.8 |" in out
    assert "SFT step 3/3 (100%) | done in 2.0s" in out
