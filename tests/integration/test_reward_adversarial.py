"""The adversarial suite: 1000 hostile samples through a RewardGrader, then through a RewardPool on Ray.

Every sample must get exactly one Grade with reward 0 and the status its kind calls for, counted in
the matching counter; the pool must stay alive (a correct answer still grades correct afterwards),
finish within a bound computed from what the samples cost, and leave no process or scratch dir
behind. Composition (``SUITE``): math-verify bombs (a power tower that hangs sympy, ``\\frac``
nested 500 deep), 5 MB completions and gold answers, code answers through the ``pyfunc`` code task
(an infinite loop, fork bombs, ``os._exit(3)``, sockets, ``/etc/passwd``, a report-channel flood),
and user verifier functions that raise, exit, hang, fork, connect, read ``/etc/passwd``, forge an
oversized reply, or return NaN / None / "yes".

Marked ``integration``: the Ray half starts a local cluster. Each half prints its measured time.
"""

from __future__ import annotations

import collections
import glob
import os
import random
import socket
import time
from collections.abc import Iterator

import psutil
import pytest

from rlsys.records import GRADE_ERROR, GRADE_INVALID, GRADE_OK, GRADE_TIMEOUT, Grade, GradeRequest
from rlsys.tasks import pyfunc

pytestmark = pytest.mark.integration

REWARD_FNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "reward_fns.py")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small, but not so small that a 30 ms code run counts as hung when other jobs share the cores: a
# code run gets the job's timeout minus code_exec.JOB_DEADLINE_RESERVE_S.
TIMEOUT_S = 2.0
PROCS = 2  # verifier processes per grader / per pool worker
FIVE_MB = "Answer: 1 " + "9" * (5 * 1024 * 1024)  # one object, shared by every sample using it
ROW = pyfunc.generate("train", 1, seed=0)[0]


def _fn(name: str) -> str:
    return f"{REWARD_FNS}:{name}"


def _code(body: str) -> str:
    return f"Here is my solution.\n```python\n{body}\n```"


# kind -> (count, completion, answer, verifier, expected status, restarts its child)
# ``{port}`` in a completion is replaced by the port of a listener the test watches.
SUITE: dict[str, tuple[int, str, str, str, str, bool]] = {
    "math: power tower": (5, r"\boxed{9^{9^{9^{9}}}}", "1", "math", GRADE_TIMEOUT, True),
    "math: \\frac nested 500 deep": (
        60,
        "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}",
        "1",
        "math",
        GRADE_INVALID,
        False,
    ),
    "5 MB completion": (60, FIVE_MB, "1", "math", GRADE_INVALID, False),
    "5 MB gold answer": (20, "Answer: 1", FIVE_MB, "exact", GRADE_INVALID, False),
    "code: while True: pass": (10, _code("while True:\n    pass"), ROW.answer, pyfunc.VERIFIER, GRADE_TIMEOUT, False),
    "code: fork bomb": (
        60,
        _code("import os\nwhile True:\n    os.fork()"),
        ROW.answer,
        pyfunc.VERIFIER,
        GRADE_ERROR,
        False,
    ),
    "code: os._exit(3)": (60, _code("import os\nos._exit(3)"), ROW.answer, pyfunc.VERIFIER, GRADE_ERROR, False),
    "code: socket": (
        50,
        _code("import socket\nsocket.create_connection(('127.0.0.1', {port}))"),
        ROW.answer,
        pyfunc.VERIFIER,
        GRADE_ERROR,
        False,
    ),
    "code: /etc/passwd": (
        50,
        _code("def f(x):\n    return len(open('/etc/passwd').read())"),
        ROW.answer,
        pyfunc.VERIFIER,
        GRADE_ERROR,
        False,
    ),
    "code: report flood": (
        20,
        _code(
            "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * 100000)\n"
            "    except OSError:\n        pass"
        ),
        ROW.answer,
        pyfunc.VERIFIER,
        GRADE_INVALID,
        False,
    ),
    "fn: raises": (100, "1", "1", _fn("raises"), GRADE_ERROR, False),
    "fn: sys.exit": (30, "1", "1", _fn("calls_sys_exit"), GRADE_ERROR, False),
    "fn: returns NaN": (100, "1", "1", _fn("returns_nan"), GRADE_INVALID, False),
    "fn: returns None": (100, "1", "1", _fn("returns_none"), GRADE_INVALID, False),
    "fn: returns 'yes'": (100, "1", "1", _fn("returns_yes"), GRADE_INVALID, False),
    "fn: socket": (50, "{port}", "1", _fn("opens_socket"), GRADE_ERROR, False),
    "fn: /etc/passwd": (50, "1", "1", _fn("reads_passwd"), GRADE_ERROR, False),
    "fn: fork bomb": (61, "1", "1", _fn("fork_bomb"), GRADE_ERROR, False),
    "fn: busy loop": (5, "1", "1", _fn("busy_forever"), GRADE_TIMEOUT, True),
    "fn: os._exit": (5, "1", "1", _fn("exits"), GRADE_ERROR, True),
    "fn: oversized reply": (4, "1", "1", _fn("huge_reply"), GRADE_INVALID, True),
}
N = sum(spec[0] for spec in SUITE.values())
# What a child restart costs (a fresh interpreter importing math-verify), generously: cores are shared.
RESTART_ALLOWANCE_S = 4.0
# Per-sample cost of everything that neither hangs nor restarts (code runs ~30 ms, functions ~1 ms).
PER_SAMPLE_S = 0.1
MARGIN_S = 30.0


