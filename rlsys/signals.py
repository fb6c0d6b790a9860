"""Stopping a job on SIGINT (Ctrl-C) or SIGTERM (``kill``, ``ray job stop``): fast, clean, one line.

Every entry point (train, sft, eval, difficulty) runs its work inside :func:`stop_on_signals`:

1. **First signal.** One line is logged ("stopping (SIGINT) ...; press Ctrl-C again to kill at
   once") and the main thread unwinds: the handler raises :class:`Interrupted`. The pools'
   ``shutdown()`` see :func:`stopping` and kill their actors instead of asking them to stop (an
   actor busy generating or training answers a graceful call only when its current call ends), a
   local Ray cluster this process started is shut down (one it joined is left alone: only this
   job's actors are killed), the checkpoint being written is removed, one line names the last
   complete checkpoint and the resume command, and the process exits 128 + signum (130 / 143).
2. **Watchdog.** If the process is still alive ``grace_s`` after the first signal (8 s; 2.5 s
   under ``ray job submit``, whose ``ray job stop`` sends SIGKILL 3 s after SIGTERM), a thread
   SIGKILLs every process this one started (the local Ray cluster with its actors, the verifier
   sandboxes), removes the partial checkpoint, prints the line and exits (``os._exit``).
3. **Second signal.** The same, at once.

Signals are counted by a thread reading the interpreter's wakeup fd (``signal.set_wakeup_fd``):
Python's C-level handler writes each signal number there immediately, so the watchdog and the
second-signal kill work even while the main thread sits in native code that never returns.

What this rests on (measured with Ray 2.60 on CPU; tests/integration/test_signals.py):

* ``ray.get`` / ``ray.wait`` run Python signal handlers while they block. A handler that raises a
  ``KeyboardInterrupt`` (subclass) makes them raise a plain KeyboardInterrupt at once; any other
  exception type is lost (a SystemError when the call finally returns). Hence Interrupted
  subclasses KeyboardInterrupt (a BaseException, so ``except Exception`` does not swallow it), and
  the signal number is kept here rather than on the exception.
* ``ray.init`` installs a native SIGTERM handler over Python's (it dumps a stack and aborts: exit
  134); :func:`reinstall` (called by rlsys.cluster.connect after ``ray.init``) puts ours back.
* Ctrl-C in a terminal signals the whole foreground process group. The Ray processes the driver
  started (gcs_server, raylet, dashboard, log monitor, agents) share that group but run with SIGINT
  blocked (SigBlk 0x2), and the actor workers run in process groups of their own: only the driver
  reacts, and it has to stop the rest (ray.kill, ray.shutdown; the watchdog: SIGKILL).
* ``ray job stop`` sends SIGTERM to the entrypoint and its children, SIGKILL 3 s later
  (RAY_JOB_STOP_WAIT_TIME_S); the entrypoint starts with SIGINT blocked.
* Without this module a stop waited for the busy actors: graceful ``shutdown`` calls queue behind
  the running generate / train call (the whole phase; minutes on a slow CPU).
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rlsys.fsutil import partial_dirs

log = logging.getLogger("rlsys.signals")

HANDLED = (signal.SIGINT, signal.SIGTERM)
DEFAULT_GRACE_S = 8.0  # first signal -> hard kill; the whole stop stays under 10 s
JOB_GRACE_S = 2.5  # under `ray job submit`: `ray job stop` SIGKILLs 3 s after its SIGTERM
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT / SIGTERM (see the module docstring)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


def exit_code(signum: int) -> int:
    """The shell convention for a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class Status:
    """What the stop line reports. Entry points fill in the command; the driver keeps the phase."""

    app: str = "rlsys"
    phase: str = "start-up"
    step: int | None = None
    total_steps: int | None = None
    output_dir: str | None = None  # a training run's directory (its checkpoints/); None: not resumable
    command: str = ""  # the command that resumes (training) or re-runs the job
    partial: set[str] = field(default_factory=set)  # directories being written, removed on a stop


# The process's status. Its ``partial`` IS fsutil's registry, which rlsys.checkpoint fills without importing us.
status = Status(partial=partial_dirs)
_controller: StopController | None = None


def set_phase(phase: str, step: int | None = None, total_steps: int | None = None) -> None:
    """Record the phase the job is in (and the step); the stop line names it."""
    status.phase = phase
    if step is not None:
        status.step = step
    if total_steps is not None:
        status.total_steps = total_steps
    log.debug("phase %s%s", phase, f" (step {status.step})" if status.step is not None else "")


def stopping() -> bool:
    """True once a SIGINT / SIGTERM arrived: clean-up code should kill rather than wait."""
    return _controller is not None and _controller.signum is not None


def track_partial(path: str | os.PathLike) -> None:
    """``path`` is being written; a stop removes it (rlsys.checkpoint.begin)."""
    status.partial.add(str(path))


