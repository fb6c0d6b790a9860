"""Test-only user verifier functions for the reward tests (allowed explicitly by the tests).

Each takes ``(completion, answer)`` like any user verifier. Some misbehave on purpose: they hang,
kill their process, crash the interpreter, or return values that are not rewards.
"""

from __future__ import annotations

import ctypes
import os
import time


def returns_bool(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def returns_float(completion: str, answer: str) -> float:
    return float(completion)


def returns_tuple(completion: str, answer: str) -> tuple[float, bool]:
    return 0.25, completion == answer


def returns_none(completion: str, answer: str) -> None:
    return None


def returns_nan(completion: str, answer: str) -> float:
    return float("nan")


def returns_inf(completion: str, answer: str) -> float:
    return float("inf")


def returns_str(completion: str, answer: str) -> str:
    return "1.0"


def returns_bad_tuple(completion: str, answer: str) -> tuple[float, str]:
    return 1.0, "yes"


def raises(completion: str, answer: str) -> bool:
    raise RuntimeError("verifier exploded " + "x" * 5000)


def calls_sys_exit(completion: str, answer: str) -> bool:
    raise SystemExit(3)


def sleep_forever(completion: str, answer: str) -> bool:
    while True:
        time.sleep(3600)


def busy_forever(completion: str, answer: str) -> bool:
    while True:  # a pure-Python hang, like a pathological sympy simplification
        pass


def sleep_if_asked(completion: str, answer: str) -> bool:
    if completion == "hang":
        while True:
            time.sleep(3600)
    return completion == answer


def exits(completion: str, answer: str) -> bool:
    os._exit(1)


def segfaults(completion: str, answer: str) -> bool:
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return True


def allocates(completion: str, answer: str) -> bool:
    blob = bytearray(int(completion) * 1024 * 1024)  # MiB: over the memory cap -> MemoryError
    return len(blob) > 0


not_callable = 42


def forges_reply(completion: str, answer: str) -> bool:
    """Writes its own message on the sandbox socket (argv[1]): a pickle, or a result for another job."""
    import pickle
    import sys
    from multiprocessing.connection import Connection

    conn = Connection(int(sys.argv[1]))
    if completion == "pickle":
        conn.send_bytes(pickle.dumps(("result", 0, (1.0, True, "ok", ""))))
    else:
        conn.send_bytes(b'["result", 123456, [1.0, true, "ok", ""]]')
    while True:
        time.sleep(3600)


# ---- adversarial functions for the sandbox tests (test_rewards_sandbox.py, the adversarial suite) ----


def returns_yes(completion: str, answer: str) -> str:
    return "yes"


def fork_bomb(completion: str, answer: str) -> bool:
    while True:
        os.fork()


def libc_fork(completion: str, answer: str) -> tuple[float, bool]:
    """fork() straight through libc, past the Python-level guards: only seccomp stops it.

    Returns (errno, False) when refused; a child, if one were ever created, exits at once.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.fork()
    if pid == 0:
        os._exit(0)
    return float(ctypes.get_errno() if pid < 0 else -pid), False


def opens_socket(completion: str, answer: str) -> bool:
    """Connects to 127.0.0.1:<completion> (a port the test listens on)."""
    import socket

    with socket.create_connection(("127.0.0.1", int(completion)), timeout=2):
        return True


def opens_raw_socket(completion: str, answer: str) -> bool:
    """The same through the C module, past any patched ``socket.socket``."""
    import _socket

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.connect(("127.0.0.1", int(completion)))
    return True


def libc_socket(completion: str, answer: str) -> tuple[float, bool]:
    """socket(AF_INET, SOCK_STREAM) through libc: returns (errno, False) when refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(2, 1, 0)
    if fd >= 0:
        os.close(fd)
        return 0.0, True
    return float(ctypes.get_errno()), False


def reads_passwd(completion: str, answer: str) -> bool:
    with open("/etc/passwd") as f:
        return "root" in f.read()


def reads_passwd_quietly(completion: str, answer: str) -> bool:
    """Swallows the refusal and claims success: still graded error."""
    try:
        with open("/etc/passwd") as f:
            f.read()
    except PermissionError:
        pass
    return True


def writes_big_file(completion: str, answer: str) -> bool:
    """Writes <completion> MiB into the scratch dir (RLIMIT_FSIZE stops it past the cap)."""
    with open("big.bin", "wb") as f:
        f.write(b"\0" * (int(completion) * 1024 * 1024))
    return True


def in_scratch_dir(completion: str, answer: str) -> bool:
    """True when cwd, HOME and the temp dir are the same fresh per-child scratch directory."""
    import tempfile

    cwd = os.getcwd()
    return (
        os.path.basename(cwd).startswith("rlsys-verifier-")
        and os.environ.get("HOME") == cwd
        and tempfile.gettempdir() == cwd
        and os.listdir(cwd) == []
    )


def cpu_limited(completion: str, answer: str) -> bool:
    """True when this job runs under a finite RLIMIT_CPU (the backstop)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_CPU)
    return soft != resource.RLIM_INFINITY


def huge_reply(completion: str, answer: str) -> bool:
    """Writes a 1 MiB message on the sandbox socket (argv[1]) ahead of the real reply."""
    import sys
    from multiprocessing.connection import Connection

    Connection(int(sys.argv[1])).send_bytes(b"[" + b" " * (1 << 20) + b"]")
    while True:
        time.sleep(3600)


def runs_code(completion: str, answer: str) -> bool:
    """A code-execution verifier: runs the completion as code against ``answer`` as tests."""
    from rlsys.rewards.code_exec import run_code
    from rlsys.rewards.verifiers import GradeFailure

    passed, status, detail = run_code(completion, answer, timeout_s=5.0, memory_mb=256)
    if status != "ok":
        raise GradeFailure(status, detail)
    return passed
