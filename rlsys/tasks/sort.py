"""Sort: put a string of digits in ascending order. The single-answer control task.

Every prompt has exactly one correct answer (the paper's Maze-like control, where there are no
rare correct modes to lose), so F-GRPO should match GRPO here.

Prompt / answer format::

    user:       "Sort the digits of 583102 in ascending order. End with Answer: <digits>"
    response:   "Answer: 012358"
    row.answer: "012358"

The verifier reads the text after the LAST ``Answer:`` (first line), accepts digits with optional
spaces or commas between them (``0 1 2 3 5 8`` is the same answer), and compares the digits.

Splits: ``train``/``test`` inputs have 3..8 digits and are split by a hash of the sorted digits
(the answer), so no test answer is ever a training answer; ``ood`` inputs have 9..12 digits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlsys.records import PromptRow
from rlsys.tasks.base import Problem, Task, extract_answer

NAME = "sort"
VERIFIER = "rlsys.tasks.sort:verify"
# Longest final answer line the verifier looks at (digits plus separators).
MAX_ANSWER_CHARS = 64
_ALLOWED_CHARS = frozenset("0123456789 ,")
_MAX_DIGITS = 32


def _normalize(text: str) -> str | None:
    """The digits of an answer line, or None when it holds anything but digits, spaces, commas."""
    if not set(text) <= _ALLOWED_CHARS:
        return None
    digits = text.replace(" ", "").replace(",", "")
    return digits or None


def _check_answer(answer: str) -> str:
    if not isinstance(answer, str) or not answer.isascii() or not answer.isdigit():
        raise ValueError(f"sort answer must be a non-empty string of digits, got {str(answer)[:80]!r}")
    if len(answer) > _MAX_DIGITS:
        raise ValueError(f"sort answer has {len(answer)} digits, more than {_MAX_DIGITS}")
    return answer


def canonical_answer(completion: str, answer: str) -> str | None:
    """The completion's digits when they equal ``answer`` (the one correct answer), else None."""
    expected = _check_answer(answer)
    text = extract_answer(completion, MAX_ANSWER_CHARS)
    if text is None:
        return None
    digits = _normalize(text)
    return digits if digits == expected else None


def verify(completion: str, answer: str) -> bool:
    """True iff the final answer's digits equal ``answer`` (separators ignored).

    Never raises on any completion; raises ``ValueError`` when ``answer`` is not a digit string.
    """
    return canonical_answer(completion, answer) is not None


@dataclass(frozen=True)
class SortSpec:
    """Input lengths drawn uniformly from ``min_len..max_len``; digits uniform in 0..9."""

    min_len: int = 3
    max_len: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len <= _MAX_DIGITS:
            raise ValueError(
                f"SortSpec needs 1 <= min_len <= max_len <= {_MAX_DIGITS}, got {self.min_len}..{self.max_len}"
            )


TRAIN_SPEC = SortSpec()
OOD_SPEC = SortSpec(min_len=9, max_len=12)


class SortTask(Task):
    """Digit sorting with ``spec`` for train/test and longer inputs (``ood_spec``) for ood."""

    name = NAME
    verifier = VERIFIER

    def __init__(self, spec: SortSpec = TRAIN_SPEC, ood_spec: SortSpec = OOD_SPEC) -> None:
        if ood_spec.min_len <= spec.max_len:
            raise ValueError(
                f"sort ood_spec must be longer than any train input: ood min_len "
                f"{ood_spec.min_len} <= train max_len {spec.max_len}"
            )
        self.spec = spec
        self.ood_spec = ood_spec

    def sample_problem(self, split: str, rng: random.Random) -> Problem | None:
        spec = self.ood_spec if split == "ood" else self.spec
        length = rng.randint(spec.min_len, spec.max_len)
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        answer = "".join(sorted(digits))
        prompt = f"Sort the digits of {digits} in ascending order. End with Answer: <digits>"
        # Keyed by the answer: inputs that are permutations of each other are one problem, so a
        # test answer is never seen in training.
        return Problem(answer, prompt, answer)

    def problem_key(self, row: PromptRow) -> str:
        return _check_answer(row.answer)

    def verify(self, completion: str, answer: str) -> bool:
        return verify(completion, answer)

    def canonical_answer(self, completion: str, answer: str) -> str | None:
        return canonical_answer(completion, answer)

    def solutions(self, row: PromptRow) -> list[str]:
        return [_check_answer(row.answer)]

    def reference_solution(self, row: PromptRow, rng: random.Random) -> str:
        """``"Answer: <sorted digits>"`` (``rng`` is unused: there is one answer)."""
        return f"Answer: {_check_answer(row.answer)}"


TASK = SortTask()


def generate(split: str, n: int, seed: int) -> list[PromptRow]:
    """``TASK.generate``: n unique sort rows of ``split``, deterministic in ``seed``."""
    return TASK.generate(split, n, seed)


def solutions(row: PromptRow) -> list[str]:
    """``TASK.solutions``: the one correct answer."""
    return TASK.solutions(row)


def reference_solution(row: PromptRow, rng: random.Random) -> str:
    """``TASK.reference_solution``: ``"Answer: <sorted digits>"``."""
    return TASK.reference_solution(row, rng)
