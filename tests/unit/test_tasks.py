"""Built-in tasks: verifiers on hand-made answers, generators, splits, reference solutions."""

from __future__ import annotations

import importlib
import itertools
import json
import random
import time
from collections import Counter

import pytest

from rlsys.records import PromptRow
from rlsys.tasks import TASKS, countdown, get_task, sort
from rlsys.tasks.base import extract_answer, hash_split
from rlsys.tasks.countdown import CountdownSpec, CountdownTask
from rlsys.tasks.sort import SortSpec, SortTask

CD_ANSWER = json.dumps({"numbers": [7, 2, 6, 5], "target": 31})


def cd(expr: str) -> bool:
    return countdown.verify(f"Answer: {expr}", CD_ANSWER)


# ---- countdown verifier ------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["7*5+2-6", "(7+6)*2+5", "5*(7-2)+6", "2+7*5-6", "6+5*(7-2)"])
def test_countdown_correct_expressions(expr):
    assert cd(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "6*5+7",  # wrong value (37)
        "6*(7-2)-5",  # wrong value (25)
        "6*5+1",  # 1 is not a given number
        "6*5+5-4",  # 4 not given
        "7*7-6*2-6",  # 7 and 6 used twice
        "31",  # a bare number is not an expression (and 31 is not given)
        "7",  # one number only
        "6*5+2/2",  # division is not allowed
        "6**2-5",  # exponent is not allowed
        "-2+6*5+7-6",  # unary minus is not allowed
        "6*5+(2",  # unbalanced
        "6*5+2)",  # unbalanced
        "06*5+2-1",  # leading zero
        "6 5 + 2",  # juxtaposed numbers
        "",  # empty
        "__import__('os').system('true')",
        "lambda: 31",
        "6*5+2-1.0",
        "6x5",
        "31 = 6*5+1",
    ],
)
def test_countdown_rejects_wrong_and_malformed(expr):
    assert cd(expr) is False


def test_countdown_answer_extraction_rules():
    assert countdown.verify("thinking... 6*5\nAnswer: 7*5-6+2", CD_ANSWER)
    assert countdown.verify("Answer: 7*5-6+2\nthen some trailing text", CD_ANSWER)
    assert countdown.verify("Answer: 1+1\nAnswer:  7*5-6+2  ", CD_ANSWER)  # the LAST marker wins
    assert not countdown.verify("Answer: 7*5-6+2\nAnswer: 1+1", CD_ANSWER)
    assert not countdown.verify("7*5-6+2", CD_ANSWER)  # no marker
    assert not countdown.verify("answer: 7*5-6+2", CD_ANSWER)  # marker is case-sensitive
    assert not countdown.verify("Answer:", CD_ANSWER)
    assert not countdown.verify(None, CD_ANSWER)
    assert countdown.verify("Answer: ( 7 - 2 ) * 5 + 6", CD_ANSWER)  # spaces are fine


def test_countdown_negative_intermediates_are_accepted():
    # Left to right, 2-6 = -4 on the way; the verifier accepts any correct expression.
    assert cd("2-6+7*5")
    assert countdown.canonical_answer("Answer: 2-6+7*5", CD_ANSWER) == "7*5+2-6"


def test_countdown_hostile_inputs_are_fast():
    huge = "Answer: " + "(" * 100_000 + "7" + ")" * 100_000
    deep = "Answer: " + "(" * 20 + "7*5-6+2" + ")" * 20  # 47 chars: allowed
    too_deep = "Answer: " + "(" * 29 + "7*5-6+2" + ")" * 29  # 65 chars: over the limit
    power = "Answer: 2**99999"
    mult = "Answer: " + "*".join(["9"] * 1000)
    big_text = "x" * 2_000_000 + "Answer: 7*5-6+2"
    start = time.perf_counter()
    assert not countdown.verify(huge, CD_ANSWER)
    assert not countdown.verify(power, CD_ANSWER)
    assert not countdown.verify(mult, CD_ANSWER)
    assert not countdown.verify("Answer: " + "1" * 10_000, CD_ANSWER)
    assert countdown.verify(deep, CD_ANSWER)
    assert not countdown.verify(too_deep, CD_ANSWER)
    assert countdown.verify(big_text, CD_ANSWER)  # a long preamble is fine
    assert time.perf_counter() - start < 1.0


def test_countdown_bad_answer_json_raises():
    for bad in (
        "not json",
        "[1,2]",
        '{"numbers":[1,2]}',
        '{"numbers":[1],"target":3}',
        '{"numbers":[1,"2"],"target":3}',
        '{"numbers":[1,2],"target":3.5}',
        '{"numbers":[true,2],"target":3}',
    ):
        with pytest.raises(ValueError):
            countdown.verify("Answer: 1+2", bad)


