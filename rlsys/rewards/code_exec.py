"""Code-execution rewards: run model-written Python against tests in an isolated process.

:func:`run_code` ``(code, tests, timeout_s, memory_mb) -> (passed, status, detail)`` executes
``code`` and then ``tests`` (Python source whose assertions decide the verdict) in a fresh
``python -I -S -B`` *runner* process and never raises for anything the code does. ``status`` is one of
the grade statuses of :mod:`rlsys.records`:

* ``ok``: the run finished; ``passed`` says whether the tests passed. A wrong answer (an assertion
  or any other exception raised by the code or the tests) is ``(False, "ok", "failed: ...")``.
* ``timeout``: the runner did not finish within ``timeout_s`` of wall-clock time and was killed.
* ``error``: the code tripped the sandbox (fork, exec, socket, ctypes, a file outside its scratch
  directory, ...), ran out of memory, or the runner died or exited before finishing its tests
  (``os._exit``, a signal, the CPU-time backstop).
* ``invalid``: the code is larger than :data:`MAX_CODE_CHARS`, or the runner wrote more than
  :data:`MAX_REPORT_BYTES` to its report channel.

Who spawns the runner. The verifier children of :mod:`rlsys.rewards.sandbox` forbid process creation
(in Python and, where seccomp is available, in the kernel), so they cannot start a runner
themselves. Instead each child starts one *launcher* (this file run as a script) while it still may,
before it hardens itself; the launcher runs no untrusted code, receives run requests over a socket
pair, spawns one runner per request, enforces the wall-clock timeout and the output cap, kills the
runner's process group and removes its scratch directory. Outside a sandbox child (the driver, a
test) :func:`run_code` does the launcher's work in-process. The launcher shares the verifier child's
process group, so the grader's kill of a child kills its launcher too; runners get SIGKILL from the
kernel when their launcher dies (PR_SET_PDEATHSIG).

Threat model (model-written code is adversarial; the runner assumes nothing about it):

* Hard walls, enforced by the kernel: the wall-clock kill of the runner's process group; rlimits
  (address space ``memory_mb``, CPU seconds as a backstop, a 16 MiB cap on any file it writes, no
  core dumps, a few file descriptors); on x86-64 Linux a seccomp filter that makes fork, vfork, clone
  of anything but a thread, execve, socket creation, ptrace, signals to other processes, namespace
  and mount changes, module loading, bpf and io_uring fail with an errno; and, when running as root,
  a private network namespace (only a down loopback). RLIMIT_NPROC is set too but the kernel ignores
  it for root, which is why fork is also blocked by seccomp and by the audit hook.
* A tripwire, not a jail: an audit hook (:func:`sys.addaudithook`) installed before the code is
  compiled. It ends the runner (an ``error`` grade naming the event) on process creation, sockets,
  ctypes, signals to other processes, raising rlimits, debuggers/tracers, gc introspection, opening
  or listing paths outside the scratch directory (the interpreter's standard library is readable,
  not writable), ``..`` in paths, and links; and it refuses frame introspection
  (``sys._getframe``, ``tb_frame``/``gi_frame``/...) with the exceptions the standard library
  expects there. The hook and the runner's own steps after the code starts use only names bound
  before it started, and resolve paths with C-level ``posix`` calls, so patching builtins, ``os``,
  ``os.path`` or this module does not switch them off; a path that reaches an audited call as
  anything but an exact ``str``/``bytes`` is refused. Audit hooks see only what CPython audits: a
  memory-corruption bug in CPython or in a C extension gets past them, and files opened by C code
  are not checked (there is no chroot). The runner's environment is stripped and its stdin is
  /dev/null: it inherits nothing secret from the grader.
* The verdict: the runner's main thread holds a random per-run token and waits while the code and
  the tests run in a second thread started with ``_thread`` (no Python frame of the runner is
  above them); only after the tests return does the main thread write ``<token> pass``. Code cannot
  read the token without frame or gc introspection (refused), ``/proc/self/mem`` (outside its
  scratch) or ctypes (refused), so ``os._exit(0)``, printing "passed" or forging the report does not
  pass. The tests see the names the code defined, minus any that would shadow a builtin, and run
  with a private copy of the original builtins, so ``type``/``isinstance`` in them are the real
  ones. Whether the tests themselves are strict enough (exact types, ``__eq__`` overrides) is the
  task's business: see ``rlsys.tasks.pyfunc``.

This module imports only the standard library at import time: it is also the launcher and the
runner script (``python -I -S -B code_exec.py --launcher|--runner ...``).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from typing import Any

# Grade statuses (equal to rlsys.records.GRADE_*; not imported, so the runner needs no third-party code).
OK, TIMEOUT, ERROR, INVALID = "ok", "timeout", "error", "invalid"

MAX_CODE_CHARS = 256 * 1024  # code + tests; the grader already caps completions lower
MAX_REPORT_BYTES = 64 * 1024  # what the launcher reads from a runner before calling it "invalid"
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: no single file written larger than this
MAX_DETAIL_CHARS = 300
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MEMORY_MB = 256
# Inside a sandbox child a run must end this long before the child's own job deadline, so that the
# verifier can still report "timeout" itself instead of being killed (and its process replaced).
JOB_DEADLINE_RESERVE_S = 0.25
_VIOLATION_EXIT = 87  # runner exit status after the audit hook caught a forbidden operation
_MAX_OPENS_FOR_WRITE = 64  # files a run may open for writing (disk-filling tripwire)
_MAX_FRAME_BYTES = 8 * 1024 * 1024  # a launcher request: MAX_CODE_CHARS of JSON-escaped text fits

# ---------------------------------------------------------------------------------------------------
# Kernel-level isolation helpers (Linux; each returns False where unavailable instead of raising).

_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWNET = 0x40000000
_CLONE_THREAD = 0x00010000
_AF_UNIX = 1
_AUDIT_ARCH_X86_64 = 0xC000003E
# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl). Other architectures get no
# seccomp filter (the Python-level guards and the audit hook still apply): numbers we cannot test
# here are not worth the risk of a filter that breaks the interpreter.
_X86_64 = {
    "socket": 41,
    "socketpair": 53,
    "clone": 56,
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "kill": 62,
    "ptrace": 101,
    "pivot_root": 155,
    "chroot": 161,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "tkill": 200,
    "tgkill": 234,
    "kexec_load": 246,
    "unshare": 272,
    "perf_event_open": 298,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "execveat": 322,
    "io_uring_setup": 425,
    "clone3": 435,
}
_EPERM, _EACCES, _ENOSYS = 1, 13, 38
_DENIED_SYSCALLS = (
    "fork",
    "vfork",
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "tkill",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "reboot",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "swapon",
    "swapoff",
    "io_uring_setup",  # io_uring can open sockets/files behind seccomp's back
)


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int = 0) -> bool:
    import ctypes

    # prctl is variadic: pass full-width longs, or the kernel may see garbage in the upper bits.
    args = (ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return _libc().prctl(ctypes.c_int(option), *args) == 0


def set_parent_death_signal(expected_parent: int) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent is already gone."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's explicit kills still apply
    if os.getppid() != expected_parent:  # died before the prctl: the signal will never come
        os._exit(1)


def unshare_network() -> bool:
    """Move this process into a fresh network namespace (root only): no interface but a down loopback.

    Must run while the process has one thread. Returns False (and changes nothing) where that is
    not permitted (not root, no CAP_SYS_ADMIN, a container that forbids it) or not Linux.
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    try:
        return _libc().unshare(_CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _seccomp_program(allow_unix_sockets: bool, own_pid: int) -> bytes:
    """Assemble the classic-BPF seccomp filter described in the module docstring (x86-64)."""
    ld_abs, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS

    def errno(e: int) -> int:
        return 0x00050000 | e  # SECCOMP_RET_ERRNO

    nr_offset, arch_offset, arg0_offset = 0, 4, 16  # struct seccomp_data; arg0's low word (LE)
    prog = [
        _bpf(ld_abs, 0, 0, arch_offset),
        _bpf(jeq, 1, 0, _AUDIT_ARCH_X86_64),
        _bpf(ret, 0, 0, kill),  # another ABI (i386 via int 0x80): no way around the filter
        _bpf(ld_abs, 0, 0, nr_offset),
        _bpf(jge, 0, 1, 0x40000000),
        _bpf(ret, 0, 0, errno(_EPERM)),  # the x32 ABI: same numbers with a high bit, refused whole
    ]

    def rule(name: str, body: list[bytes]) -> None:
        # if nr == name: run body (which always returns); else skip over it
        prog.append(_bpf(jeq, 0, len(body), _X86_64[name]))
        prog.extend(body)

    def arg0_is(value: int, then: int, otherwise: int) -> list[bytes]:
        return [
            _bpf(ld_abs, 0, 0, arg0_offset),
            _bpf(jeq, 0, 1, value),
            _bpf(ret, 0, 0, then),
            _bpf(ret, 0, 0, otherwise),
        ]

    for name in _DENIED_SYSCALLS:
        rule(name, [_bpf(ret, 0, 0, errno(_EPERM))])
    rule("clone3", [_bpf(ret, 0, 0, errno(_ENOSYS))])  # glibc then falls back to clone(2) for threads
    rule(
        "clone",  # threads only: a clone without CLONE_THREAD is a new process
        [
            _bpf(ld_abs, 0, 0, arg0_offset),
            _bpf(jset, 0, 1, _CLONE_THREAD),
            _bpf(ret, 0, 0, allow),
            _bpf(ret, 0, 0, errno(_EPERM)),
        ],
    )
    rule("kill", arg0_is(own_pid, allow, errno(_EPERM)))  # signals to itself only (abort, raise)
    rule("tgkill", arg0_is(own_pid, allow, errno(_EPERM)))
    if allow_unix_sockets:
        rule("socket", arg0_is(_AF_UNIX, allow, errno(_EACCES)))
    else:
        rule("socket", [_bpf(ret, 0, 0, errno(_EACCES))])
        rule("socketpair", [_bpf(ret, 0, 0, errno(_EACCES))])
    prog.append(_bpf(ret, 0, 0, allow))
    return b"".join(prog)


def install_seccomp(allow_unix_sockets: bool) -> bool:
    """Install the seccomp filter on this process (x86-64 Linux only); False where unavailable.

    Applies to the calling thread and every thread or process it creates afterwards: call it while
    the process has one thread. Irreversible. ``allow_unix_sockets`` keeps ``socket(AF_UNIX, ...)``
    working (a verifier child); otherwise no socket can be created at all (a code runner).
    """
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return False
    try:
        import ctypes

        program = _seccomp_program(allow_unix_sockets, os.getpid())
        buf = ctypes.create_string_buffer(program, len(program))

        class _Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = _Fprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
        if not _prctl(_PR_SET_NO_NEW_PRIVS, 1):
            return False
        libc = _libc()
        zero = ctypes.c_ulong(0)
        mode = ctypes.c_ulong(_SECCOMP_MODE_FILTER)
        return libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), mode, ctypes.byref(fprog), zero, zero) == 0
    except (OSError, AttributeError, ValueError):
        return False