def build_suite(port: int) -> tuple[list[GradeRequest], list[str]]:
    """The SUITE's samples in a fixed shuffled order, and each one's kind."""
    kinds = [kind for kind, spec in SUITE.items() for _ in range(spec[0])]
    random.Random(0).shuffle(kinds)
    requests = []
    for i, kind in enumerate(kinds):
        _, completion, answer, verifier, _, _ = SUITE[kind]
        if "{port}" in completion:
            completion = completion.replace("{port}", str(port))
        requests.append(GradeRequest(f"adv/{i // 8}", i % 8, completion, answer, verifier))
    return requests, kinds


def time_bound(procs: int) -> float:
    """Seconds the suite may take on ``procs`` verifier processes in all.

    Hangs and restarts each occupy one process: (timeouts x timeout + restarts x restart allowance)
    / procs, plus a per-sample cost for the rest, plus a fixed margin for start-up and shared cores.
    """
    timeouts = sum(spec[0] for spec in SUITE.values() if spec[4] == GRADE_TIMEOUT)
    restarts = sum(spec[0] for spec in SUITE.values() if spec[5])
    return (timeouts * TIMEOUT_S + restarts * RESTART_ALLOWANCE_S + N * PER_SAMPLE_S) / procs + MARGIN_S


def check_grades(requests: list[GradeRequest], kinds: list[str], grades: list[Grade]) -> collections.Counter[str]:
    """Exactly one grade per request, in order, reward 0, with the kind's status; returns status counts."""
    assert len(grades) == len(requests) == N == 1000
    assert [(g.prompt_id, g.sample_index) for g in grades] == [(r.prompt_id, r.sample_index) for r in requests]
    wrong = [(kind, g.status, g.detail) for kind, g in zip(kinds, grades) if g.status != SUITE[kind][4]]
    assert not wrong, wrong[:10]
    assert all(g.reward == 0.0 and not g.correct for g in grades)
    return collections.Counter(g.status for g in grades)


def expected_counts() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for count, *_, status, _ in SUITE.values():
        counts[status] += count
    return counts


def still_grades_correctly(grade: object) -> None:
    good = [
        GradeRequest("after", 0, r"so \boxed{\frac{1}{2}}", "0.5", "math"),
        GradeRequest("after", 1, pyfunc.TASK.reference_solution(ROW, random.Random(0)), ROW.answer, pyfunc.VERIFIER),
        GradeRequest("after", 2, "1", "1", _fn("returns_bool")),
    ]
    grades = grade(good)  # type: ignore[operator]
    assert [(g.status, g.reward, g.correct) for g in grades] == [(GRADE_OK, 1.0, True)] * 3


