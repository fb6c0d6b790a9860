"""Progress with an ETA for a known number of units (RL steps, SFT steps, prompts sampled).

Pure (no Ray, vLLM or DeepSpeed)::

    prog = Progress(600, "SFT step", logger=log)
    for step in range(1, 601):
        ...
        prog.update(step, info=f"batch NLL/token {nll:.3f}")       # a line when one is due
    prog.close()

Two displays, chosen once per tracker (:func:`want_bar`):

* stderr is a terminal: a tqdm bar (removed when closed); while it is open, the root logger's
  console handlers write through ``tqdm.write`` so log lines do not break it. Lines asked for
  with ``emit=True`` and the last unit's line are still logged.
* otherwise (a pipe or a file, ``ray job submit``, CI): plain log lines -- the first unit, then at
  most one every ``interval_s`` seconds (:data:`DEFAULT_INTERVAL_S`, env ``RLSYS_PROGRESS_INTERVAL_S``),
  and the last unit.

``RLSYS_PROGRESS=lines`` forces plain lines on a terminal, ``RLSYS_PROGRESS=bar`` a bar elsewhere.
A line reads ``SFT step 120/600 (20%) | batch NLL/token 0.853 | 1m14s elapsed, ETA 4m56s, 0.62 s/step``;
the ETA is (units left) / (mean rate since the tracker started), so it includes everything the loop
does between units (held-out evaluations, checkpoints).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

DEFAULT_INTERVAL_S = 15.0

_log = logging.getLogger(__name__)


def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``35s``, ``4m10s``, ``1h02m``, ``2d03h``; ``?`` for None / NaN / inf."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0.0, float(seconds))
    if s < 9.95:
        return f"{s:.1f}s"
    r = int(round(s))
    if r < 60:
        return f"{r}s"
    if r < 3600:
        return f"{r // 60}m{r % 60:02d}s"
    r = int(round(s / 60))  # minutes
    if r < 24 * 60:
        return f"{r // 60}h{r % 60:02d}m"
    r = int(round(s / 3600))  # hours
    return f"{r // 24}d{r % 24:02d}h"


def format_rate(rate: float | None, unit: str) -> str:
    """``5.3 prompt/s`` at one unit a second or more, else ``0.62 s/step``; ``?`` when unknown."""
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return f"? s/{unit}"
    if rate >= 1.0:
        return f"{rate:.1f} {unit}/s"
    return f"{1.0 / rate:.2f} s/{unit}"


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    raw = os.environ.get("RLSYS_PROGRESS_INTERVAL_S", "")
    try:
        v = float(raw)
    except ValueError:
        return default
    return v if v >= 0 and math.isfinite(v) else default


def want_bar(stream: TextIO | None = None) -> bool:
    """A tqdm bar when ``stream`` (default: stderr) is a terminal, unless ``RLSYS_PROGRESS`` says
    otherwise (``lines`` / ``bar``)."""
    mode = os.environ.get("RLSYS_PROGRESS", "").strip().lower()
    if mode in ("lines", "line", "plain", "off", "0", "no"):
        return False
    if mode in ("bar", "tqdm"):
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts ``done`` of ``total`` units since it was created (``initial`` units were done before:
    a resumed run) and says how long the rest will take.

    ``update(n_done)`` / ``advance(n)`` move it; with ``emit=None`` a line is logged when due (see the
    module docstring), ``emit=True`` always, ``emit=False`` never. :meth:`line`, :meth:`counts` and
    :meth:`timing` give the text to put into a log line of one's own. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        unit: str = "step",
        initial: int = 0,
        interval_s: float | None = None,
        bar: bool | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
        counts_fmt: str = "{done}/{total} ({pct}%)",
    ):
        if total < 0 or initial < 0:
            raise ValueError(f"progress: total and initial must be >= 0, got {total} and {initial}")
        self.total = int(total)
        self.initial = min(int(initial), self.total)
        self.done = self.initial
        self.desc = desc
        self.unit = unit
        self.counts_fmt = counts_fmt
        self.interval_s = interval_from_env() if interval_s is None else float(interval_s)
        self.logger = logger or _log
        self._clock = clock
        self.t_start = clock()
        self._last_emit_t = self.t_start
        self._emitted_first = False
        self._emitted_last = False
        self._bar: Any = None
        self._redirect: Any = None
        self.uses_bar = want_bar(stream) if bar is None else bool(bar)
        if self.uses_bar:
            self._open_bar(stream)

    # ---- numbers --------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return max(0.0, self._clock() - self.t_start)

    @property
    def rate(self) -> float | None:
        """Units per second since the tracker started; None before the first unit."""
        n, dt = self.done - self.initial, self.elapsed
        return n / dt if n > 0 and dt > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the mean rate so far; 0 when done; None before the first unit."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        r = self.rate
        return left / r if r else None

    # ---- text -----------------------------------------------------------------------------------
    def counts(self) -> str:
        pct = int(100 * self.done / self.total) if self.total else 100
        return self.counts_fmt.format(done=self.done, total=self.total, pct=pct)

    def timing(self) -> str:
        """``1m14s elapsed, ETA 4m56s, 0.62 s/step`` (``done in 5m12s, ...`` at the end)."""
        rate = format_rate(self.rate, self.unit)
        if self.done >= self.total:
            return f"done in {format_duration(self.elapsed)}, {rate}"
        return f"{format_duration(self.elapsed)} elapsed, ETA {format_duration(self.eta)}, {rate}"

    def line(self, info: str = "") -> str:
        head = f"{self.desc} {self.counts()}" if self.desc else self.counts()
        return " | ".join(part for part in (head, info, self.timing()) if part)

    # ---- moving ---------------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether an automatic line is due now (the last unit; with plain lines also the first unit
        and every ``interval_s`` seconds)."""
        if self.done >= self.total:
            return not self._emitted_last
        if self.uses_bar or self.done <= self.initial:
            return False
        return not self._emitted_first or self._clock() - self._last_emit_t >= self.interval_s

    def update(self, n_done: int, info: str = "", *, emit: bool | None = None) -> bool:
        """Set the number of units done (clamped to ``total``); returns whether a line was logged."""
        n_done = min(max(int(n_done), self.initial), self.total)
        delta, self.done = n_done - self.done, n_done
        if self._bar is not None:
            if info:
                self._bar.set_postfix_str(info, refresh=False)
            if delta > 0:
                self._bar.update(delta)
        if emit is False or (emit is None and not self.due()):
            return False
        self.logger.info("%s", self.line(info))
        self._last_emit_t = self._clock()
        self._emitted_first = True
        self._emitted_last = self.done >= self.total
        return True

    def advance(self, n: int = 1, info: str = "", *, emit: bool | None = None) -> bool:
        return self.update(self.done + n, info, emit=emit)

    # ---- the bar --------------------------------------------------------------------------------
    def _open_bar(self, stream: TextIO | None) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(
            total=self.total,
            initial=self.initial,
            desc=self.desc or None,
            unit=self.unit,
            file=stream if stream is not None else sys.stderr,
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
            smoothing=0.1,
        )
        # Console log lines go through tqdm.write while the bar is open.
        self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
        self._redirect.__enter__()

    def close(self) -> None:
        """Remove the bar and restore the console log handlers (no-op with plain lines). Logs nothing:
        the last unit's line was logged by :meth:`update`."""
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