def _user_task_ceiling(headroom: int) -> int:
    """An RLIMIT_NPROC value: every task on the machine now (an upper bound of ours) + ``headroom``.

    RLIMIT_NPROC counts all threads of the real user, other processes' included, so an absolute cap
    would break a busy non-root host; this one still stops a fork bomb after ``headroom`` forks.
    """
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[1]) + headroom
    except (OSError, ValueError, IndexError):
        return 4096 + headroom


def _set_limit(name: str, soft: int, hard: int | None = None) -> None:
    import resource

    which = getattr(resource, name, None)
    if which is None:
        return
    try:
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass  # above an inherited hard limit: the inherited, lower limit stays


# ---------------------------------------------------------------------------------------------------
# Framing for the launcher socket: 4-byte big-endian length + JSON.


def _send_frame(fd: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack("!I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def _recv_exact(fd: int, n: int, deadline: float | None) -> bytes:
    import select

    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("no reply")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError("peer closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_frame(fd: int, deadline: float | None = None) -> Any:
    (size,) = struct.unpack("!I", _recv_exact(fd, 4, deadline))
    if size > _MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes")
    return json.loads(_recv_exact(fd, size, deadline))


# ---------------------------------------------------------------------------------------------------
# The grader side of a run: spawn a runner, feed it, time it, read its report, clean up.


def _truncate(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _execute(code: str, tests: str, timeout_s: float, memory_mb: int, *, in_private_netns: bool) -> dict[str, Any]:
    """Run one request in a fresh runner; return ``{"passed", "status", "detail", "seconds"}``."""
    import secrets
    import select
    import shutil
    import subprocess
    import tempfile

    start = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="rlsys-code-")
    token = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    proc = None

    def result(passed: bool, status: str, detail: str) -> dict[str, Any]:
        return {"passed": passed, "status": status, "detail": _truncate(detail), "seconds": time.monotonic() - start}

    try:
        request = {
            "token": token,
            "code": code,
            "tests": tests,
            "memory_mb": int(memory_mb),
            "cpu_s": max(1, int(timeout_s) + 1),
            "unshare_net": not in_private_netns,
            "parent": os.getpid(),
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--runner", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=[write_fd],
                cwd=scratch,
                env=env,
                start_new_session=True,  # its own process group: one killpg reaches anything it started
            )
        except OSError as exc:
            return result(False, ERROR, f"could not start the code process: {exc}")
        finally:
            os.close(write_fd)
        deadline = start + timeout_s
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
        except OSError:
            pass  # it died at once: reported below from its exit status
        data = b""
        timed_out = overflow = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not select.select([read_fd], [], [], remaining)[0]:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break  # every writer gone: the runner exited
            data += chunk
            if len(data) > MAX_REPORT_BYTES:
                overflow = True
                break
        if timed_out or overflow:
            _killpg(proc)
        try:
            code_ = proc.wait(timeout=max(0.5, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its report pipe but lingers: treat as a hang
            _killpg(proc)
            code_ = proc.wait()
            timed_out = True
        if overflow:
            detail = f"the code wrote over {MAX_REPORT_BYTES} bytes to its report channel (killed)"
            return result(False, INVALID, detail)
        if timed_out:
            return result(False, TIMEOUT, f"code timed out after {timeout_s:.3g}s (killed)")
        return _interpret(data, token, code_, result)
    finally:
        if proc is not None:
            _killpg(proc)  # anything it left behind in its group
            if proc.poll() is None:
                proc.wait()
        os.close(read_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def _killpg(proc: Any) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _interpret(data: bytes, token: str, exit_code: int, result: Any) -> dict[str, Any]:
    """Turn a finished runner's report and exit status into a result."""
    lines = data.decode("utf-8", "replace").split("\n")
    for line in lines:
        if line.startswith(token + " "):
            verdict, _, detail = line[len(token) + 1 :].partition(" ")
            if verdict == "pass" and exit_code == 0:
                return result(True, OK, "")
            if verdict == "fail":
                return result(False, OK, f"failed: {detail}")
            if verdict == "memory":
                return result(False, ERROR, f"memory limit: {detail}")
    if exit_code == _VIOLATION_EXIT:
        for line in lines:
            if line.startswith("!violation "):
                return result(False, ERROR, f"sandbox violation: {line[len('!violation ') :]}")
    for line in lines:
        if line.startswith("!setup "):
            return result(False, ERROR, f"code process set-up failed: {line[len('!setup ') :]}")
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return result(False, ERROR, f"code process died ({name})")
    return result(False, ERROR, f"code process exited with code {exit_code} before finishing its tests")


# ---------------------------------------------------------------------------------------------------
# The verifier-child side: the launcher it started, and the deadline of its current job.

_launcher: dict[str, Any] = {}  # {"fd": socket fd or None once broken, "proc": Popen} in a sandbox child
_job_deadline: float | None = None


def start_launcher(in_private_netns: bool) -> bool:
    """Start this process's launcher (a sandbox child calls it before forbidding process creation).

    The launcher inherits the caller's working directory (the child's scratch directory, under which
    each run gets its own), network namespace and process group; ``in_private_netns`` says whether
    that namespace is already a private one (then runners need not create their own). Returns False
    if it cannot start, in which case :func:`run_code` falls back to spawning runners itself (which
    a hardened child cannot: those runs then end as ``error``).
    """
    import socket
    import subprocess

    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-B",
                os.path.abspath(__file__),
                "--launcher",
                str(theirs.fileno()),
                str(os.getpid()),
                "netns" if in_private_netns else "shared-net",
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": os.getcwd(), "HOME": os.getcwd()},
        )
    except OSError:
        ours.close()
        return False
    finally:
        theirs.close()
    _launcher.update(fd=ours.detach(), pid=proc.pid, proc=proc)
    return True


def launcher_alive() -> bool:
    """False once this process's launcher has died (a hardened child cannot start another)."""
    return bool(_launcher) and _launcher.get("fd") is not None


def set_job_deadline(deadline: float | None) -> None:
    """Set (or clear) the monotonic time by which the current sandbox job must have answered."""
    global _job_deadline
    _job_deadline = deadline


def run_code(
    code: str, tests: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> tuple[bool, str, str]:
    """Run ``code`` then ``tests`` in an isolated runner; return ``(passed, status, detail)``.

    Never raises for anything the code does (see the module docstring for statuses and the
    isolation). ``timeout_s`` is the wall-clock limit of the whole run, interpreter start included;
    inside a sandbox job it is shortened to end :data:`JOB_DEADLINE_RESERVE_S` before the job's own
    deadline. ``memory_mb`` caps the runner's address space. Raises TypeError/ValueError only for
    arguments of the wrong type or a non-positive limit (a caller bug).
    """
    if not isinstance(code, str) or not isinstance(tests, str):
        raise TypeError("run_code: code and tests must be str")
    if not timeout_s > 0 or not memory_mb > 0:
        raise ValueError(f"run_code: timeout_s and memory_mb must be > 0, got {timeout_s}, {memory_mb}")
    if len(code) + len(tests) > MAX_CODE_CHARS:
        return False, INVALID, f"code and tests have {len(code) + len(tests)} chars, over the {MAX_CODE_CHARS} limit"
    if "\x00" in code or "\x00" in tests:
        return False, INVALID, "code contains a NUL character"
    if _job_deadline is not None:
        timeout_s = min(timeout_s, _job_deadline - JOB_DEADLINE_RESERVE_S - time.monotonic())
        if timeout_s <= 0.05:
            return False, TIMEOUT, "no time left in this verifier job to run the code"
    if not _launcher:
        out = _execute(code, tests, timeout_s, memory_mb, in_private_netns=False)
        return bool(out["passed"]), str(out["status"]), str(out["detail"])
    fd = _launcher.get("fd")
    if fd is None:
        return False, ERROR, "the code launcher of this verifier process died earlier"
    request = {"code": code, "tests": tests, "timeout_s": timeout_s, "memory_mb": int(memory_mb)}
    try:
        _send_frame(fd, request)
        # The launcher enforces timeout_s itself; this wait is a backstop against a stuck launcher.
        out = _recv_frame(fd, time.monotonic() + timeout_s + 5.0)
        return bool(out["passed"]), str(out["status"]), str(out["detail"])
    except (OSError, EOFError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        # The conversation is broken (a reply may still arrive later): never reuse this launcher.
        _launcher["fd"] = None
        try:
            os.close(fd)
        except OSError:
            pass
        return False, ERROR, f"the code launcher failed: {type(exc).__name__}"


def _launcher_main(fd: int, parent: int, in_private_netns: bool) -> None:
    """Serve run requests from the sandbox child on socket ``fd`` until it closes."""
    set_parent_death_signal(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            request = _recv_frame(fd)
        except (EOFError, OSError, ValueError):
            os._exit(0)
        try:
            out = _execute(
                str(request["code"]),
                str(request["tests"]),
                float(request["timeout_s"]),
                int(request["memory_mb"]),
                in_private_netns=in_private_netns,
            )
        except Exception as exc:  # noqa: BLE001 - report any launcher-side failure as this run's error
            out = {"passed": False, "status": ERROR, "detail": _truncate(f"launcher: {type(exc).__name__}: {exc}")}
        try:
            _send_frame(fd, out)
        except OSError:
            os._exit(0)


# ---------------------------------------------------------------------------------------------------
# The runner: everything below runs in the isolated process, in this order: read the request, limits,
# kernel isolation, audit hook, then the code in a second thread.

# Modules whose import (after the hook) ends the run: raw process creation, sockets, ctypes, shared
# memory, interpreter test hooks that can read and write arbitrary memory.
_DENIED_IMPORTS = frozenset(
    {
        "_posixsubprocess",
        "_ctypes",
        "ctypes",
        "_socket",
        "socket",
        "_multiprocessing",
        "_posixshmem",
        "mmap",
        "_ssl",
        "readline",
    }
)
_DENIED_IMPORT_PREFIXES = ("_test", "_xx", "_ctypes")
_DENIED_EVENTS = frozenset(
    {
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.spawn",
        "os.posix_spawn",
        "os.system",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "resource.setrlimit",
        "resource.prlimit",
        "sys.addaudithook",
        "sys._current_frames",
        "sys._current_exceptions",
        "sys.settrace",
        "sys.setprofile",
        "sys._settraceallthreads",
        "sys._setprofileallthreads",
        "os.symlink",
        "os.link",
        "builtins.breakpoint",
        "os.chroot",
    }
)
_DENIED_PREFIXES = (
    "socket.",
    "ctypes.",
    "mmap.",
    "gc.",
    "sqlite3.",
    "sys.monitoring",
    "urllib.",
    "http.",
    "ftplib.",
    "smtplib.",
    "poplib.",
    "imaplib.",
    "nntplib.",
    "telnetlib.",
    "webbrowser.",
    "winreg.",
    "_winapi.",
)
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_READ_EVENTS = frozenset({"os.listdir", "os.scandir"})
_WRITE_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.mkdir",
        "os.rename",
        "os.truncate",
        "os.chmod",
        "os.chown",
        "os.utime",
        "os.chflags",
        "os.lchflags",
        "os.setxattr",
        "os.removexattr",
        "os.getxattr",
        "os.listxattr",
        "os.mkfifo",
        "os.mknod",
        "os.chdir",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _make_audit_hook(scratch: str, read_roots: list[str], report_fd: int) -> Any:
    """The runner's audit hook (see the module docstring).

    It runs inside the untrusted process, so after it is installed it must not look anything up
    where the code could have patched it: every builtin, constant and function it uses is bound
    here, and paths are resolved with the C-level ``posix`` calls, not ``os.path`` (Python code
    whose helpers the code could replace). Paths must be exact ``str``/``bytes``: a PathLike's
    ``__fspath__`` could answer this check differently from the open that follows.
    """
    import _stat
    import posix

    write, exit_, lstat, stat, readlink, getcwd = (
        posix.write,
        posix._exit,
        posix.lstat,
        posix.stat,
        posix.readlink,
        posix.getcwd,
    )
    is_link, is_dir = _stat.S_ISLNK, _stat.S_ISDIR
    type_, str_, bytes_, int_, tuple_, len_, bool_ = type, str, bytes, int, tuple, len, bool
    reversed_, isinstance_ = reversed, isinstance
    os_error, value_error, attribute_error = OSError, ValueError, AttributeError
    denied_imports, denied_import_prefixes = _DENIED_IMPORTS, _DENIED_IMPORT_PREFIXES
    denied_events, denied_prefixes, frame_attributes = _DENIED_EVENTS, _DENIED_PREFIXES, _FRAME_ATTRIBUTES
    read_events, write_events, write_flags = _READ_EVENTS, _WRITE_EVENTS, _WRITE_FLAGS
    violation_exit, max_opens_for_write = _VIOLATION_EXIT, _MAX_OPENS_FOR_WRITE
    writable = (scratch, "/dev/null")
    readable = (scratch, "/dev/null", *read_roots, "/dev/urandom", "/dev/zero")
    opens_for_write = [0]

    def violation(what: str) -> None:
        try:
            write(report_fd, ("\n!violation " + what[:200].replace("\n", " ") + "\n").encode("utf-8", "replace"))
        finally:
            exit_(violation_exit)

    def inside(path: str, roots: tuple[str, ...]) -> bool:
        for root in roots:  # noqa: SIM110 - no any(): builtins are names user code can rebind
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def resolve(path: str) -> str:
        """The absolute path with every symlink followed (what the kernel will open)."""
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        pending = path.split("/")[::-1]
        resolved = ""
        hops = 0
        while pending:
            part = pending.pop()
            if part == "" or part == ".":
                continue
            if part == "..":  # only from a symlink's target: the code's own paths may not hold ".."
                resolved = resolved[: resolved.rfind("/")]
                continue
            candidate = resolved + "/" + part
            try:
                mode = lstat(candidate).st_mode
            except os_error:
                resolved = candidate  # does not exist (yet): the rest is taken literally
                continue
            if is_link(mode) and hops < 40:
                hops += 1
                target = readlink(candidate)
                if target.startswith("/"):
                    resolved = ""
                pending.extend(reversed_(target.split("/")))
            else:
                resolved = candidate
        return resolved or "/"

    def check_path(event: str, path: Any, for_write: bool) -> None:
        if path is None or type_(path) is int_:
            return  # the current directory (inside the scratch dir) or an already-open descriptor
        if type_(path) is bytes_:
            text = bytes_.decode(path, "utf-8", "surrogateescape")
        elif type_(path) is str_:
            text = path
        else:
            violation(f"{event}: a path given as {type_(path).__name__}, not str or bytes")
            return
        if ".." in text.split("/"):
            violation(f"{event}({text!r}): '..' in a path")
        resolved = resolve(text)
        if not inside(resolved, writable if for_write else readable):
            violation(f"{event}({text!r}{', write' if for_write else ''}): outside the scratch directory")
        if event == "open" and not inside(resolved, writable):
            try:
                directory = is_dir(stat(resolved).st_mode)
            except os_error:
                directory = False
            if directory:
                # A descriptor of a directory outside the scratch dir would let dir_fd-relative calls
                # (which the "open" event reports without their dir_fd) reach outside it.
                violation(f"open({text!r}): a directory outside the scratch directory")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = (tuple_(args) + (None, None, 0))[:3]
            for_write = (type_(flags) is int_ and flags & write_flags) or (
                type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            )
            check_path(event, path, bool_(for_write))
            if for_write:
                opens_for_write[0] += 1
                if opens_for_write[0] > max_opens_for_write:
                    violation(f"over {max_opens_for_write} files opened for writing")
        elif event == "import":
            name = args[0] if len_(args) else ""
            name = str_.__str__(name) if isinstance_(name, str_) else ""  # an exact copy, not a subclass
            if name in denied_imports or name.startswith(denied_import_prefixes):
                violation(f"import {name}")
        elif event == "sys._getframe":
            raise value_error("call stack is not inspectable in the code sandbox")
        elif event == "object.__getattr__":
            if len_(args) > 1 and type_(args[1]) is str_ and args[1] in frame_attributes:
                raise attribute_error(f"{args[1]} is not accessible in the code sandbox")
        elif event in denied_events or event.startswith(denied_prefixes):
            violation(event)
        elif event in read_events:
            check_path(event, args[0] if len_(args) else None, False)
        elif event in write_events:
            for arg in args[:2] if event == "os.rename" else args[:1]:
                check_path(event, arg, True)

    return hook


def _runner_main(report_fd: int) -> None:
    """Set up the isolation, run the code and the tests, report. Never returns.

    Everything used after the code starts is bound beforehand (see :func:`_make_audit_hook`).
    """
    import _thread
    import builtins

    exit_, write = os._exit, os.write
    try:
        request = json.loads(sys.stdin.buffer.read())
        token = str(request["token"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the request (and its token) is gone from stdin; nothing else comes in
        os.close(null)
        set_parent_death_signal(int(request["parent"]))
        _set_limit("RLIMIT_CORE", 0)
        _set_limit("RLIMIT_FSIZE", MAX_FILE_BYTES)
        _set_limit("RLIMIT_NOFILE", 64)
        _set_limit("RLIMIT_CPU", int(request["cpu_s"]), int(request["cpu_s"]) + 1)
        _set_limit("RLIMIT_NPROC", _user_task_ceiling(16))
        _set_limit("RLIMIT_AS", int(request["memory_mb"]) * 1024 * 1024)
        if request.get("unshare_net"):
            unshare_network()
        install_seccomp(allow_unix_sockets=False)
        # ctypes served the set-up above; drop it so the code cannot reuse the loaded module.
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
            del sys.modules[name]
        scratch = os.path.realpath(os.getcwd())
        read_roots = [os.path.realpath(p) for p in sys.path if p]  # the standard library (-I -S)
        code_src = request["code"]
        tests_src = request["tests"]
        del request
        saved_builtins = dict(builtins.__dict__)
        hook = _make_audit_hook(scratch, read_roots, report_fd)
    except BaseException as exc:  # noqa: BLE001 - set-up failure: the launcher reports the exit code
        try:
            write(report_fd, f"\n!setup {type(exc).__name__}: {exc}\n".encode())
        finally:
            exit_(3)

    type_, str_, dict_, compile_, exec_ = type, str, dict, compile, exec
    memory_error, base_exception, max_chars = MemoryError, BaseException, MAX_DETAIL_CHARS
    outcome: dict[str, Any] = {}
    done = _thread.allocate_lock()
    done.acquire()

    def describe(exc: BaseException) -> str:
        try:
            text = type_(exc).__name__ + ": " + str_(exc)
        except base_exception:  # a hostile __str__ / __name__
            text = "an exception"
        if type_(text) is not str_:
            text = "an exception"
        return text[:max_chars].replace("\n", " ")

    def work() -> None:
        # Runs in a thread started by _thread: no runner frame lies above the code's frames.
        try:
            namespace = {"__name__": "__main__", "__builtins__": builtins}
            exec_(compile_(code_src, "<answer>", "exec"), namespace)
            visible = {
                k: v
                for k, v in dict_(namespace).items()
                if type_(k) is str_ and not k.startswith("__") and k not in saved_builtins
            }
            # The tests get a private copy of the original builtins: a patched builtins module (or a
            # thread of the code that keeps patching it) cannot change what the tests call.
            visible["__name__"] = "__main__"
            visible["__builtins__"] = dict_(saved_builtins)
            exec_(compile_(tests_src, "<tests>", "exec"), visible)
            outcome["verdict"] = "pass"
        except memory_error as exc:
            outcome["verdict"], outcome["detail"] = "memory", describe(exc)
        except base_exception as exc:  # anything the code or tests raise is a failed run
            outcome["verdict"], outcome["detail"] = "fail", describe(exc)
        finally:
            done.release()

    sys.addaudithook(hook)
    try:
        _thread.start_new_thread(work, ())
        done.acquire()
        verdict = outcome.get("verdict", "fail")
        detail = outcome.get("detail", "")
        if type_(verdict) is not str_ or type_(detail) is not str_:
            verdict, detail = "fail", "malformed outcome"
        write(report_fd, ("\n" + token + " " + verdict + " " + detail + "\n").encode("utf-8", "replace"))
    finally:
        exit_(0)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--runner":
        _runner_main(int(sys.argv[2]))
    elif len(sys.argv) >= 5 and sys.argv[1] == "--launcher":
        _launcher_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "netns")
    else:
        sys.exit("usage: code_exec.py --runner REPORT_FD | --launcher SOCKET_FD PARENT_PID netns|shared-net")