def test_countdown_canonical_forms():
    ans = json.dumps({"numbers": [2, 3, 4, 9], "target": 11})
    same = ["3+4*2", "2*4+3", "(4*2)+3", "3+(2*4)"]
    assert {countdown.canonical_answer(f"Answer: {e}", ans) for e in same} == {"4*2+3"}
    # moving terms across a subtraction: 9-(2-4) is not positive-intermediate but equals 9-2+4
    assert (
        countdown.canonical_answer("Answer: 9-(2-4)", ans)
        == countdown.canonical_answer("Answer: 4+9-2", ans)
        == "9+4-2"
    )
    assert countdown.canonical_answer("Answer: 9+3", ans) is None  # wrong value


def _brute_force(numbers, target):
    """Independent enumeration: every binary tree over every ordered sub-multiset, positive
    intermediates, rendered fully parenthesized and canonicalized by the verifier's parser."""
    found = set()
    ans = json.dumps({"numbers": list(numbers), "target": target})

    def exprs(seq):
        if len(seq) == 1:
            yield str(seq[0]), seq[0]
            return
        for i in range(1, len(seq)):
            for ls, lv in exprs(seq[:i]):
                for rs, rv in exprs(seq[i:]):
                    yield f"({ls}+{rs})", lv + rv
                    yield f"({ls}*{rs})", lv * rv
                    if lv > rv:
                        yield f"({ls}-{rs})", lv - rv

    for k in range(2, len(numbers) + 1):
        for perm in set(itertools.permutations(numbers, k)):
            for text, value in exprs(perm):
                if value == target:
                    found.add(countdown.canonical_answer(f"Answer: {text}", ans))
    return found


@pytest.mark.parametrize("numbers,target", [((7, 2, 6, 5), 31), ((2, 2, 4, 2), 8), ((3, 9, 9, 4), 27)])
def test_countdown_solutions_match_brute_force(numbers, target):
    sols = countdown.enumerate_solutions(numbers, target)
    assert len(sols) == len(set(sols))
    assert set(sols) == _brute_force(numbers, target)
    ans = json.dumps({"numbers": list(numbers), "target": target})
    for s in sols:  # canonical strings are fixed points of canonicalization
        assert countdown.canonical_answer(f"Answer: {s}", ans) == s


def test_countdown_generated_rows_and_reference_solutions():
    rows = countdown.generate("train", 300, seed=3) + countdown.generate("ood", 15, seed=3)
    rng = random.Random(0)
    for row in rows:
        numbers, target = countdown.parse_answer(row.answer)
        sols = countdown.solutions(row)
        assert len(sols) >= 2, row
        assert target not in numbers
        assert dict(row.meta)["num_solutions"] == str(len(sols))
        for _ in range(3):
            ref = countdown.reference_solution(row, rng)
            assert ref.startswith("Answer: ") and countdown.verify(ref, row.answer)
        for s in sols:
            assert countdown.verify(f"Answer: {s}", row.answer)
        assert str(target) in row.messages[0][1] and "Answer:" in row.messages[0][1]
        assert len(row.messages[0][1]) < 120


def test_countdown_prior_is_skewed_and_sampled():
    row = next(r for r in countdown.generate("train", 200, seed=0) if len(countdown.solutions(r)) >= 4)
    prior = countdown.solution_prior(row)
    weights = [w for _, w in prior]
    assert abs(sum(weights) - 1) < 1e-9
    assert all(a > b for a, b in zip(weights, weights[1:]))
    assert weights[0] > 0.6 and weights[-1] < 0.1
    rng = random.Random(1)
    counts = Counter(countdown.reference_solution(row, rng)[len("Answer: ") :] for _ in range(4000))
    top, p_top = prior[0]
    assert abs(counts[top] / 4000 - p_top) < 0.03
    assert counts[prior[-1][0]] > 0  # the rarest mode is still sampled sometimes


def test_countdown_ood_is_structurally_out_of_range():
    for row in countdown.generate("ood", 30, seed=0):
        numbers, _ = countdown.parse_answer(row.answer)
        assert len(numbers) == 5
    for row in countdown.generate("test", 30, seed=0):
        numbers, _ = countdown.parse_answer(row.answer)
        assert len(numbers) == 4 and all(2 <= v <= 9 for v in numbers)
    with pytest.raises(ValueError, match="out of distribution"):
        CountdownTask(CountdownSpec(num_numbers=(4,)), CountdownSpec(num_numbers=(3, 4)))
    # larger numbers instead of more numbers is also a valid ood
    task = CountdownTask(CountdownSpec(num_numbers=(3,)), CountdownSpec(num_numbers=(3,), low=10, high=20))
    assert all(min(countdown.parse_answer(r.answer)[0]) >= 10 for r in task.generate("ood", 5, 0))


