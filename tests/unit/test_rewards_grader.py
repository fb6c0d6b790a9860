"""RewardGrader end to end through its sandbox children (no Ray).

Misbehaving verifiers live in reward_fns.py next to this file and are allowed explicitly.
Timeouts are short (1 s) so the whole module stays within a few seconds per hang.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from rlsys.records import GRADE_ERROR, GRADE_INVALID, GRADE_OK, GRADE_STATUSES, GRADE_TIMEOUT, GradeRequest
from rlsys.rewards import COUNTER_KEYS, RewardGrader, SandboxStartError

HERE = os.path.dirname(os.path.abspath(__file__))
REWARD_FNS = os.path.join(HERE, "reward_fns.py")
TIMEOUT_S = 1.0
# Allowance on top of the timeout for the parent's poll loop; generous because CI cores are shared.
TIMEOUT_MARGIN_S = 1.0


def fn(name: str) -> str:
    return f"{REWARD_FNS}:{name}"


def req(i: int, completion: str, answer: str = "1", verifier: str = "math", prompt_id: str = "p") -> GradeRequest:
    return GradeRequest(prompt_id=prompt_id, sample_index=i, completion=completion, answer=answer, verifier=verifier)


@pytest.fixture(scope="module")
def grader() -> Iterator[RewardGrader]:
    g = RewardGrader(num_procs=2, timeout_s=TIMEOUT_S, allowed_functions=[f"{REWARD_FNS}:*"], memory_limit_mb=512)
    yield g
    g.close()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_builtins_right_wrong_and_malformed(grader: RewardGrader) -> None:
    requests = [
        req(0, r"so \boxed{42}", "42"),
        req(1, r"\boxed{\frac{1}{2}}", "0.5"),
        req(2, "Answer: 41", "42"),
        req(3, "no final answer here", "42"),
        req(4, r"\boxed{\frac{1}{", "42"),
        req(5, "Answer: hello   world", "hello world", "exact"),
        req(6, "Answer: 42", r"\d+", "regex"),
    ]
    grades = grader.grade(requests)
    assert [(g.reward, g.correct, g.status) for g in grades] == [
        (1.0, True, GRADE_OK),
        (1.0, True, GRADE_OK),
        (0.0, False, GRADE_OK),
        (0.0, False, GRADE_OK),
        (0.0, False, GRADE_OK),
        (1.0, True, GRADE_OK),
        (1.0, True, GRADE_OK),
    ]
    assert grades[3].detail == "no final answer found"


def test_user_function_results(grader: RewardGrader) -> None:
    cases = [
        ("returns_bool", "1", (1.0, True, GRADE_OK)),
        ("returns_float", "0.5", (0.5, False, GRADE_OK)),  # below the default threshold 1.0
        ("returns_float", "1.0", (1.0, True, GRADE_OK)),
        ("returns_tuple", "1", (0.25, True, GRADE_OK)),
        ("returns_none", "1", (0.0, False, GRADE_INVALID)),
        ("returns_nan", "1", (0.0, False, GRADE_INVALID)),
        ("returns_inf", "1", (0.0, False, GRADE_INVALID)),
        ("returns_str", "1", (0.0, False, GRADE_INVALID)),
        ("returns_bad_tuple", "1", (0.0, False, GRADE_INVALID)),
        ("raises", "1", (0.0, False, GRADE_ERROR)),
        ("calls_sys_exit", "1", (0.0, False, GRADE_ERROR)),
    ]
    grades = grader.grade([req(i, c, "1", fn(name)) for i, (name, c, _) in enumerate(cases)])
    assert [(g.reward, g.correct, g.status) for g in grades] == [expected for *_, expected in cases]
    for g in grades:
        assert (g.status == GRADE_OK) == (g.detail == "")
        assert len(g.detail) <= 200  # "raises" puts 5000 characters in its message
    assert grades[9].detail.startswith("RuntimeError: verifier exploded")


def test_hanging_verifier_is_killed_counted_and_grader_keeps_serving(grader: RewardGrader) -> None:
    before = grader.counters()
    start = time.monotonic()
    grades = grader.grade([req(0, "x", verifier=fn("sleep_forever")), req(1, "x", verifier=fn("busy_forever"))])
    elapsed = time.monotonic() - start
    assert [g.status for g in grades] == [GRADE_TIMEOUT, GRADE_TIMEOUT]
    assert all(g.reward == 0.0 and not g.correct and "timed out" in g.detail for g in grades)
    # Both hang in parallel (two children): one timeout's worth of wall time, plus the poll slack.
    assert all(TIMEOUT_S <= g.seconds < TIMEOUT_S + TIMEOUT_MARGIN_S for g in grades)
    assert elapsed < TIMEOUT_S + TIMEOUT_MARGIN_S
    assert delta(before, grader.counters()) == {GRADE_TIMEOUT: 2, "restarts": 2}
    after = grader.grade([req(0, r"\boxed{1}"), req(1, "Answer: 1", verifier=fn("returns_bool"))])
    assert [g.status for g in after] == [GRADE_OK, GRADE_OK]


@pytest.mark.parametrize(("name", "detail"), [("exits", "exited with code 1"), ("segfaults", "SIGSEGV")])
def test_dying_verifier_is_an_error_and_replaced(grader: RewardGrader, name: str, detail: str) -> None:
    before = grader.counters()
    grades = grader.grade([req(0, "x", verifier=fn(name)), req(1, r"\boxed{1}")])
    assert (grades[0].status, grades[0].reward) == (GRADE_ERROR, 0.0)
    assert detail in grades[0].detail
    assert grades[1].status == GRADE_OK and grades[1].correct
    assert delta(before, grader.counters()) == {GRADE_ERROR: 1, GRADE_OK: 1, "restarts": 1}
    assert grader.grade([req(0, "1", verifier=fn("returns_bool"))])[0].correct


def test_forged_replies_are_rejected_not_unpickled(grader: RewardGrader) -> None:
    # The parent reads children's replies as JSON only: verifier code cannot smuggle a pickle (code
    # execution in the parent) or a fake "correct" for another request through the socket.
    grades = grader.grade([req(0, "pickle", verifier=fn("forges_reply")), req(1, "json", verifier=fn("forges_reply"))])
    assert [(g.status, g.reward, g.correct) for g in grades] == [(GRADE_ERROR, 0.0, False)] * 2
    assert "malformed reply" in grades[1].detail
    assert grader.grade([req(0, r"\boxed{1}")])[0].correct


def test_memory_cap_turns_a_huge_allocation_into_an_error(grader: RewardGrader) -> None:
    grades = grader.grade([req(0, "4096", verifier=fn("allocates")), req(1, "16", verifier=fn("allocates"))])
    assert (grades[0].status, grades[0].detail) == (GRADE_ERROR, "MemoryError")
    assert grades[1].status == GRADE_OK and grades[1].correct


def test_order_and_count_preserved_in_a_mixed_batch(grader: RewardGrader) -> None:
    requests = []
    for i in range(40):
        if i == 7:
            requests.append(req(i, "hang", "1", fn("sleep_if_asked"), prompt_id="q"))
        elif i == 20:  # a real pathological answer: sympy evaluates a tower of powers for ever
            requests.append(req(i, r"\boxed{9^{9^{9^{9}}}}", "1", "math", prompt_id="q"))
        elif i % 3 == 0:
            requests.append(req(i, f"Answer: {i % 4}", "1", "exact", prompt_id="q"))
        else:
            requests.append(req(i, rf"\boxed{{{i % 2}}}", "1", "math", prompt_id="q"))
    grades = grader.grade(requests)
    assert [(g.prompt_id, g.sample_index) for g in grades] == [("q", i) for i in range(40)]
    assert grades[7].status == GRADE_TIMEOUT and grades[20].status == GRADE_TIMEOUT
    for i, g in enumerate(grades):
        if i not in (7, 20):
            expected = (i % 4 == 1) if i % 3 == 0 else (i % 2 == 1)
            assert (g.status, g.correct) == (GRADE_OK, expected), (i, g)


def test_overlong_completion_is_invalid_without_running(grader: RewardGrader) -> None:
    before = grader.counters()
    long_text = "Answer: 1 " + "x" * grader.max_completion_chars
    grades = grader.grade([req(0, long_text, verifier=fn("sleep_forever")), req(1, "Answer: 1")])
    assert (grades[0].status, grades[0].seconds) == (GRADE_INVALID, 0.0)
    assert "limit" in grades[0].detail
    assert grades[1].correct
    assert delta(before, grader.counters()) == {GRADE_INVALID: 1, GRADE_OK: 1}


def test_empty_batch_and_counter_keys(grader: RewardGrader) -> None:
    assert grader.grade([]) == []
    counters = grader.counters()
    assert tuple(counters) == COUNTER_KEYS
    assert set(GRADE_STATUSES) <= set(counters)


def test_spec_validation_fails_loudly(grader: RewardGrader) -> None:
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        grader.validate_specs(["math", fn("nope")])
    with pytest.raises(ValueError, match="not callable"):
        grader.grade([req(0, "x", verifier=fn("not_callable"))])
    with pytest.raises(ValueError, match="is not allowed"):
        grader.grade([req(0, "x", verifier="reward_fns:returns_bool")])
    with pytest.raises(ValueError, match="neither a built-in"):
        grader.validate_specs(["Math"])
    grader.validate_specs(["math", "exact", "regex", fn("returns_bool")])  # fine, and cached


def test_allow_list_threshold_and_module_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The grader hands the parent's sys.path to its children, so module specs import the same way.
    monkeypatch.syspath_prepend(HERE)
    with RewardGrader(
        num_procs=1, timeout_s=TIMEOUT_S, success_threshold=0.5, allowed_functions=["reward_fns:returns_float"]
    ) as g:
        with pytest.raises(ValueError, match=r"'reward_fns:returns_bool' is not allowed.*allowed_functions"):
            g.validate_specs(["reward_fns:returns_float", "reward_fns:returns_bool"])
        with pytest.raises(ValueError, match="is not allowed"):
            g.grade([req(0, "1", verifier=fn("returns_float"))])  # the file form is a different spec
        grades = g.grade(
            [req(0, "0.6", verifier="reward_fns:returns_float"), req(1, "0.4", verifier="reward_fns:returns_float")]
        )
        assert [(x.reward, x.correct) for x in grades] == [(0.6, True), (0.4, False)]
        pids = [c.process.pid for c in g._sandbox._children]
    for pid in pids:  # close() killed and reaped the children
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_malformed_allow_list_and_too_small_memory_cap_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="allowed_functions entry 'no_function_part'"):
        RewardGrader(allowed_functions=["no_function_part"])
    with pytest.raises(SandboxStartError, match="MemoryError"):
        RewardGrader(memory_limit_mb=64)
