"""Out-of-process verifier execution with hard wall-clock timeouts.

Why processes: math-verify/sympy can hang (or blow up memory) on pathological answers, user
verifiers can hang or crash the interpreter, and ``signal.alarm`` timeouts only work on a process's
main thread -- not inside a Ray actor's worker threads. So each verifier runs in a persistent child
process that the parent SIGKILLs (with its whole process group) when it overruns, then replaces.

Children are started with ``subprocess`` (fork+exec of a fresh interpreter, safe from a parent
with Ray/torch threads, unlike a bare ``fork``) rather than ``multiprocessing``'s spawn, which would
re-import the driver's ``__main__`` in every child. Each child runs in its own session (so a kill
reaches any grandchildren), imports the verifiers once (math-verify's import and first parse are
slow), applies its limits in :func:`_harden_child` (the single place to add further isolation such
as no network or a scratch directory), then serves one request at a time over a socket.

:class:`VerifierSandbox` is the parent side: ``run(jobs)`` spreads jobs over ``num_procs`` children
and returns one :data:`~rlsys.rewards.verifiers.Outcome` per job, in order, never raising for a bad
job: a timeout yields status ``timeout``, a dead child yields status ``error``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from rlsys.records import GRADE_ERROR, GRADE_INVALID, GRADE_STATUSES, GRADE_TIMEOUT
from rlsys.rewards.verifiers import Outcome, truncate

# Where ``rlsys`` lives, so a child interpreter can import it whatever its working directory.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from rlsys.rewards.sandbox import _child_main; _child_main(int(sys.argv[1]))"
)
# Native thread pools (numpy's BLAS, OpenMP) are useless in a verifier and reserve address space that
# would count against RLIMIT_AS.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

@dataclass(frozen=True)
class ChildConfig:
    """Everything a child needs to set itself up (picklable; sent once per child start)."""

    allowed_functions: tuple[str, ...] = ()
    base_dir: str = ""  # relative "file.py:function" specs are resolved against it
    sys_path: tuple[str, ...] = ()  # the parent's sys.path, so user modules import the same way
    success_threshold: float = 1.0
    memory_limit_mb: int | None = 2048  # RLIMIT_AS of the child; None or 0 = unlimited
    max_detail_chars: int = 200


@dataclass(frozen=True)
class Job:
    """One verification: run verifier ``spec`` on (``completion``, ``answer``)."""

    spec: str
    completion: str
    answer: str


# ---------------------------------------------------------------------------------------------------
# Wire format. The parent pickles to the child (it trusts itself); the child answers in JSON, so the
# parent never unpickles bytes that verifier code -- or a completion a verifier executes -- could forge.

_MAX_REPLY_BYTES = 1 << 20
_MALFORMED = "verifier process sent a malformed reply"


def _reply(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _receive(conn: Connection) -> list[Any]:
    """Read one child reply; raises EOFError/OSError if the child is gone, ValueError if garbled."""
    message = json.loads(conn.recv_bytes(_MAX_REPLY_BYTES))
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("malformed reply from a verifier process")
    return message


def _parse_result(message: list[Any], job_index: int | None) -> Outcome | None:
    """Validate a ``["result", job_id, [reward, correct, status, detail]]`` reply; None if malformed."""
    try:
        kind, reply_job, (reward, correct, status, detail) = message
        if kind != "result" or reply_job != job_index or status not in GRADE_STATUSES:
            return None
        if not isinstance(correct, bool) or not isinstance(detail, str):
            return None
        reward = float(reward)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(reward):
        return 0.0, False, GRADE_INVALID, "non-finite reward"
    return reward, correct, status, detail


# ---------------------------------------------------------------------------------------------------
# Child side.


def _harden_child(config: ChildConfig) -> None:
    """Apply the child's isolation before any verifier code runs.

    The parent already made the child a session leader (a kill of its process group reaches any
    grandchildren; a terminal's Ctrl-C does not reach it: the parent decides when it dies). Here: no
    core dumps, an address-space cap, and an exit when the parent disappears.
    """
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config.memory_limit_mb:
        limit = int(config.memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _watch_parent(os.getppid())


def _watch_parent(parent_pid: int) -> None:
    """Exit this child as soon as its parent is gone, even while a verifier hangs.

    An idle child notices through EOF on its socket; a hung one would otherwise outlive a crashed
    parent forever. (PR_SET_PDEATHSIG is tied to the parent *thread*, which in a Ray actor may be a
    short-lived one, so poll instead.)
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="rlsys-parent-watch", daemon=True).start()