def untrack_partial(path: str | os.PathLike) -> None:
    """``path`` is complete or gone (rlsys.checkpoint.commit)."""
    status.partial.discard(str(path))


def rerun_command(module: str, argv: Sequence[str], output_dir: str | None = None) -> str:
    """``python -m module argv...``; with ``output_dir`` (training) the overrides that resume it:
    any ``run.output_dir=`` / ``run.resume=`` in ``argv`` replaced by the run's directory and ``auto``."""
    args = list(argv)
    if output_dir is not None:
        args = [a for a in args if not a.lstrip("+~").startswith(("run.output_dir=", "run.resume="))]
        args += [f"run.output_dir={output_dir}", "run.resume=auto"]
    return shlex.join(["python", "-m", module, *args])


def stop_line(signum: int, st: Status, checkpoint: str | None) -> str:
    """The one line a stopped job ends with."""
    where = st.phase
    if st.step is not None:
        where += f" at step {st.step}" + (f"/{st.total_steps}" if st.total_steps else "")
    head = f"rlsys: interrupted by {signal_name(signum)} during {where}"
    if st.output_dir is not None:
        return f"{head}; last complete checkpoint: {checkpoint or 'none'}; resume with: {st.command}"
    return f"{head}; no partial result was kept; run it again with: {st.command}"


def last_checkpoint(st: Status) -> str | None:
    """The newest complete checkpoint of the run (on disk: what a resume would pick), or None."""
    if st.output_dir is None:
        return None
    from rlsys.checkpoint import latest

    try:
        found = latest(st.output_dir)
    except OSError:
        return None
    return str(found) if found is not None else None


def remove_partial(st: Status) -> None:
    for path in sorted(st.partial):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            st.partial.discard(path)


def kill_descendants(root: int | None = None, wait_s: float = 2.0) -> int:
    """SIGKILL every process this one (or ``root``) started, recursively; returns how many.

    With a local cluster that is the Ray cluster itself (gcs_server, raylet, agents) and every
    actor (children of the raylet) with their sandboxes; with a joined cluster only local helpers
    (the driver's actors there die with the driver: Ray kills the actors an exiting job owns).
    """
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)  # the whole tree first, then kill
    except psutil.Error:
        return 0
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    # Wait until each has exited (a zombie has: orphans may wait long for a reaper; psutil's
    # wait_procs would wait for that), so none writes into a directory removed next.
    deadline = time.monotonic() + wait_s
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        still = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.Error:
                pass
        alive = still
        if alive:
            time.sleep(0.02)
    return len(procs)


