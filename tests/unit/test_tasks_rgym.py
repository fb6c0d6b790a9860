"""The reasoning-gym tasks (rlsys.tasks.rgym): grading rules and the split guarantees specific to them
(the generic task contracts run for every registered task in test_tasks.py)."""

from __future__ import annotations

import re

import pytest

from rlsys.tasks import get_task, rgym


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("So 5 - 3 = 2.\nAnswer: 2", "2", True),
        ("Answer: -4", "-4", True),
        ("Answer: 1,234", "1234", True),
        ("Answer: $1,234.", "1234", True),
        ("Answer: \\$56", "56", True),
        ("Answer: **42**", "42", True),
        ("Answer: 42.0", "42", True),
        ("The total is \\boxed{288}.", "288", True),
        ("Answer: 41", "42", False),
        ("Answer: 42 apples", "42", False),  # the prompt asks for a number only
        ("42", "42", True),  # no marker: the last number
        ("-9 - 5 = -14.", "-14", True),
        ("-9 - 5 = -14. Then 3", "-14", False),  # the last number only
        ("Answer: 41\nso 42", "42", False),  # the marker wins over later numbers
        ("Answer: 4/2", "2", False),
        ("Answer: 4,2", "42", False),  # a comma only as a thousands separator
        ("Answer: 1,234,567", "1234567", True),
        ("", "2", False),
        ("Answer: " + "9" * 10_000, "9", False),
    ],
)
def test_grading(completion, answer, expected):
    assert rgym.verify(completion, answer) is expected


def test_garbage_never_raises_but_a_bad_gold_answer_does():
    for junk in (None, 5, "Answer:", "Answer: \\boxed{", "\x00" * 100, "Answer: 1e999999"):
        assert rgym.verify(junk, "3") is False
    with pytest.raises(ValueError, match="must be a number"):
        rgym.verify("Answer: 3", "three")


@pytest.mark.parametrize("name", ["gsm_symbolic", "arithmetic"])
def test_prompts_ask_for_the_format_the_verifier_reads(name):
    task = get_task(name)
    rows = task.generate("train", 20, seed=3)
    assert all(r.messages[0][1].endswith(rgym.ANSWER_INSTRUCTION) for r in rows)
    assert all(task.verify(task.reference_solution(r, None), r.answer) for r in rows)
    assert rows == task.generate("train", 20, seed=3)
    assert rows != task.generate("train", 20, seed=4)


def test_gsm_ood_uses_templates_train_never_sees():
    task = get_task("gsm_symbolic")
    train_q = {dict(r.meta)["key"] for r in task.generate("train", 300, seed=0)}
    ood = task.generate("ood", 100, seed=0)
    assert not train_q & {dict(r.meta)["key"] for r in ood}
    import reasoning_gym

    def template(row):
        return reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=int(dict(row.meta)["rg_seed"])).task_indices[0]

    train_templates = {template(r) for r in task.generate("train", 300, seed=0)}
    ood_templates = {template(r) for r in ood}
    assert ood_templates and not train_templates & ood_templates


def test_arithmetic_ood_is_longer():
    task = get_task("arithmetic")

    def terms(row):
        return len(re.findall(r"\d+", row.messages[0][1].split("\n")[0]))

    assert max(terms(r) for r in task.generate("train", 100, seed=0)) <= 3
    assert min(terms(r) for r in task.generate("ood", 100, seed=0)) >= 4