# ---- sort verifier -----------------------------------------------------------------------------


def test_sort_verifier():
    ans = "012358"
    assert sort.verify("Answer: 012358", ans)
    assert sort.verify("Answer: 0 1 2 3 5 8", ans)
    assert sort.verify("Answer: 0,1,2,3,5,8\n", ans)
    assert sort.verify("Answer: 1\nAnswer: 012358", ans)
    for bad in (
        "Answer: 012385",
        "Answer: 01235",
        "Answer: 0123588",
        "Answer: 012358a",
        "Answer: [0,1,2,3,5,8]",
        "012358",
        "Answer: ",
        "Answer: " + "0" * 100_000,
    ):
        assert not sort.verify(bad, ans), bad
    with pytest.raises(ValueError):
        sort.verify("Answer: 1", "1a")
    assert sort.canonical_answer("Answer: 0 1 2 3 5 8", ans) == ans


def test_sort_rows_and_reference_solutions():
    rows = sort.generate("train", 300, seed=0)
    rng = random.Random(0)
    for row in rows:
        digits = row.messages[0][1].split("digits of ")[1].split(" ")[0]
        assert row.answer == "".join(sorted(digits)) and 3 <= len(digits) <= 8
        assert sort.verify(sort.reference_solution(row, rng), row.answer)
        assert sort.solutions(row) == [row.answer]
    for row in sort.generate("ood", 50, seed=0):
        assert 9 <= len(row.answer) <= 12
    with pytest.raises(ValueError, match="longer"):
        SortTask(SortSpec(3, 8), SortSpec(8, 12))


# ---- shared contracts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic_and_seed_dependent(name):
    task = get_task(name)
    a = task.generate("train", 50, seed=7)
    assert a == task.generate("train", 50, seed=7)
    assert a != task.generate("train", 50, seed=8)
    assert [r.prompt_id for r in a] == [f"{name}/train/{i:06d}" for i in range(50)]
    assert all(r.messages[0][0] == "user" and len(r.messages) == 1 for r in a)
    assert all(r.task == name and r.verifier == task.verifier for r in a)
    assert task.generate("test", 0, seed=1) == []


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_never_share_a_problem(name):
    task = get_task(name)
    keys = {}
    for split, n in (("train", 1000), ("test", 120), ("ood", 45)):
        rows = task.generate(split, n, seed=0) + task.generate(split, n // 3, seed=1)
        split_keys = {task.problem_key(r) for r in rows}
        assert len({task.problem_key(r) for r in rows[:n]}) == n  # unique inside one call
        keys[split] = split_keys
        if split != "ood":
            assert all(hash_split(name, k, task.test_fraction) == split for k in split_keys)
    assert not keys["train"] & keys["test"]
    assert not keys["ood"] & (keys["train"] | keys["test"])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_verifier_spec_resolves_to_module_function(name):
    task = get_task(name)
    module, func = task.verifier.split(":")
    verify = getattr(importlib.import_module(module), func)
    row = task.generate("test", 1, seed=0)[0]
    assert verify(task.reference_solution(row, random.Random(0)), row.answer) is True
    assert verify("Answer: nope", row.answer) is False


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown task 'nope'.*countdown"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown split"):
        get_task("sort").generate("validation", 3, 0)
    with pytest.raises(ValueError, match="non-negative"):
        get_task("sort").generate("train", -1, 0)
    tiny = SortTask(SortSpec(1, 1), SortSpec(2, 2))  # only 10 one-digit problems exist
    with pytest.raises(ValueError, match="too small"):
        tiny.generate("train", 50, 0)


def test_extract_answer_bounds():
    assert extract_answer("Answer: 12\n", 5) == "12"
    assert extract_answer("Answer: 123456", 5) is None
    assert extract_answer("Answer: 1" + " " * 10 + "\n", 5) == "1"
    assert extract_answer("no marker", 5) is None
    assert extract_answer("Answer: " + "9" * 10_000, 64) is None


def test_hand_made_row_without_solution():
    row = PromptRow("x/1", (("user", "?"),), json.dumps({"numbers": [2, 3], "target": 97}), countdown.VERIFIER)
    assert countdown.solutions(row) == []
    with pytest.raises(ValueError, match="no solution"):
        countdown.reference_solution(row, random.Random(0))