class StopController:
    """Counts signals and decides: unwind on the first, kill on the second or at the deadline.

    Signals arrive on two channels, the main thread's Python handler (:meth:`on_handler`) and the
    wakeup fd read by :meth:`run_monitor`; both see every signal (the handler may see two as one),
    so the count is the larger of the two counts. ``kill_tree`` and ``exit_now`` are
    ``kill_descendants`` and ``os._exit`` outside tests.
    """

    def __init__(
        self,
        st: Status,
        grace_s: float,
        *,
        kill_tree: Callable[[], int] = kill_descendants,
        exit_now: Callable[[int], None] = os._exit,
        stream=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.status = st
        self.grace_s = float(grace_s)
        self.kill_tree = kill_tree
        self.exit_now = exit_now
        self.stream = stream
        self.clock = clock
        self.lock = threading.RLock()
        self.signum: int | None = None  # the first signal
        self.deadline: float | None = None
        self.counts = {"handler": 0, "fd": 0}
        self.raised = False
        self.printed = False
        self.killing = False
        self.closed = False  # the work's context has exited
        self.monitor_stop = threading.Event()  # ends run_monitor (normal exit; tests)

    @property
    def count(self) -> int:
        return max(self.counts.values())

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def seen(self, signum: int, channel: str) -> int:
        """One signal seen on ``channel`` ("handler" or "fd"); returns the signal count so far."""
        with self.lock:
            before = self.count
            self.counts[channel] += 1
            n = self.count
            if n == before:
                return n
            if n == 1:
                self.signum = int(signum)
                self.deadline = self.clock() + self.grace_s
                again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {signal_name(signum)} again"
                try:
                    print(
                        f"rlsys: stopping ({signal_name(signum)}) during {self.status.phase}; {again} to kill at once",
                        file=self._out(),
                        flush=True,
                    )
                except RuntimeError:  # the handler interrupted a write to the same stream (reentrant call)
                    pass
        if n >= 2:
            self.kill_now(f"second signal ({signal_name(signum)})")
        return n

    def on_handler(self, signum: int, frame=None) -> None:
        """The Python-level handler (main thread): raise Interrupted once, on the first signal."""
        n = self.seen(signum, "handler")
        with self.lock:
            if n >= 1 and not self.raised and not self.killing and not self.closed:
                self.raised = True
                raise Interrupted(self.signum if self.signum is not None else signum)

    def expired(self) -> bool:
        with self.lock:
            return self.deadline is not None and self.clock() >= self.deadline

    def finish_line(self) -> None:
        """Remove partial checkpoints and print the stop line (once, whichever thread gets here first)."""
        with self.lock:
            if self.printed:
                return
            self.printed = True
        remove_partial(self.status)
        print(
            stop_line(self.signum or signal.SIGINT, self.status, last_checkpoint(self.status)),
            file=self._out(),
            flush=True,
        )

    def kill_now(self, reason: str) -> None:
        """Kill everything this process started, print the line, exit 128 + signum. Never returns
        outside tests (``exit_now``)."""
        with self.lock:
            if self.killing:
                return
            self.killing = True
            signum = self.signum or signal.SIGINT
        try:
            print(f"rlsys: {reason}: killing the job's processes now", file=self._out(), flush=True)
            self.kill_tree()
            self.finish_line()
        except BaseException as e:  # noqa: BLE001 - nothing may keep us from exiting
            try:
                print(f"rlsys: while killing: {e!r}", file=self._out(), flush=True)
            except BaseException:  # noqa: BLE001
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
            self.exit_now(exit_code(signum))

    def run_monitor(self, rsock: socket.socket, poll_s: float = 0.2) -> None:
        """Thread body: count signals from the wakeup fd; kill when the deadline passes."""
        while not self.monitor_stop.is_set():
            with self.lock:
                if self.closed and self.signum is None:
                    return
            try:
                ready, _, _ = select.select([rsock], [], [], poll_s)
            except (OSError, ValueError):
                ready = []
                time.sleep(poll_s)
            if ready:
                try:
                    data = rsock.recv(64)
                except (BlockingIOError, InterruptedError):
                    data = b""
                except OSError:
                    return
                for b in data:
                    if b in HANDLED:
                        self.seen(b, "fd")
            if self.expired():
                self.kill_now(f"still running {self.grace_s:g} s after {signal_name(self.signum or 2)}")
                return


def default_grace_s() -> float:
    env = os.environ.get("RLSYS_STOP_GRACE_S")
    if env:
        return float(env)
    return JOB_GRACE_S if _JOB_ENV in os.environ else DEFAULT_GRACE_S


def _install(ctl: StopController) -> None:
    for s in HANDLED:
        signal.signal(s, ctl.on_handler)


def reinstall() -> None:
    """Put the handlers back after something replaced them (``ray.init`` installs its own SIGTERM
    handler, natively, over Python's); a no-op outside :func:`stop_on_signals`."""
    ctl = _controller
    if ctl is not None and threading.current_thread() is threading.main_thread():
        _install(ctl)


@contextmanager
def stop_on_signals(
    app: str,
    argv: Sequence[str] | None = None,
    *,
    grace_s: float | None = None,
    controller: StopController | None = None,
) -> Iterator[Status]:
    """Run an entry point's work so that SIGINT / SIGTERM stop it as the module docstring says.

    Yields the :data:`status` to fill in (``output_dir`` and ``command`` for a training run; see
    :func:`rerun_command`). On a stop, raises ``SystemExit(128 + signum)`` after the stop line.
    Must be entered in the main thread.
    """
    global _controller
    if threading.current_thread() is not threading.main_thread():
        yield status  # signals only reach the main thread; nothing to do
        return
    status.app = app
    status.phase, status.step, status.total_steps, status.output_dir = "start-up", None, None, None
    status.command = rerun_command(app, sys.argv[1:] if argv is None else argv)
    status.partial.clear()
    ctl = controller or StopController(status, default_grace_s() if grace_s is None else grace_s)
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)
    old_handlers = {s: signal.getsignal(s) for s in HANDLED}
    old_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
    _controller = ctl
    _install(ctl)
    monitor = threading.Thread(target=ctl.run_monitor, args=(rsock,), name="rlsys-stop-watchdog", daemon=True)
    monitor.start()
    interrupted = False
    try:
        yield status
    except BaseException as e:
        # Anything raised once a signal arrived is the stop unwinding (a clean-up call may fail
        # against actors that are already gone); a KeyboardInterrupt without one is a Ctrl-C.
        if ctl.signum is None and not isinstance(e, KeyboardInterrupt):
            raise
        interrupted = True
        if ctl.signum is None:
            ctl.seen(signal.SIGINT, "handler")
    finally:
        with ctl.lock:
            ctl.closed = True
        if not interrupted:
            ctl.monitor_stop.set()
            signal.set_wakeup_fd(old_fd)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            _controller = None
            monitor.join(timeout=2.0)
            rsock.close()
            wsock.close()
    if not interrupted:
        return
    # Stopped: the watchdog keeps running (a daemon) until the process is gone, so a hang in the
    # interpreter's own exit (atexit hooks, non-daemon threads) is still cut at the deadline.
    ctl.finish_line()
    raise SystemExit(exit_code(ctl.signum or signal.SIGINT))
