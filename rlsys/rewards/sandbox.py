"""Out-of-process verifier execution with hard wall-clock timeouts and an isolated child.

Why processes: math-verify/sympy can hang (or blow up memory) on pathological answers, user
verifiers can hang or crash the interpreter, and ``signal.alarm`` timeouts only work on a process's
main thread -- not inside a Ray actor's worker threads. So each verifier runs in a persistent child
process that the parent SIGKILLs (with its whole process group) when it overruns, then replaces.

Children are started with ``subprocess`` (fork+exec of a fresh interpreter, safe from a parent
with Ray/torch threads, unlike a bare ``fork``) rather than ``multiprocessing``'s spawn, which would
re-import the driver's ``__main__`` in every child. Each child runs in its own session (so a kill
reaches any grandchildren), hardens itself in :func:`_harden_child`, imports the verifiers once
(math-verify's import and first parse are slow), then serves one request at a time over a socket.

What a child is allowed (the threat model). Built-in verifiers parse model output; user verifier
functions are code the operator allow-listed, so they are trusted not to be malicious but not to be
correct: they may hang, crash, leak, or be fed a completion crafted to make them misbehave.

* Hard walls (kernel-enforced): the parent's wall-clock SIGKILL of the child's process group; a
  fresh scratch directory per child as its working directory (``HOME``/``TMPDIR`` too), created and
  removed by the parent; RLIMIT_AS (``memory_limit_mb``), RLIMIT_FSIZE (no file written over
  ``max_file_mb``), RLIMIT_CORE 0, a per-job RLIMIT_CPU backstop (a child hung inside C code that
  holds the GIL still dies if its parent is gone); when running as root, a private network namespace
  (``unshare(CLONE_NEWNET)``: only a down loopback); on x86-64 Linux a seccomp filter (see
  :mod:`rlsys.rewards.code_exec`) that makes fork/exec, Internet sockets, ptrace, signals to other
  processes and namespace/mount changes fail. RLIMIT_NPROC is set as well, but the kernel does not
  enforce it for root, which is why process creation is also refused by seccomp and in Python.
* Tripwires (Python-level; code running in the child can undo them): ``os.fork``/``forkpty``/
  ``system``/``exec*``/``spawn*``/``posix_spawn``, ``subprocess.Popen``, ``multiprocessing``
  process start and ``pty.spawn`` raise PermissionError; without a private network namespace
  ``socket.socket`` (non-Unix families), ``create_connection`` and ``getaddrinfo`` raise too; an
  audit hook refuses process creation, every socket operation, and opening or listing paths
  outside the scratch directory, ``sys.path``, ``base_dir``, the interpreter's prefixes and the
  directories of allow-listed verifier files (writes only inside the scratch directory). A job that
  trips any of them is graded ``error`` even if the verifier caught the exception. Reading files
  that the audit hook does not see (opened by C code) is not prevented: there is no chroot.
* Model-written code (code-execution rewards) never runs in the child: it goes through
  :func:`rlsys.rewards.code_exec.run_code`, whose runner processes are spawned by a launcher that
  the child starts before it forbids process creation.
* Replies: the child answers in JSON (the parent never unpickles child bytes); a reply over
  :data:`MAX_REPLY_BYTES` is graded ``invalid`` and the child replaced.

:class:`VerifierSandbox` is the parent side: ``run(jobs)`` spreads jobs over ``num_procs`` children
and returns one :data:`~rlsys.rewards.verifiers.Outcome` per job, in order, never raising for a bad
job: a timeout yields status ``timeout``, a dead child yields status ``error``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    job_timeout_s: float = 0.0  # the parent's per-job timeout (sizes the CPU backstop); 0 = unknown
    max_file_mb: int = 16  # RLIMIT_FSIZE of the child


@dataclass(frozen=True)
class Job:
    """One verification: run verifier ``spec`` on (``completion``, ``answer``)."""

    spec: str
    completion: str
    answer: str


# ---------------------------------------------------------------------------------------------------
# Wire format. The parent pickles to the child (it trusts itself); the child answers in JSON, so the
# parent never unpickles bytes that verifier code -- or a completion a verifier executes -- could forge.

# A real reply is a few hundred bytes (details are truncated in the child); anything bigger was
# written by verifier code on the socket and is not read.
MAX_REPLY_BYTES = 64 * 1024
_MALFORMED = "verifier process sent a malformed reply"
_OVERSIZED = f"verifier process sent a reply over the {MAX_REPLY_BYTES // 1024} KiB cap"


class _ReplyTooLarge(ValueError):
    """A child announced a reply over MAX_REPLY_BYTES (the stream is now out of step: replace it)."""


def _reply(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _receive(conn: Connection) -> list[Any]:
    """Read one child reply; raises EOFError/OSError if the child is gone, ValueError if garbled.

    A reply over MAX_REPLY_BYTES raises :class:`_ReplyTooLarge` (a ValueError) without being read.
    """
    try:
        data = conn.recv_bytes(MAX_REPLY_BYTES)
    except OSError as exc:
        if "bad message length" in str(exc):  # multiprocessing's wording for "over maxlength"
            raise _ReplyTooLarge(_OVERSIZED) from None
        raise
    message = json.loads(data)
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


_SPAWN_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen", "pty.spawn"}
)
_WRITE_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.truncate", "os.chmod", "os.chown"})
_OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Device files any Python library may open; reading them reveals nothing.
_DEVICE_FILES = ("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero")


class _ChildGuard:
    """The child's audit hook: refuses what the module docstring lists and remembers it per job.

    ``violations`` collects what was refused since the last :meth:`start_job`, so a verifier that
    catches the PermissionError still gets an ``error`` grade. ``allow_read`` adds a directory
    (an allow-listed verifier file's) to what may be read.
    """

    def __init__(self, scratch: str, read_roots: list[str]):
        self.scratch = os.path.realpath(scratch)
        self.read_roots = {os.path.realpath(p) for p in read_roots if p}
        self.violations: list[str] = []

    def allow_read(self, directory: str) -> None:
        self.read_roots.add(os.path.realpath(directory))

    def start_job(self) -> None:
        self.violations.clear()

    def _inside(self, path: str, write: bool) -> bool:
        roots = (self.scratch,) if write else (self.scratch, *self.read_roots)
        if path in _DEVICE_FILES:
            return True
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def _refuse(self, what: str) -> None:
        self.violations.append(what)
        raise PermissionError(f"reward sandbox: {what} is not allowed")

    def _check_path(self, event: str, path: Any, write: bool) -> None:
        if path is None or isinstance(path, int):
            return  # the working directory (the scratch dir) or an already-open descriptor
        try:
            resolved = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return  # not a path: the call itself will fail
        if not self._inside(resolved, write):
            shown = truncate(os.fsdecode(path), 100)
            self._refuse(f"{event}({shown!r}{', write' if write else ''}) outside the sandbox")

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            write = bool(
                (isinstance(flags, int) and flags & _OPEN_WRITE_FLAGS)
                or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            )
            self._check_path(event, path, write)
        elif event in _SPAWN_EVENTS:
            self._refuse(f"{event} (starting a process)")
        elif event.startswith("socket."):
            self._refuse(f"{event} (network)")
        elif event in ("os.listdir", "os.scandir"):
            self._check_path(event, args[0] if args else None, False)
        elif event in _WRITE_EVENTS:
            for arg in args[:2] if event == "os.rename" else args[:1]:
                self._check_path(event, arg, True)


def _refuse_call(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(f"reward sandbox: {what} is not allowed in a verifier")

    refused.__name__ = refused.__qualname__ = what.rpartition(".")[2]
    return refused


def _forbid_processes() -> None:
    """Replace the Python entry points that start processes with ones raising PermissionError."""
    import _posixsubprocess
    import multiprocessing.process
    import pty

    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp") + tuple(
        n for n in dir(os) if n.startswith(("exec", "spawn")) and callable(getattr(os, n))
    ):
        if hasattr(os, name):
            setattr(os, name, _refuse_call(f"os.{name}"))
    _posixsubprocess.fork_exec = _refuse_call("_posixsubprocess.fork_exec")

    class RefusedPopen(subprocess.Popen):  # a class still, so libraries may subclass it at import
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("reward sandbox: subprocess.Popen is not allowed in a verifier")

    subprocess.Popen = RefusedPopen  # type: ignore[misc]
    refused_start = _refuse_call("multiprocessing.Process.start")
    multiprocessing.process.BaseProcess.start = refused_start  # type: ignore[method-assign]
    pty.spawn = _refuse_call("pty.spawn")


def _forbid_sockets() -> None:
    """Without a private network namespace: make Python's socket entry points refuse the network."""

    class UnixOnlySocket(socket.socket):  # a class still, so libraries may subclass it at import
        def __init__(self, family: Any = -1, type: Any = -1, proto: Any = -1, fileno: Any = None) -> None:
            # Wrapping an existing descriptor (socketpair, accept) is fine; a new non-Unix socket is not.
            if fileno is None and family != socket.AF_UNIX:
                raise PermissionError("reward sandbox: network sockets are not allowed in a verifier")
            super().__init__(family, type, proto, fileno)

    socket.socket = UnixOnlySocket  # type: ignore[misc]
    names = ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr")
    for name in names:
        setattr(socket, name, _refuse_call(f"socket.{name}"))


def _harden_child(config: ChildConfig, scratch: str) -> dict[str, Any]:
    """Apply the child's isolation before any verifier code runs; return what is in effect.

    The parent already made the child a session leader (a kill of its process group reaches any
    grandchildren; a terminal's Ctrl-C does not reach it: the parent decides when it dies). Order
    matters: the network namespace and the code launcher come first (the launcher needs fork and
    inherits the namespace), then the limits, the Python guards and the audit hook, then seccomp
    (irreversible, and it must precede the first extra thread), then the parent watch thread.
    """
    import resource

    from rlsys.rewards import code_exec

    os.chdir(scratch)
    for var in ("HOME", "TMPDIR", "TMP", "TEMP"):
        os.environ[var] = scratch
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    netns = code_exec.unshare_network()
    launcher = code_exec.start_launcher(in_private_netns=netns)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config.max_file_mb:
        size = int(config.max_file_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    nproc = code_exec._user_task_ceiling(64)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    except (ValueError, OSError):
        pass  # an inherited hard limit below ours stays
    if config.memory_limit_mb:
        limit = int(config.memory_limit_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _forbid_processes()
    if not netns:
        _forbid_sockets()
    sys.dont_write_bytecode = True  # imports would try to write __pycache__ outside the scratch dir
    read_roots = [*config.sys_path, *sys.path, _PACKAGE_ROOT, config.base_dir]
    read_roots += [sys.prefix, sys.base_prefix, sys.exec_prefix]
    guard = _ChildGuard(scratch, [os.path.abspath(p) for p in read_roots if p])
    sys.addaudithook(guard)
    seccomp = code_exec.install_seccomp(allow_unix_sockets=True)
    _watch_parent(os.getppid(), scratch)
    return {"scratch": scratch, "netns": netns, "seccomp": seccomp, "launcher": launcher, "guard": guard}


def _set_cpu_backstop(job_timeout_s: float) -> None:
    """Let the next job use at most ~2x its wall-clock timeout (+5 s) of CPU before SIGXCPU.

    The parent's wall-clock kill normally comes first; this limit matters when the parent is gone
    and a verifier spins inside C code holding the GIL, where the watch thread cannot run.
    """
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    budget = math.ceil(2 * job_timeout_s + 5)
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(usage.ru_utime + usage.ru_stime) + budget
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass


def _watch_parent(parent_pid: int, scratch: str) -> None:
    """Exit this child (removing its scratch dir) as soon as its parent is gone, even mid-verifier.

    An idle child notices through EOF on its socket; a hung one would otherwise outlive a crashed
    parent forever. (PR_SET_PDEATHSIG is tied to the parent *thread*, which in a Ray actor may be a
    short-lived one, so poll instead.)
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                shutil.rmtree(scratch, ignore_errors=True)
                os._exit(1)

    threading.Thread(target=watch, name="rlsys-parent-watch", daemon=True).start()


def _child_main(fd: int) -> None:
    """Entry point of a sandbox child: set up, report "ready" (or "fatal"), then serve requests.

    Protocol over the socket ``fd``: the parent first sends (pickled) ``(config, preload_specs,
    scratch)``, then ``("grade", job_id, spec, completion, answer)``, ``("resolve", job_id, spec, "",
    "")`` or ``None`` (exit); the child answers (JSON) ``["ready", pid, isolation]`` or ``["fatal",
    detail]`` once, then ``["result", job_id, outcome]`` / ``["resolved", job_id, error_or_empty]``.
    ``isolation`` says which protections are in effect: ``{"netns", "seccomp", "launcher"}``.
    """
    conn = Connection(fd)
    resolved: dict[str, Any] = {}
    try:
        config, preload_specs, scratch = conn.recv()
        state = _harden_child(config, scratch)
        guard: _ChildGuard = state["guard"]
        if config.sys_path:
            sys.path[:] = list(config.sys_path)
        from rlsys.rewards import code_exec, verifiers

        verifiers.warm_up()
        for spec in preload_specs:
            try:
                resolved[spec] = _resolve(spec, config, guard)
            except ValueError:
                pass  # reported when a request uses it
        guard.start_job()  # start-up is not a job: what it tripped (if anything) is not charged to one
    except BaseException as exc:  # noqa: BLE001 - report any start-up failure to the parent
        try:
            _reply(conn, ("fatal", truncate(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, 500)))
        finally:
            return  # noqa: B012 - the parent may be gone; a start-up failure must end this child quietly
    isolation = {k: state[k] for k in ("netns", "seccomp", "launcher")}
    _reply(conn, ("ready", os.getpid(), isolation))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if message is None:
            return
        kind, job_id, spec, completion, answer = message
        started = time.monotonic()
        guard.start_job()
        fn = resolved.get(spec)
        error = ""
        if fn is None:
            try:
                fn = _resolve(spec, config, guard)
                resolved[spec] = fn
            except ValueError as exc:
                error = truncate(str(exc), 500)
        if kind == "resolve":
            _reply(conn, ("resolved", job_id, error))
            continue
        if error:
            _reply(conn, ("result", job_id, (0.0, False, GRADE_ERROR, truncate(error, config.max_detail_chars))))
            continue
        if config.job_timeout_s:
            _set_cpu_backstop(config.job_timeout_s)
            code_exec.set_job_deadline(started + config.job_timeout_s)
        assert fn is not None  # resolved above, or error is set and the job was answered
        outcome = verifiers.run_verifier(fn, completion, answer, config.success_threshold, config.max_detail_chars)
        if guard.violations:
            # Charged even when the verifier caught the PermissionError and returned a reward.
            detail = truncate("sandbox: " + guard.violations[0], config.max_detail_chars)
            outcome = (0.0, False, GRADE_ERROR, detail)
        _reply(conn, ("result", job_id, outcome))
        if state["launcher"] and not code_exec.launcher_alive():
            return  # this process can no longer run code (and cannot fork a new launcher): be replaced


def _resolve(spec: str, config: ChildConfig, guard: _ChildGuard) -> Any:
    """Resolve a verifier spec; an allow-listed verifier file's directory becomes readable first."""
    from rlsys.rewards import verifiers

    target = spec.rpartition(":")[0]
    if target.endswith(".py") and not verifiers.is_builtin(spec):
        verifiers.check_spec_allowed(spec, config.allowed_functions)
        path = target if os.path.isabs(target) else os.path.join(config.base_dir or os.getcwd(), target)
        guard.allow_read(os.path.dirname(os.path.abspath(path)))
    return verifiers.resolve_verifier(spec, config.allowed_functions, config.base_dir)


# ---------------------------------------------------------------------------------------------------
# Parent side.


class SandboxStartError(RuntimeError):
    """A sandbox child could not start (bad memory limit, broken environment): a config problem."""


class _Child:
    """Parent-side handle of one child process: its socket and what it is doing."""

    def __init__(self, config: ChildConfig, preload_specs: tuple[str, ...], startup_timeout_s: float):
        # Created here and removed in kill(): a child killed for a timeout cannot clean up after itself.
        self.scratch = tempfile.mkdtemp(prefix="rlsys-verifier-")
        self.isolation: dict[str, Any] = {}
        parent_sock, child_sock = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno()), _PACKAGE_ROOT],
                pass_fds=[child_sock.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: killpg reaches grandchildren too
                env={**os.environ, **_CHILD_ENV},
                cwd=self.scratch,
            )
        except BaseException:
            parent_sock.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
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
            self.conn.send((config, preload_specs, self.scratch))
        except OSError:
            pass  # died at once; the start-up check reports how

    def waitables(self) -> list[Any]:
        return [self.conn] if self.sentinel is None else [self.conn, self.sentinel]

    def kill(self) -> None:
        """SIGKILL the child and its process group (its code launcher too), reap it, remove its scratch dir."""
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
        shutil.rmtree(self.scratch, ignore_errors=True)

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
        # "" on sys.path means the working directory, which in a child is its scratch dir: pin it.
        sys_path = tuple(p or os.getcwd() for p in (base.sys_path or sys.path))
        self._config = ChildConfig(
            allowed_functions=tuple(base.allowed_functions),
            base_dir=base.base_dir or os.getcwd(),
            sys_path=sys_path,
            success_threshold=base.success_threshold,
            memory_limit_mb=base.memory_limit_mb,
            max_detail_chars=base.max_detail_chars,
            job_timeout_s=base.job_timeout_s or self.timeout_s,
            max_file_mb=base.max_file_mb,
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

    def isolation(self) -> list[dict[str, Any]]:
        """Per child: its pid, scratch dir, and whether netns / seccomp / a code launcher are in effect."""
        return [{"pid": c.process.pid, "scratch": c.scratch, **c.isolation} for c in self._children]

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
            if len(message) > 2 and isinstance(message[2], dict):
                child.isolation = {k: bool(v) for k, v in message[2].items()}
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
            active = [i for i, c in enumerate(children) if c.state == "busy" or (pending and c.state == "starting")]
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
                        assert child.job is not None  # a busy child holds a job
                        results[child.job] = (
                            (0.0, False, GRADE_TIMEOUT, f"verifier timed out after {self.timeout_s:g}s (killed)"),
                            now - child.sent_at,
                        )
                        self._replace(i)
                    elif child.state == "starting":
                        self._check_startup(i, now)
                    continue
                problem = ""
                status = GRADE_ERROR
                outcome: Outcome | None = None
                try:
                    # The sentinel can fire with a last message still in the pipe: drain it first.
                    message = _receive(child.conn) if child.conn.poll() else None
                except (EOFError, OSError):
                    message = None
                except _ReplyTooLarge:
                    message, problem, status = None, _OVERSIZED, GRADE_INVALID
                except ValueError:
                    message, problem = None, _MALFORMED
                if child.state == "starting":
                    if message is None:
                        self._check_startup(i, float("inf"))
                    else:
                        self._on_message(i, message)
                    continue
                slot = child.job  # active and not starting: busy, so it holds a job
                assert slot is not None
                if message is not None:
                    outcome = _parse_result(message, slot)
                    problem = "" if outcome is not None else _MALFORMED
                if outcome is not None:
                    results[slot] = (outcome, now - child.sent_at)
                    child.state, child.job = "idle", None
                else:
                    # Dead, or talking nonsense (so no longer trusted): the job is an error (or, for
                    # an oversized reply, invalid) either way.
                    detail = problem or child.exit_description()
                    results[slot] = ((0.0, False, status, detail), now - child.sent_at)
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
