"""The reward sandbox's protections, one by one (no Ray).

Each test names the protection it checks; the kernel-level ones (network namespace, seccomp) are
asserted wherever this machine can provide them (root with CAP_SYS_ADMIN, x86-64 Linux), and the
tests say so when it cannot. Misbehaving verifiers live in reward_fns.py; code answers are inline.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from rlsys.records import GRADE_ERROR, GRADE_INVALID, GRADE_OK, GRADE_STATUSES, GRADE_TIMEOUT, GradeRequest
from rlsys.rewards import RewardGrader, code_exec, run_verifier
from rlsys.rewards.code_exec import run_code
from rlsys.rewards.sandbox import MAX_REPLY_BYTES
from rlsys.rewards.verifiers import MAX_MATH_NESTING, GradeFailure
from rlsys.tasks import pyfunc

HERE = os.path.dirname(os.path.abspath(__file__))
REWARD_FNS = os.path.join(HERE, "reward_fns.py")
# Code runs get this minus code_exec.JOB_DEADLINE_RESERVE_S; generous because CI cores are shared.
TIMEOUT_S = 2.0
FIVE_MB = "Answer: 1 " + "9" * (5 * 1024 * 1024)
TESTS = "assert type(f(3)) is int and f(3) == 9\n"
GOOD_CODE = "def f(x):\n    return x * x\n"


def fn(name: str) -> str:
    return f"{REWARD_FNS}:{name}"


def req(i: int, completion: str, verifier: str, answer: str = "1") -> GradeRequest:
    return GradeRequest(prompt_id="p", sample_index=i, completion=completion, answer=answer, verifier=verifier)


def code_req(i: int, code: str, tests: str = TESTS) -> GradeRequest:
    return req(i, code, fn("runs_code"), tests)


def _probe(code: str) -> bool:
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, timeout=60).returncode == 0


# What this machine can give (probed in a throwaway process: both changes are irreversible).
CAN_UNSHARE_NET = _probe("from rlsys.rewards.code_exec import unshare_network as u; raise SystemExit(0 if u() else 1)")
CAN_SECCOMP = _probe("from rlsys.rewards.code_exec import install_seccomp as s; raise SystemExit(0 if s(True) else 1)")


@pytest.fixture(scope="module")
def grader() -> Iterator[RewardGrader]:
    g = RewardGrader(num_procs=2, timeout_s=TIMEOUT_S, allowed_functions=[f"{REWARD_FNS}:*"], memory_limit_mb=1024)
    yield g
    g.close()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def descendants() -> dict[int, str]:
    """{pid: command line} of every live process below this one."""
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out[proc.pid] = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            pass
    return out


def gone_within(pids: set[int], seconds: float) -> bool:
    """True once none of ``pids`` is alive (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


class ProcessSampler:
    """Samples this process's descendants every few ms while a block runs; remembers every pid seen."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = descendants()
            for pid, cmd in now.items():
                # A reaped-late runner reads as a zombie with an empty cmdline: keep what it was seen
                # running as (a pid only ever seen with an empty cmdline is still recorded as such).
                if cmd or pid not in self.seen:
                    self.seen[pid] = cmd
            self.peak = max(self.peak, len(now))
            time.sleep(0.005)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_statuses_match_the_records() -> None:
    assert (code_exec.OK, code_exec.TIMEOUT, code_exec.ERROR, code_exec.INVALID) == GRADE_STATUSES


def test_each_child_has_its_own_scratch_dir_limits_and_isolation(grader: RewardGrader) -> None:
    info = grader._sandbox.isolation()
    assert len(info) == 2 and len({i["scratch"] for i in info}) == 2
    for child in info:
        assert os.path.isdir(child["scratch"]) and child["launcher"]
        assert child["netns"] == CAN_UNSHARE_NET
        assert child["seccomp"] == CAN_SECCOMP
    grades = grader.grade([req(0, "x", fn("in_scratch_dir")), req(1, "x", fn("cpu_limited"))])
    assert [(g.status, g.correct) for g in grades] == [(GRADE_OK, True), (GRADE_OK, True)]


def test_fork_bombs_fail_at_once_and_create_no_process(grader: RewardGrader) -> None:
    before_procs = descendants()
    assert len(before_procs) == 4  # two verifier children, each with its code launcher
    before = grader.counters()
    start = time.monotonic()
    with ProcessSampler() as sampler:
        grades = grader.grade([req(0, "x", fn("fork_bomb")), req(1, "x", fn("libc_fork"))])
    assert time.monotonic() - start < TIMEOUT_S  # refused at the first fork, not timed out
    assert (grades[0].status, grades[0].reward) == (GRADE_ERROR, 0.0)
    assert "os.fork is not allowed" in grades[0].detail
    if CAN_SECCOMP:  # fork() straight through libc: the kernel refuses it
        assert (grades[1].status, grades[1].reward) == (GRADE_OK, float(errno.EPERM))
    assert set(sampler.seen) == set(before_procs) and sampler.peak == 4
    assert descendants() == before_procs
    assert delta(before, grader.counters()) == {GRADE_ERROR: 1, GRADE_OK: 1}


def test_fork_bomb_in_a_code_answer_creates_only_its_runner(grader: RewardGrader) -> None:
    before_procs = descendants()
    bombs = [code_req(0, "import os\nwhile True:\n    os.fork()\n"), code_req(1, "import pty\npty.fork()\n")]
    start = time.monotonic()
    with ProcessSampler() as sampler:
        grades = grader.grade(bombs)
    # "error" (not "timeout") already shows the bomb was stopped, not waited out; the clock bound
    # only guards against a hang and leaves room for a loaded 2-core machine.
    assert time.monotonic() - start < 5 * TIMEOUT_S
    assert [g.status for g in grades] == [GRADE_ERROR, GRADE_ERROR]
    assert all("sandbox violation: os.fork" in g.detail for g in grades), [g.detail for g in grades]
    new = {pid: cmd for pid, cmd in sampler.seen.items() if pid not in before_procs}
    assert all("code_exec.py --runner" in cmd for cmd in new.values()), new  # nothing but runners
    assert sampler.peak <= len(before_procs) + 2  # at most one runner per child at a time
    deadline = time.monotonic() + 5  # a finished runner may take a moment to be reaped under load
    while descendants() != before_procs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert descendants() == before_procs


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    yield server
    server.close()


def test_no_network_for_verifiers_or_code(grader: RewardGrader, listener: socket.socket) -> None:
    port = str(listener.getsockname()[1])
    grades = grader.grade(
        [
            req(0, port, fn("opens_socket")),
            req(1, port, fn("opens_raw_socket")),
            req(2, port, fn("libc_socket")),
            code_req(3, f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n"),
            code_req(4, f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))\n"),
        ]
    )
    assert [g.status for g in grades] == [GRADE_ERROR, GRADE_ERROR, GRADE_OK, GRADE_ERROR, GRADE_ERROR]
    assert "(network)" in grades[0].detail and "(network)" in grades[1].detail
    if CAN_SECCOMP:  # socket(AF_INET) through libc: refused by the kernel
        assert grades[2].reward == float(errno.EACCES) and not grades[2].correct
    assert "sandbox violation: import socket" in grades[3].detail
    assert "sandbox violation: import _socket" in grades[4].detail
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody ever connected


def test_files_outside_the_scratch_dir(grader: RewardGrader) -> None:
    grades = grader.grade(
        [
            req(0, "x", fn("reads_passwd")),
            req(1, "x", fn("reads_passwd_quietly")),  # caught the refusal and returned True
            code_req(2, "print(open('/etc/passwd').read())\n"),
            code_req(3, "import os\nos.listdir('/root')\n"),
            code_req(4, "open('/proc/self/mem', 'rb')\n"),
            code_req(5, "open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n" + GOOD_CODE),
        ]
    )
    assert [(g.status, g.reward) for g in grades[:5]] == [(GRADE_ERROR, 0.0)] * 5
    assert "open('/etc/passwd') outside the sandbox" in grades[0].detail
    assert "open('/etc/passwd') outside the sandbox" in grades[1].detail
    assert "sandbox violation: open('/etc/passwd')" in grades[2].detail
    assert "os.listdir('/root')" in grades[3].detail and "/proc/self/mem" in grades[4].detail
    assert (grades[5].status, grades[5].correct) == (GRADE_OK, True)  # its own scratch dir is fine


def test_file_size_cap(grader: RewardGrader) -> None:
    grades = grader.grade([req(0, "20", fn("writes_big_file")), req(1, "1", fn("writes_big_file"))])
    assert (grades[0].status, grades[0].detail) == (GRADE_ERROR, "OSError: [Errno 27] File too large")
    assert (grades[1].status, grades[1].correct) == (GRADE_OK, True)
    code = run_code("open('big', 'wb').write(b'x' * (20 << 20))\n", "", timeout_s=5)
    assert code == (False, GRADE_OK, "failed: OSError: [Errno 27] File too large")


def test_oversized_reply_is_invalid_and_the_child_replaced(grader: RewardGrader) -> None:
    before = grader.counters()
    grades = grader.grade([req(0, "x", fn("huge_reply")), req(1, "1", fn("returns_bool"))])
    assert (grades[0].status, grades[0].reward) == (GRADE_INVALID, 0.0)
    assert f"over the {MAX_REPLY_BYTES // 1024} KiB cap" in grades[0].detail
    assert grades[1].correct
    assert delta(before, grader.counters()) == {GRADE_INVALID: 1, GRADE_OK: 1, "restarts": 1}


def test_multi_megabyte_answers_never_reach_a_child(grader: RewardGrader, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped: list[int] = []
    real_run = grader._sandbox.run

    def recording_run(jobs):
        shipped.extend(len(j.completion) + len(j.answer) for j in jobs)
        return real_run(jobs)

    monkeypatch.setattr(grader._sandbox, "run", recording_run)
    grades = grader.grade(
        [req(0, FIVE_MB, "math"), req(1, "Answer: 1", "exact", answer=FIVE_MB), req(2, FIVE_MB, fn("sleep_forever"))]
    )
    assert [(g.status, g.seconds) for g in grades] == [(GRADE_INVALID, 0.0)] * 3
    assert all("over the" in g.detail and "limit" in g.detail for g in grades)
    assert shipped == []  # not one byte of them went to a verifier process


def test_deeply_nested_latex_is_invalid_fast(grader: RewardGrader) -> None:
    nested = "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}"
    shallow = "\\boxed{" + "\\frac{1}{" * 3 + "2" + "}" * 3 + "}"
    start = time.monotonic()
    grades = grader.grade([req(0, nested, "math"), req(1, shallow, "math", answer="0.5")])
    assert time.monotonic() - start < TIMEOUT_S
    assert grades[0].status == GRADE_INVALID and f"over the {MAX_MATH_NESTING} limit" in grades[0].detail
    assert (grades[1].status, grades[1].correct) == (GRADE_OK, True)  # 1/(1/(1/2)) = 1/2


def test_grade_failure_sets_the_status() -> None:
    def timed_out(completion: str, answer: str) -> bool:
        raise GradeFailure(GRADE_TIMEOUT, "the code ran too long")

    assert run_verifier(timed_out, "x", "y") == (0.0, False, GRADE_TIMEOUT, "the code ran too long")
    with pytest.raises(ValueError, match="timeout/error/invalid"):
        GradeFailure(GRADE_OK)


@pytest.mark.parametrize(
    ("code", "status", "detail"),
    [
        (GOOD_CODE, GRADE_OK, ""),
        ("def f(x):\n    return x + 1\n", GRADE_OK, "failed: AssertionError"),
        ("def f(x) return", GRADE_OK, "failed: SyntaxError"),
        ("while True:\n    pass\n", GRADE_TIMEOUT, "timed out"),
        ("import os\nos._exit(3)\n", GRADE_ERROR, "exited with code 3"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", GRADE_ERROR, "os.kill"),
        ("import subprocess\nsubprocess.run(['id'])\n", GRADE_ERROR, "import _posixsubprocess"),
        ("import ctypes\n", GRADE_ERROR, "import ctypes"),
        ("x = bytearray(1 << 33)\n", GRADE_ERROR, "memory limit: MemoryError"),
        ("import gc\ngc.get_referrers(gc)\n", GRADE_ERROR, "gc.get_referrers"),
        ("import os\nos.symlink('/etc/passwd', 'p')\n", GRADE_ERROR, "os.symlink"),
        ("open('../x', 'w')\n", GRADE_ERROR, "'..' in a path"),
        # Output cap: flooding every descriptor hits the report channel too.
        (
            "import os\nfor fd in range(3, 64):\n    try:\n"
            "        os.write(fd, b'x' * 100000)\n    except OSError:\n        pass\n",
            GRADE_INVALID,
            "over 65536 bytes",
        ),
    ],
)
def test_run_code_statuses(code: str, status: str, detail: str) -> None:
    passed, got_status, got_detail = run_code(code, TESTS, timeout_s=0.5 if status == GRADE_TIMEOUT else 5.0)
    assert (passed, got_status) == (status == GRADE_OK and not detail, status)
    assert detail in got_detail


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos._exit(0)\n",  # "exited cleanly" is not "passed"
        "import os\nfor fd in range(64):\n    try:\n"
        "        os.write(fd, b'\\ntoken pass \\n')\n    except OSError:\n        pass\n"
        "os._exit(0)\n",
        "class A:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return A()\n",
        "import builtins\nbuiltins.type = lambda o: int\n"
        "type = lambda o: int\nclass A(int):\n    def __eq__(self, o):\n"
        "        return True\ndef f(x):\n    return A(0)\n",
        "import builtins, threading\ndef patch():\n    while True:\n        builtins.type = lambda o: int\n"
        "threading.Thread(target=patch, daemon=True).start()\nclass A(int):\n    def __eq__(self, o):\n"
        "        return True\ndef f(x):\n    return A(0)\n",
        "import sys\ndef f(x):\n    sys._getframe(1).f_locals\n    return 9\n",  # frames are not inspectable
        "def f(x):\n    try:\n        raise ValueError\n    except ValueError as e:\n"
        "        e.__traceback__.tb_frame\n    return 9\n",
        "def g():\n    yield\nit = g()\nit.gi_frame.f_back\ndef f(x):\n    return 9\n",
        "import sys\nsys.settrace(lambda *a: None)\ndef f(x):\n    return 9\n",
        # Patching what the runner or its audit hook would look up after the code ran.
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n",
        "import builtins\nbuiltins.len = lambda x: 0\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
        "    e.__traceback__.tb_frame\ndef f(x):\n    return 9\n",
    ],
)
def test_code_cannot_forge_a_pass(code: str) -> None:
    passed, status, detail = run_code(code, TESTS, timeout_s=5.0)
    assert not passed, (status, detail)


@pytest.mark.parametrize(
    "code",
    [
        "import builtins\nbuiltins.any = lambda it: True\n",
        "import sys\nsys.modules['__main__']._READ_EVENTS = frozenset()\n"
        "sys.modules['__main__']._DENIED_EVENTS = frozenset()\n",
        "import posixpath\nposixpath._joinrealpath = lambda *a: ('/dev/null', True)\n",
        "import os\nos.lstat = lambda p: None\nos.fspath = lambda p: '/dev/null'\n",
        "class S(str):\n    def split(self, *a):\n        return ['x']\n"
        "    def startswith(self, *a):\n        return True\n"
        "open = lambda p, _open=open: _open(S(p))\n",
    ],
)
def test_patching_the_runner_does_not_open_the_file_system(code: str) -> None:
    passed, status, detail = run_code(code + "open('/etc/passwd').read()\n" + GOOD_CODE, TESTS, timeout_s=5.0)
    assert (passed, status) == (False, GRADE_ERROR)
    assert "outside the scratch directory" in detail or "not str or bytes" in detail, detail


def test_code_execution_task_through_the_grader_keeps_its_child(grader: RewardGrader) -> None:
    row = pyfunc.generate("train", 1, seed=0)[0]
    fence = "```python\n{}\n```"
    before = grader.counters()
    start = time.monotonic()
    grades = grader.grade(
        [
            req(0, pyfunc.TASK.reference_solution(row, None), pyfunc.VERIFIER, row.answer),  # type: ignore[arg-type]
            req(1, fence.format("def f(x):\n    return 0"), pyfunc.VERIFIER, row.answer),
            req(2, fence.format("while True:\n    pass"), pyfunc.VERIFIER, row.answer),
            req(3, fence.format("import os\nos._exit(3)"), pyfunc.VERIFIER, row.answer),
            req(4, "I don't know", pyfunc.VERIFIER, row.answer),
        ]
    )
    elapsed = time.monotonic() - start
    assert [(g.status, g.reward) for g in grades] == [
        (GRADE_OK, 1.0),
        (GRADE_OK, 0.0),
        (GRADE_TIMEOUT, 0.0),
        (GRADE_ERROR, 0.0),
        (GRADE_OK, 0.0),
    ]
    # The hung code was killed by the launcher inside the job's own time, so the verifier process
    # itself survived: no restart (a restart would re-import math-verify).
    assert "code timed out" in grades[2].detail and grades[2].seconds < TIMEOUT_S
    assert delta(before, grader.counters()) == {GRADE_OK: 3, GRADE_TIMEOUT: 1, GRADE_ERROR: 1}
    assert elapsed < 2 * TIMEOUT_S


def test_close_kills_children_launchers_and_removes_scratch_dirs() -> None:
    others = descendants()  # the module's grader, if it is up
    g = RewardGrader(num_procs=2, timeout_s=TIMEOUT_S, allowed_functions=[f"{REWARD_FNS}:*"])
    scratch = {c["scratch"] for c in g._sandbox.isolation()}
    procs = {pid for pid in descendants() if pid not in others}
    assert len(procs) == 4 and all(os.path.isdir(s) for s in scratch)
    # A timeout kills a child mid-job: its launcher goes with it and its scratch dir is removed.
    g.grade([req(0, "x", fn("busy_forever"))])
    scratch |= {c["scratch"] for c in g._sandbox.isolation()}
    procs |= {pid for pid in descendants() if pid not in others}
    assert len(scratch) == 3 and not all(os.path.isdir(s) for s in scratch)
    g.close()
    assert not any(os.path.exists(s) for s in scratch)
    assert set(descendants()) == set(others)
    # Launchers are grandchildren: killed with their child's process group, reaped by init shortly after.
    assert gone_within(procs, 5.0)


def test_a_runner_dies_with_the_process_that_started_it() -> None:
    # The launcher's or caller's death must not orphan a runner stuck in a loop (PR_SET_PDEATHSIG).
    caller = subprocess.Popen(
        [sys.executable, "-c", "from rlsys.rewards.code_exec import run_code; run_code('while True: pass', '', 60)"]
    )
    try:
        deadline = time.monotonic() + 30
        runners: set[int] = set()
        while not runners and time.monotonic() < deadline:
            runners = {pid for pid, cmd in descendants().items() if "code_exec.py --runner" in cmd}
            time.sleep(0.05)
        assert runners, "the runner never started"
    finally:
        caller.kill()
        caller.wait()
    assert gone_within(runners, 5.0)
