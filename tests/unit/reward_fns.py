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