def _child_main(fd: int) -> None:
    """Entry point of a sandbox child: set up, report "ready" (or "fatal"), then serve requests.

    Protocol over the socket ``fd``: the parent first sends (pickled) ``(config, preload_specs)``,
    then ``("grade", job_id, spec, completion, answer)``, ``("resolve", job_id, spec, "", "")`` or
    ``None`` (exit); the child answers (JSON) ``["ready", pid]`` or ``["fatal", detail]`` once, then
    ``["result", job_id, outcome]`` / ``["resolved", job_id, error_or_empty]``.
    """
    conn = Connection(fd)
    resolved: dict[str, Any] = {}
    try:
        config, preload_specs = conn.recv()
        _harden_child(config)
        if config.sys_path:
            sys.path[:] = list(config.sys_path)
        from rlsys.rewards import verifiers

        verifiers.warm_up()
        for spec in preload_specs:
            try:
                resolved[spec] = verifiers.resolve_verifier(spec, config.allowed_functions, config.base_dir)
            except ValueError:
                pass  # reported when a request uses it
    except BaseException as exc:  # noqa: BLE001 - report any start-up failure to the parent
        try:
            _reply(conn, ("fatal", truncate(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, 500)))
        finally:
            return
    _reply(conn, ("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if message is None:
            return
        kind, job_id, spec, completion, answer = message
        fn = resolved.get(spec)
        error = ""
        if fn is None:
            try:
                fn = verifiers.resolve_verifier(spec, config.allowed_functions, config.base_dir)
                resolved[spec] = fn
            except ValueError as exc:
                error = truncate(str(exc), 500)
        if kind == "resolve":
            _reply(conn, ("resolved", job_id, error))
        elif error:
            _reply(conn, ("result", job_id, (0.0, False, GRADE_ERROR, truncate(error, config.max_detail_chars))))
        else:
            outcome = verifiers.run_verifier(
                fn, completion, answer, config.success_threshold, config.max_detail_chars
            )
            _reply(conn, ("result", job_id, outcome))


# ---------------------------------------------------------------------------------------------------
# Parent side.


class SandboxStartError(RuntimeError):
    """A sandbox child could not start (bad memory limit, broken environment): a config problem."""


class _Child:
    """Parent-side handle of one child process: its socket and what it is doing."""

    def __init__(self, config: ChildConfig, preload_specs: tuple[str, ...], startup_timeout_s: float):
        parent_sock, child_sock = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno()), _PACKAGE_ROOT],
                pass_fds=[child_sock.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: killpg reaches grandchildren too
                env={**os.environ, **_CHILD_ENV},
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()  # only the child holds its end now: its death reads as EOF here
        self.conn = Connection(parent_sock.detach())
        # A pidfd becomes readable when the process exits, even if a grandchild kept the socket open.
        self.sentinel: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.sentinel = os.pidfd_open(self.process.pid)
            except OSError:
                self.sentinel = None
        self.state = "starting"  # -> "idle" <-> "busy"; "dead" once killed
        self.deadline = time.monotonic() + startup_timeout_s
        self.job: int | None = None
        self.sent_at = 0.0
        try:
            self.conn.send((config, preload_specs))
        except OSError:
            pass  # died at once; the start-up check reports how

    def waitables(self) -> list[Any]:
        return [self.conn] if self.sentinel is None else [self.conn, self.sentinel]

    def kill(self) -> None:
        """SIGKILL the child and its process group (grandchildren a verifier started), then reap it."""
        if self.state == "dead":
            return
        self.state = "dead"
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.kill()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass  # unkillable (uninterruptible sleep): the OS reaps it later; we must not block
        self.conn.close()
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None

    def exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "verifier process stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"verifier process died ({name})"
        return f"verifier process exited with code {code}"


class VerifierSandbox:
    """A set of ``num_procs`` persistent verifier children with per-job hard timeouts.

    ``run(jobs)`` returns ``[(outcome, seconds)]`` in job order; ``resolve(specs)`` imports specs in
    every child up front and returns their errors. Children are started in the constructor (which
    waits until they are ready, raising :class:`SandboxStartError` if they cannot start) and replaced
    whenever one is killed or dies; ``restarts`` counts the replacements. Not thread-safe: one caller.
    """

    def __init__(
        self,
        num_procs: int = 1,
        timeout_s: float = 5.0,
        config: ChildConfig | None = None,
        startup_timeout_s: float = 120.0,
    ):
        if num_procs < 1:
            raise ValueError(f"VerifierSandbox num_procs must be >= 1, got {num_procs}")
        if not timeout_s > 0:
            raise ValueError(f"VerifierSandbox timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        base = config or ChildConfig()
        self._config = ChildConfig(
            allowed_functions=tuple(base.allowed_functions),
            base_dir=base.base_dir or os.getcwd(),
            sys_path=tuple(base.sys_path) or tuple(sys.path),
            success_threshold=base.success_threshold,
            memory_limit_mb=base.memory_limit_mb,
            max_detail_chars=base.max_detail_chars,
        )
        self._preload_specs: tuple[str, ...] = ()
        self.restarts = 0
        self._closed = False
        self._children: list[_Child] = []
        try:
            for _ in range(num_procs):
                self._children.append(self._new_child())
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def num_procs(self) -> int:
        return len(self._children)

    def _new_child(self) -> _Child:
        return _Child(self._config, self._preload_specs, self.startup_timeout_s)

    def _replace(self, index: int) -> None:
        self._children[index].kill()
        self._children[index] = self._new_child()
        self.restarts += 1

    def _on_message(self, index: int, message: Any) -> None:
        """Handle a start-up message; results are handled by the callers' loops."""
        child = self._children[index]
        if message[0] == "ready":
            child.state = "idle"
        elif message[0] == "fatal":
            raise SandboxStartError(
                f"reward sandbox: verifier process failed to start: {message[1]} "
                f"(memory_limit_mb={self._config.memory_limit_mb}; raise it if this is a MemoryError)"
            )

    def _check_startup(self, index: int, now: float) -> None:
        """Raise SandboxStartError if child ``index`` is still starting past its deadline or has died."""
        child = self._children[index]
        if child.state != "starting" or (now <= child.deadline and child.process.poll() is None):
            return
        try:
            # A child that failed reports why ("fatal") before exiting: prefer that to its exit code.
            if child.conn.poll(0):
                self._on_message(index, _receive(child.conn))
                if child.state != "starting":
                    return
        except (EOFError, OSError, ValueError):
            pass
        reason = (
            f"not ready after {self.startup_timeout_s:.0f}s"
            if child.process.poll() is None
            else child.exit_description()
        )
        raise SandboxStartError(
            f"reward sandbox: verifier process failed to start: {reason} "
            f"(memory_limit_mb={self._config.memory_limit_mb})"
        )

    def _wait_ready(self) -> None:
        """Block until every child is idle (or raise SandboxStartError)."""
        while True:
            starting = [i for i, c in enumerate(self._children) if c.state == "starting"]
            if not starting:
                return
            now = time.monotonic()
            for i in starting:
                self._check_startup(i, now)
            timeout = max(0.0, min(self._children[i].deadline for i in starting) - now)
            ready = wait([self._children[i].conn for i in starting], timeout=min(timeout, 1.0))
            for i in starting:
                if self._children[i].conn in ready:
                    try:
                        self._on_message(i, _receive(self._children[i].conn))
                    except (EOFError, OSError, ValueError):
                        self._check_startup(i, float("inf"))

    def _send(self, index: int, message: Any) -> None:
        """Send to an idle child; one that died while idle is replaced (once) and sent to again."""
        try:
            self._children[index].conn.send(message)
        except OSError:
            self._replace(index)
            self._wait_ready()
            self._children[index].conn.send(message)

    def resolve(self, specs: Iterable[str]) -> dict[str, str]:
        """Import every spec in every child; return ``{spec: error}`` for those that failed.

        Specs that resolve are also pre-imported by every replacement child, so a slow user import is
        paid at start-up and not inside a graded request's timeout. An import taking longer than
        ``startup_timeout_s`` counts as a failure (and its child is replaced).
        """
        errors: dict[str, str] = {}
        for spec in dict.fromkeys(specs):
            self._wait_ready()
            for i in range(len(self._children)):
                self._send(i, ("resolve", 0, spec, "", ""))
                self._children[i].state = "busy"
                self._children[i].deadline = time.monotonic() + self.startup_timeout_s
            for i, child in enumerate(self._children):
                error = ""
                try:
                    if child.conn.poll(max(0.0, child.deadline - time.monotonic())):
                        error = str(_receive(child.conn)[2])
                        child.state = "idle"
                    else:
                        error = f"verifier {spec!r}: importing it took over {self.startup_timeout_s:.0f}s"
                        self._replace(i)
                except (EOFError, OSError, ValueError):
                    error = f"verifier {spec!r}: importing it killed the verifier process"
                    self._replace(i)
                if error:
                    errors.setdefault(spec, error)
            if spec not in errors:
                self._preload_specs = (*self._preload_specs, spec)
        self._wait_ready()
        return errors

    def run(self, jobs: Sequence[Job]) -> list[tuple[Outcome, float]]:
        """Run every job, ``num_procs`` at a time; return ``[(outcome, seconds)]`` in job order.

        A job not answered within ``timeout_s`` of being sent gets ``(0.0, False, "timeout", ...)``
        and its child is killed and replaced; a child that dies mid-job gives ``"error"``. Raises only
        SandboxStartError (a replacement child cannot start) or after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("VerifierSandbox.run called after close()")
        results: list[tuple[Outcome, float] | None] = [None] * len(jobs)
        pending = collections.deque(range(len(jobs)))
        children = self._children
        while True:
            # Hand out work to idle children.
            for i, child in enumerate(children):
                if child.state != "idle" or not pending:
                    continue
                job_index = pending.popleft()
                job = jobs[job_index]
                try:
                    child.conn.send(("grade", job_index, job.spec, job.completion, job.answer))
                except (BrokenPipeError, OSError):
                    # The child died while idle (e.g. the OOM killer): not this job's fault, retry it.
                    pending.appendleft(job_index)
                    self._replace(i)
                    continue
                child.state, child.job = "busy", job_index
                child.sent_at = time.monotonic()
                child.deadline = child.sent_at + self.timeout_s
            # Replacement children still starting matter only while work is waiting for them; once
            # the last result is in, return and let them finish starting in the background.
            active = [
                i for i, c in enumerate(children) if c.state == "busy" or (pending and c.state == "starting")
            ]
            if not active:
                if pending:
                    continue
                break
            now = time.monotonic()
            timeout = max(0.0, min(children[i].deadline for i in active) - now)
            waitables: list[Any] = []
            for i in active:
                waitables += children[i].waitables()
            ready = set(wait(waitables, timeout=timeout))
            now = time.monotonic()
            for i in active:
                child = children[i]
                if not any(w in ready for w in child.waitables()):
                    if child.state == "busy" and now >= child.deadline:
                        results[child.job] = (
                            (0.0, False, GRADE_TIMEOUT, f"verifier timed out after {self.timeout_s:g}s (killed)"),
                            now - child.sent_at,
                        )
                        self._replace(i)
                    elif child.state == "starting":
                        self._check_startup(i, now)
                    continue
                problem = ""
                outcome: Outcome | None = None
                try:
                    # The sentinel can fire with a last message still in the pipe: drain it first.
                    message = _receive(child.conn) if child.conn.poll() else None
                except (EOFError, OSError):
                    message = None
                except ValueError:
                    message, problem = None, _MALFORMED
                if child.state == "starting":
                    if message is None:
                        self._check_startup(i, float("inf"))
                    else:
                        self._on_message(i, message)
                    continue
                if message is not None:
                    outcome = _parse_result(message, child.job)
                    problem = "" if outcome is not None else _MALFORMED
                if outcome is not None:
                    results[child.job] = (outcome, now - child.sent_at)
                    child.state, child.job = "idle", None
                else:
                    # Dead, or talking nonsense (so no longer trusted): the job is an error either way.
                    detail = problem or child.exit_description()
                    results[child.job] = ((0.0, False, GRADE_ERROR, detail), now - child.sent_at)
                    self._replace(i)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"reward sandbox lost jobs {missing[:10]} (a bug: every job must get an outcome)")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Kill every child (idempotent)."""
        self._closed = True
        for child in self._children:
            child.kill()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: best effort only
            pass
