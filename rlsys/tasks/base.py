"""What every built-in task provides, and the pieces they share.

A task is a seeded, procedural generator of :class:`~rlsys.records.PromptRow` plus a verifier.

Contracts every task keeps (tests check each):

* ``generate(split, n, seed)`` is a pure function of its arguments: same arguments, same rows,
  in the same order, on every machine and Python process (it uses ``random.Random`` seeded with a
  string, which does not depend on ``PYTHONHASHSEED``).
* Splits never share a problem. ``train`` and ``test`` are told apart by hashing the problem's
  canonical key (:func:`hash_split`), so a problem lands in the same split whatever the seed;
  ``ood`` is separated structurally (more numbers, longer inputs) so it cannot meet either.
* Inside one ``generate`` call every problem is unique, and ``prompt_id`` is
  ``"<task>/<split>/<index:06d>"``.
* ``messages == (("user", prompt_text),)``; the prompt says the response must end with
  ``Answer: <answer>``, and the verifier reads the text after the LAST ``Answer:`` (first line,
  stripped), see :func:`extract_answer`.
* ``verify(completion, answer) -> bool`` never raises on any completion (garbage, huge, hostile
  input all give False, quickly); it raises ``ValueError`` only when ``answer`` itself is
  malformed, which is a data bug the reward pool should report rather than score as wrong.
* ``reference_solution(row, rng)`` returns a full response text that ``verify`` accepts.
* ``solutions(row)`` lists every correct answer in canonical form, most preferred first.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

from rlsys.records import PromptRow

SPLITS = ("train", "test", "ood")
ANSWER_MARKER = "Answer:"
# Fraction of the in-distribution problem space that hashes to the test split.
DEFAULT_TEST_FRACTION = 0.1
# Rejection sampling gives up after this many draws per requested row (plus a constant), so an
# impossible request (more rows than the split holds) fails with a clear error instead of looping.
_ATTEMPTS_PER_ROW = 200
_ATTEMPTS_MIN = 20_000


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def hash_split(task: str, key: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """``"test"`` or ``"train"`` for an in-distribution problem, from a hash of its canonical key.

    The hash (SHA-256, not Python's salted ``hash``) makes the assignment a fixed property of the
    problem, independent of seeds and processes, so train and test can never share a problem.
    """
    digest = hashlib.sha256(f"{task}|{key}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if bucket < test_fraction else "train"


def extract_answer(completion: str, max_chars: int) -> str | None:
    """The text after the LAST ``Answer:`` in ``completion``, first line only, stripped.

    Returns None when there is no marker, the answer is empty, or it is longer than
    ``max_chars`` (so verifiers never parse unbounded input). Cost is linear in the completion.
    """
    if not isinstance(completion, str):
        return None
    pos = completion.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    rest = completion[pos + len(ANSWER_MARKER) :]
    # Look only at a bounded prefix: the first line of a valid answer is short.
    head = rest[: max_chars + 256]
    line = head.split("\n", 1)[0].strip()
    if not line or len(line) > max_chars:
        return None
    if "\n" not in head and len(rest) > len(head):
        # The first line continues past the bounded prefix: too long to be an answer.
        return None
    return line


def make_rng(task: str, split: str, seed: int) -> random.Random:
    """A generator seeded by (task, split, seed); string seeding is stable across processes."""
    return random.Random(f"rlsys.tasks/{task}/{split}/{int(seed)}")


@dataclass(frozen=True)
class Problem:
    """One generated problem before it becomes a row.

    ``key`` is canonical (two presentations of the same problem share it); it decides the split
    and de-duplicates problems.
    """

    key: str
    prompt: str
    answer: str
    meta: tuple[tuple[str, str], ...] = ()


class Task(ABC):
    """A procedurally generated task with a verifier. Subclasses fill in the abstract methods."""

    #: registry name, also the first part of every prompt_id
    name: str = ""
    #: "module:function" spec the reward pool resolves to :meth:`verify`'s module-level twin
    verifier: str = ""
    test_fraction: float = DEFAULT_TEST_FRACTION

    # ---- what a subclass provides -------------------------------------------------------------

    @abstractmethod
    def sample_problem(self, split: str, rng: random.Random) -> Problem | None:
        """Draw one problem of ``split``'s distribution (``"ood"`` or in-distribution).

        May return None for a draw that yields no valid problem (the caller draws again). For
        ``train``/``test`` the caller keeps only problems whose key hashes to the split.
        """

    @abstractmethod
    def verify(self, completion: str, answer: str) -> bool:
        """True iff the completion's final answer is correct for ``answer`` (see module doc)."""

    @abstractmethod
    def canonical_answer(self, completion: str, answer: str) -> str | None:
        """The canonical form of the completion's final answer when it is correct, else None.

        Distinct canonical answers are distinct solution modes (countdown has several per prompt,
        single-answer tasks exactly one); evaluation counts them to see which modes survive RL.
        """

    @abstractmethod
    def solutions(self, row: PromptRow) -> list[str]:
        """Every correct answer for ``row`` in canonical form, most preferred first."""

    @abstractmethod
    def reference_solution(self, row: PromptRow, rng: random.Random) -> str:
        """A full response text for supervised warm-up; ``verify`` accepts it."""

    @abstractmethod
    def problem_key(self, row: PromptRow) -> str:
        """The canonical key of ``row``'s problem (equal keys = the same problem)."""

    # ---- shared -------------------------------------------------------------------------------

    def split_of_key(self, key: str) -> str:
        """The in-distribution split (``train``/``test``) that a problem key belongs to."""
        return hash_split(self.name, key, self.test_fraction)

    def generate(self, split: str, n: int, seed: int) -> list[PromptRow]:
        """``n`` unique rows of ``split``, a pure function of (split, n, seed).

        Raises ``ValueError`` for an unknown split, a negative ``n``, or when the split's problem
        space cannot supply ``n`` unique problems.
        """
        check_split(split)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{self.name}: n must be a non-negative int, got {n!r}")
        rng = make_rng(self.name, split, seed)
        rows: list[PromptRow] = []
        seen: set[str] = set()
        attempts = 0
        max_attempts = _ATTEMPTS_MIN + _ATTEMPTS_PER_ROW * n
        while len(rows) < n:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"{self.name}/{split}: found only {len(rows)} unique problems of the "
                    f"{n} requested after {max_attempts} draws; the split's problem space is "
                    f"too small for this n (ask for fewer rows or widen the task's ranges)"
                )
            problem = self.sample_problem(split, rng)
            if problem is None or problem.key in seen:
                continue
            if split != "ood" and self.split_of_key(problem.key) != split:
                continue
            seen.add(problem.key)
            rows.append(
                PromptRow(
                    prompt_id=f"{self.name}/{split}/{len(rows):06d}",
                    messages=(("user", problem.prompt),),
                    answer=problem.answer,
                    verifier=self.verifier,
                    task=self.name,
                    meta=(("split", split), ("seed", str(int(seed))), ("key", problem.key)) + problem.meta,
                )
            )
        return rows
