"""In-process tests of the built-in verifiers, answer extraction, result coercion and spec checks.

No sandbox here (see test_rewards_grader.py for that): these call the verifier functions directly.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from rlsys.records import GRADE_ERROR, GRADE_INVALID, GRADE_OK
from rlsys.rewards.verifiers import (
    MAX_JOINED_BOXES,
    NO_ANSWER_DETAIL,
    check_spec_allowed,
    coerce_result,
    extract_final_answer,
    normalize_whitespace,
    resolve_verifier,
    run_verifier,
    verify_exact,
    verify_math,
    verify_regex,
)

REWARD_FNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward_fns.py")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the result is \boxed{42}.", "42"),
        (r"\boxed{1} first, then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{1}, \boxed{2}, \boxed{3}", "1, 2, 3"),  # adjacent final boxes are one answer
        (r"roots \boxed{-2} and \boxed{1}.", "-2, 1"),
        (r"$\boxed{1}$ or $\boxed{2}$", "1, 2"),
        (r"\boxed{1}\boxed{2}", "1, 2"),
        (r"\[\boxed{-2} \quad \text{and} \quad \boxed{1}\]", "-2, 1"),
        (r"\boxed{5} \boxed{5}", "5"),  # a repeated box counts once
        ("\\boxed{004} is it.\n**Final Answer**\n\\boxed{004}", "004"),
        (r"\boxed{1} ++ \boxed{4}", "4"),  # only separators join boxes
        (r"\boxed{} \boxed{4}", "4"),  # an empty box stops the joining
        (r"\boxed{\boxed{2}}", "2"),  # a nested box is not a neighbour
        (r"\boxed{1}, \boxed{2", None),  # a truncated last box is still no answer
        (r"\boxed{\$16,386.20}", r"\$16,386.20"),  # an escaped dollar is part of the answer
        (r"\boxed \$5.", r"\$5"),
        ("Answer: \\$5", "\\$5"),
        ("Answer: $\\$5$.", "\\$5"),  # one $...$ around an escaped \$ is still stripped
        ("Answer: \\$5 or \\$6", "\\$5 or \\$6"),
        ("Answer: **42**.", "42"),  # closing emphasis after the one the line pattern ate
        ("Answer: x^*", "x^*"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{ \{1, \{2\}\} }", r"\{1, \{2\}\}"),  # escaped braces do not close the group
        (r"\fbox{7}", "7"),
        (r"\boxed 5.", "5"),
        (r"\boxed{\frac{1}{2", None),  # truncated: no answer rather than an earlier value
        (r"\boxed{}", None),
        ("Let me think.\nAnswer: 42", "42"),
        ("**Answer:** $42$.", "42"),
        ("Final Answer: x = 3\n", "x = 3"),
        ("answer: 1\nANSWER: 2", "2"),  # the last Answer line wins, any case
        ("Answer: 1\n" + r"\boxed{9}", "9"),  # a box beats an Answer line
        ("The answer is 42", None),  # no box, no Answer line
        ("Answer:   ", None),
        ("", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_normalize_whitespace() -> None:
    assert normalize_whitespace("  a \n\t b  ") == "a b"


@pytest.mark.parametrize(
    ("completion", "answer", "correct"),
    [
        (r"\boxed{42}", "42", True),
        (r"\boxed{41}", "42", False),
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\dfrac{3}{4}}", "$0.75$", True),
        ("Answer: 42", "42", True),
        ("Answer: $\\sqrt{8}$", r"2\sqrt{2}", True),
        (r"\boxed{x = 3}", "3", True),
        (r"\boxed{\{1, 2\}}", r"\{2, 1\}", True),
        ("Answer: banana", "42", False),
        (r"\boxed{\frac{1}{", "42", False),
        # An escaped \$ is a currency sign, not a math delimiter (issue 12 item 6).
        (r"\boxed{\$16,386.20}", "$16386.20$", True),
        (r"\boxed{\$16386.17}", "$16386.17$", True),
        ("Answer: \\$5", "5", True),
        ("Answer: \\$5", "6", False),
        (r"\boxed{18.90}", r"\$18.90", True),
        # Adjacent final boxes are one set answer; separated ones are not.
        (r"\boxed{1}, \boxed{2}, \boxed{3}", r"\{1,2,3\}", True),
        (r"\boxed{3} and \boxed{1}", "1, 3", True),
        (r"\boxed{1}, \boxed{2}, \boxed{3}", "3", False),
        (r"\boxed{1} is a step; the answer is \boxed{3}", "3", True),
    ],
)
def test_verify_math(completion: str, answer: str, correct: bool) -> None:
    reward, ok, status, _ = verify_math(completion, answer)
    assert (reward, ok, status) == (1.0 if correct else 0.0, correct, GRADE_OK)


def test_verify_math_bounded_on_hostile_boxes() -> None:
    # Many unclosed or adjacent boxes: only the trailing ones are scanned, and nothing raises.
    assert verify_math("\\boxed{" * 20_000, "1") == (0.0, False, GRADE_OK, NO_ANSWER_DETAIL)
    many = ", ".join(f"\\boxed{{{i}}}" for i in range(1000))
    joined = extract_final_answer(many)
    assert joined is not None and len(joined.split(", ")) == MAX_JOINED_BOXES
    assert verify_math("\\" * 5000 + "$" * 5000, "1")[2] == GRADE_OK


def test_verify_math_without_answer_says_so() -> None:
    assert verify_math("I think it is 42", "42") == (0.0, False, GRADE_OK, NO_ANSWER_DETAIL)


def test_verify_math_unparseable_gold_is_an_error_not_a_silent_zero() -> None:
    reward, ok, status, detail = verify_math(r"\boxed{1}", "")
    assert (reward, ok, status) == (0.0, False, GRADE_ERROR)
    assert "gold answer" in detail


def test_verify_exact() -> None:
    assert verify_exact("Answer:  hello \t  world \n", " hello world")[:3] == (1.0, True, GRADE_OK)
    assert verify_exact("  B \n", "B") == (1.0, True, GRADE_OK, NO_ANSWER_DETAIL)  # whole completion
    assert verify_exact("Answer: b", "B")[:2] == (0.0, False)  # case matters


def test_verify_regex() -> None:
    assert verify_regex("Answer: 42", r"4\d")[:2] == (1.0, True)
    assert verify_regex("Answer: 421", r"4\d")[:2] == (0.0, False)  # fullmatch, not search
    reward, ok, status, detail = verify_regex("Answer: 4", "(")
    assert (reward, ok, status) == (0.0, False, GRADE_ERROR) and "regex" in detail


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, (1.0, True, GRADE_OK)),
        (False, (0.0, False, GRADE_OK)),
        (np.bool_(True), (1.0, True, GRADE_OK)),
        (1.0, (1.0, True, GRADE_OK)),
        (0.99, (0.99, False, GRADE_OK)),
        (2, (2.0, True, GRADE_OK)),
        (np.float32(0.5), (0.5, False, GRADE_OK)),
        ((0.3, True), (0.3, True, GRADE_OK)),
        ((1.0, np.bool_(False)), (1.0, False, GRADE_OK)),
        (None, (0.0, False, GRADE_INVALID)),
        (float("nan"), (0.0, False, GRADE_INVALID)),
        (float("-inf"), (0.0, False, GRADE_INVALID)),
        ("1.0", (0.0, False, GRADE_INVALID)),
        ((1.0, "yes"), (0.0, False, GRADE_INVALID)),
        ((float("nan"), True), (0.0, False, GRADE_INVALID)),
        ((1.0, True, 3), (0.0, False, GRADE_INVALID)),
    ],
)
def test_coerce_result(value: object, expected: tuple[float, bool, str]) -> None:
    reward, correct, status, detail = coerce_result(value, success_threshold=1.0)
    assert (reward, correct, status) == expected
    assert math.isfinite(reward)
    assert (status == GRADE_OK) == (detail == "")


def test_run_verifier_turns_exceptions_into_short_error_grades() -> None:
    def boom(completion: str, answer: str) -> bool:
        raise RuntimeError("x" * 10_000)

    def leaves(completion: str, answer: str) -> bool:
        raise SystemExit(2)

    reward, correct, status, detail = run_verifier(boom, "c", "a", max_detail_chars=50)
    assert (reward, correct, status) == (0.0, False, GRADE_ERROR)
    assert detail.startswith("RuntimeError: xxx") and len(detail) <= 50
    assert run_verifier(leaves, "c", "a")[2:] == (GRADE_ERROR, "SystemExit: 2")


def test_run_verifier_applies_success_threshold() -> None:
    assert run_verifier(lambda c, a: 0.6, "c", "a", success_threshold=0.5)[:2] == (0.6, True)
    assert run_verifier(lambda c, a: 0.4, "c", "a", success_threshold=0.5)[:2] == (0.4, False)


def test_allow_list() -> None:
    for spec in ("math", "exact", "regex", "rlsys.tasks.gsm8k:reward"):
        check_spec_allowed(spec, ())  # built-ins and rlsys.* need no listing
    check_spec_allowed("mypkg.rewards:score", ["mypkg.rewards:score"])
    check_spec_allowed("mypkg.rewards:other", ["mypkg.rewards:*"])
    check_spec_allowed("tasks/fns.py:score", ["tasks/fns.py:score"])
    with pytest.raises(ValueError, match=r"'mypkg.rewards:score' is not allowed.*allowed_functions"):
        check_spec_allowed("mypkg.rewards:score", ["mypkg.rewards:other"])
    with pytest.raises(ValueError, match="not allowed"):
        check_spec_allowed("rlsys_evil:score", ())  # only the rlsys package itself is trusted
    with pytest.raises(ValueError, match="neither a built-in"):
        check_spec_allowed("maths", ())  # a typo of a built-in


def test_resolve_verifier_errors_name_the_spec(tmp_path: os.PathLike[str]) -> None:
    allow = ["no_such_module_xyz:fn", f"{REWARD_FNS}:*", "reward_fns.py:returns_bool"]
    with pytest.raises(ValueError, match="no_such_module_xyz:fn.*importing"):
        resolve_verifier("no_such_module_xyz:fn", allow)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        resolve_verifier(f"{REWARD_FNS}:missing", allow)
    with pytest.raises(ValueError, match="not callable"):
        resolve_verifier(f"{REWARD_FNS}:not_callable", allow)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_verifier("reward_fns.py:returns_bool", allow, base_dir=str(tmp_path))
    fn = resolve_verifier("reward_fns.py:returns_bool", allow, base_dir=os.path.dirname(REWARD_FNS))
    assert fn(" 1 ", "1") is True
    assert resolve_verifier("math")(r"\boxed{2}", "2")[:2] == (1.0, True)
