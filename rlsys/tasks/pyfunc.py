"""Pyfunc: write a small Python function. The code-execution task (rewards run model-written code).

Prompt / answer format::

    user:       "Write a Python function f(x) that takes an integer x and returns 3*x + 2. ..."
    response:   "```python\\ndef f(x):\\n    return 3*x + 2\\n```"
    row.answer: '{"formula": "3*x + 2", "cases": [[-3, -7], [0, 2], ...]}'

The verifier takes the last fenced code block of the completion and runs it with
:func:`rlsys.rewards.code_exec.run_code` against tests generated from the answer's cases (the
answer holds only integers and the formula, never code, so a dataset row cannot inject code): every
``f(x)`` must return an ``int`` (exactly; an object claiming equality does not pass) equal to the
expected value. A wrong or crashing answer is False (reward 0, status ok); code that times out, trips
the sandbox (fork, sockets, files outside its scratch dir, ...) or dies is graded 0 with status
``timeout`` / ``error`` through :class:`~rlsys.rewards.verifiers.GradeFailure`, so the reward pool
counts it apart from wrong answers.

Splits: ``train``/``test`` are ``a*x + b`` and ``±x*x + a*x + b`` with ``|a|, |b| <= 20`` (about
5000 problems), split by a hash of the formula; ``ood`` is ``c*x*x + a*x + b`` with ``c`` in 2..5.
This task is small on purpose: it exists to exercise the code-execution reward path end to end.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from rlsys.records import PromptRow
from rlsys.tasks.base import Problem, Task

NAME = "pyfunc"
VERIFIER = "rlsys.tasks.pyfunc:verify"
CODE_TIMEOUT_S = 2.0  # per run; inside a reward sandbox job also capped by the job's own timeout
CODE_MEMORY_MB = 256
_INPUTS = (-3, -1, 0, 1, 2, 5, 11)
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MAX_ANSWER_CHARS = 4096


def _term(coefficient: int, power: str) -> str:
    if coefficient in (1, -1):
        return power if coefficient == 1 else "-" + power
    return f"{coefficient}*{power}"


def _formula(c: int, a: int, b: int) -> str:
    """``c*x*x + a*x + b`` written the way a person would (zero terms dropped, ``- 3`` not ``+ -3``)."""
    parts = []
    if c:
        parts.append(_term(c, "x*x"))
    if a:
        parts.append(_term(abs(a), "x") if parts else _term(a, "x"))
        if parts[:-1] and a < 0:
            parts[-1] = "- " + parts[-1]
        elif parts[:-1]:
            parts[-1] = "+ " + parts[-1]
    if b or not parts:
        parts.append(str(b) if not parts else (f"- {-b}" if b < 0 else f"+ {b}"))
    return " ".join(parts)


def _evaluate(c: int, a: int, b: int, x: int) -> int:
    return c * x * x + a * x + b


def _parse_answer(answer: str) -> tuple[str, list[tuple[int, int]]]:
    """``(formula, cases)`` from a row's answer; ValueError when it is malformed (a data bug)."""
    if not isinstance(answer, str) or len(answer) > _MAX_ANSWER_CHARS:
        raise ValueError(f"pyfunc answer must be a JSON string of at most {_MAX_ANSWER_CHARS} chars")
    try:
        data = json.loads(answer)
        formula = data["formula"]
        cases = [(x, y) for x, y in data["cases"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"pyfunc answer is not {{'formula', 'cases'}} JSON: {answer[:80]!r} ({exc})") from None
    if not isinstance(formula, str) or not cases:
        raise ValueError(f"pyfunc answer needs a formula and at least one case: {answer[:80]!r}")
    for x, y in cases:
        if type(x) is not int or type(y) is not int:
            raise ValueError(f"pyfunc answer cases must be integer pairs, got {x!r}, {y!r}")
    return formula, cases


def tests_source(cases: list[tuple[int, int]]) -> str:
    """The test code run after the answer: exact ``int`` results equal to the expected ones."""
    return (
        f"for _x, _y in {cases!r}:\n"
        "    _r = f(_x)\n"
        "    assert type(_r) is int and _r == _y, f'f({_x}) returned a wrong value, expected {_y}'\n"
    )


def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python ... ```, or an unlabelled one), or None."""
    if not isinstance(completion, str):
        return None
    blocks = _FENCE_RE.findall(completion)
    return blocks[-1] if blocks else None


def verify(completion: str, answer: str) -> bool:
    """The reward spec ``rlsys.tasks.pyfunc:verify``: True iff the code passes the answer's tests.

    A completion without a code block, or whose code fails or raises, is False. Code that times
    out, trips the sandbox or kills its process raises GradeFailure (graded 0 with that status).
    Raises ValueError when ``answer`` is malformed.
    """
    from rlsys.rewards.code_exec import run_code
    from rlsys.rewards.verifiers import GradeFailure

    _, cases = _parse_answer(answer)
    code = extract_code(completion)
    if code is None:
        return False
    passed, status, detail = run_code(code, tests_source(cases), CODE_TIMEOUT_S, CODE_MEMORY_MB)
    if status != "ok":
        raise GradeFailure(status, detail)
    return passed


@dataclass(frozen=True)
class PyFuncSpec:
    """Coefficients ``a``, ``b`` uniform in ``-max_coef..max_coef``; ``c`` (the x*x one) from ``c_values``."""

    max_coef: int = 20
    c_values: tuple[int, ...] = (-1, 0, 1)


TRAIN_SPEC = PyFuncSpec()
OOD_SPEC = PyFuncSpec(c_values=(2, 3, 4, 5))


class PyFuncTask(Task):
    """``f(x)`` from a formula; ``verify`` runs the model's code in the code-execution sandbox."""

    name = NAME
    verifier = VERIFIER

    def __init__(self, spec: PyFuncSpec = TRAIN_SPEC, ood_spec: PyFuncSpec = OOD_SPEC) -> None:
        if set(spec.c_values) & set(ood_spec.c_values):
            raise ValueError("pyfunc ood_spec.c_values must not overlap spec.c_values")
        self.spec = spec
        self.ood_spec = ood_spec

    def sample_problem(self, split: str, rng: random.Random) -> Problem | None:
        spec = self.ood_spec if split == "ood" else self.spec
        c = rng.choice(spec.c_values)
        a = rng.randint(-spec.max_coef, spec.max_coef)
        b = rng.randint(-spec.max_coef, spec.max_coef)
        if c == 0 and a == 0:
            return None  # a constant function: not worth a prompt
        formula = _formula(c, a, b)
        cases = [[x, _evaluate(c, a, b, x)] for x in _INPUTS]
        prompt = (
            f"Write a Python function f(x) that takes an integer x and returns {formula} "
            "(an int). Reply with the function in a ```python code block."
        )
        return Problem(formula, prompt, json.dumps({"formula": formula, "cases": cases}))

    def problem_key(self, row: PromptRow) -> str:
        return _parse_answer(row.answer)[0]

    def verify(self, completion: str, answer: str) -> bool:
        """Like the module's :func:`verify` but False (never GradeFailure) for any failed run."""
        from rlsys.rewards.verifiers import GradeFailure

        try:
            return verify(completion, answer)
        except GradeFailure:
            return False

    def canonical_answer(self, completion: str, answer: str) -> str | None:
        """The formula when the code passes (one correct mode per prompt), else None."""
        return _parse_answer(answer)[0] if self.verify(completion, answer) else None

    def solutions(self, row: PromptRow) -> list[str]:
        return [_parse_answer(row.answer)[0]]

    def reference_solution(self, row: PromptRow, rng: random.Random) -> str:
        """A fenced ``def f(x): return <formula>`` (``rng`` is unused: there is one answer)."""
        formula = _parse_answer(row.answer)[0]
        return f"```python\ndef f(x):\n    return {formula}\n```"


TASK = PyFuncTask()


def generate(split: str, n: int, seed: int) -> list[PromptRow]:
    """``TASK.generate``: n unique pyfunc rows of ``split``, deterministic in ``seed``."""
    return TASK.generate(split, n, seed)