def our_processes(since: float) -> list[str]:
    """Verifier children, launchers and runners of this checkout started at or after ``since``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["create_time"] < since - 1:
            continue
        if ("_child_main" in cmd and PACKAGE_ROOT in cmd) or os.path.join(
            PACKAGE_ROOT, "rlsys", "rewards", "code_exec.py"
        ) in cmd:
            found.append(f"{proc.pid}: {cmd[:120]}")
    return found


def wait_until_gone(since: float, seconds: float = 10.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := our_processes(since)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    yield server
    server.close()


def test_suite_composition() -> None:
    assert N == 1000
    assert {spec[4] for spec in SUITE.values()} == {GRADE_TIMEOUT, GRADE_ERROR, GRADE_INVALID}


def test_1000_adversarial_samples_through_a_grader(listener: socket.socket) -> None:
    from rlsys.rewards import RewardGrader

    since = time.time()
    requests, kinds = build_suite(listener.getsockname()[1])
    grader = RewardGrader(
        num_procs=PROCS, timeout_s=TIMEOUT_S, allowed_functions=[f"{REWARD_FNS}:*"], memory_limit_mb=1024
    )
    scratch = [c["scratch"] for c in grader.isolation()]
    try:
        before = grader.counters()
        start = time.monotonic()
        grades = grader.grade(requests)
        elapsed = time.monotonic() - start
        bound = time_bound(PROCS)
        print(f"\nadversarial suite, RewardGrader x{PROCS} procs: {N} samples in {elapsed:.1f}s (bound {bound:.0f}s)")
        counts = check_grades(requests, kinds, grades)
        assert counts == expected_counts()
        after = grader.counters()
        for status, count in expected_counts().items():
            assert after[status] - before[status] == count, status
        restarts = after["restarts"] - before["restarts"]
        must_restart = sum(spec[0] for spec in SUITE.values() if spec[5])
        # Hung code is killed by the launcher within the job; only on a badly overloaded machine may
        # the grader's own kill come first, costing a restart.
        assert must_restart <= restarts <= must_restart + SUITE["code: while True: pass"][0]
        assert elapsed < bound
        still_grades_correctly(grader.grade)
    finally:
        grader.close()
    with pytest.raises(socket.timeout):
        listener.accept()  # no sample ever reached the listener
    assert not any(os.path.exists(s) for s in scratch)
    assert wait_until_gone(since) == []


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    from rlsys.cluster import connect, loopback_env

    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    started = connect(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_1000_adversarial_samples_through_a_pool(ray_cluster: None, listener: socket.socket) -> None:
    import ray

    from rlsys.workers.reward import RewardPool

    since = time.time()
    requests, kinds = build_suite(listener.getsockname()[1])
    pool = RewardPool(
        num_workers=2,
        timeout_s=TIMEOUT_S,
        procs_per_worker=PROCS,
        allowed_functions=[f"{REWARD_FNS}:*"],
        memory_limit_mb=1024,
        num_cpus=0.5,
    )
    try:
        isolation = [c for actor in pool._actors for c in ray.get(actor.isolation.remote())]
        assert len(isolation) == 2 * PROCS and all(c["launcher"] for c in isolation)
        start = time.monotonic()
        grades = pool.grade(requests)
        elapsed = time.monotonic() - start
        bound = time_bound(2 * PROCS) + MARGIN_S  # the chunks are unequal in cost: one more margin
        print(
            f"\nadversarial suite, RewardPool 2 workers x{PROCS} procs: {N} samples in {elapsed:.1f}s "
            f"(bound {bound:.0f}s)"
        )
        counts = check_grades(requests, kinds, grades)
        assert counts == expected_counts()
        counters = pool.counters()
        for status, count in expected_counts().items():
            assert counters[status] == count, status
        assert counters["restarts"] >= sum(spec[0] for spec in SUITE.values() if spec[5])
        assert pool.restarts == 0  # no actor died
        assert elapsed < bound
        still_grades_correctly(pool.grade)
    finally:
        pool.shutdown()
    with pytest.raises(socket.timeout):
        listener.accept()
    assert wait_until_gone(since) == []
    assert not [d for d in glob.glob("/tmp/rlsys-verifier-*") if d in {c["scratch"] for c in isolation}]
