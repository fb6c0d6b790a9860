"""Word problems and arithmetic from reasoning-gym (``data=gsm_symbolic``, ``data=arithmetic``).

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (Apache-2.0, pinned in the lock) is a
library of procedural generators used by many RLVR projects. Two are wrapped here as built-in tasks:

* ``gsm_symbolic``: GSM8K-derived templates with fresh numbers (reasoning-gym ``gsm_symbolic``);
  integer answers. reasoning-gym supports only ``difficulty`` 1.0, so ood is *unseen templates*: a
  fixed ~15 % of the templates (chosen by a hash of the template index) appear only in ood.
* ``arithmetic``: expressions over + - * / with integer results (reasoning-gym ``basic_arithmetic``);
  train/test 2-3 terms of 1-2 digits, ood 4-5 terms of 2-3 digits.

Rows follow the :mod:`rlsys.tasks.base` contracts: each problem is one reasoning-gym item drawn with a
seed taken from the split's own random stream, keyed by its question text, so train and test are
disjoint by a hash of the question; ood uses harder settings or held-out templates and keeps only
questions whose hash is not a training one (so ood never meets train); the prompt is the
question followed by the instruction to end with ``Answer: <number>``.

Grading (``verify``): the number after the last ``Answer:`` (thousands commas, ``$`` and a final
period stripped), else the last ``\\boxed{}``, else the last number of the completion, compared
exactly, as a fraction, with the integer gold answer. The last fallback is what lets a small
pretrained model that ignores the marker ("-9 - 5 = -14.") earn a reward at all (measured on
SmolLM2-135M: 0-1 of 48 samples use the marker, 8 of 48 end with the right number); a completion
that lists several numbers is graded by its last one only, so spamming numbers does not pay.
Why not reasoning-gym's own ``score_answer``: it gives partial credit (0.1-0.2 for a wrong or
badly formatted answer), while GRPO's success rate and F-GRPO's focal weight need a binary
correct / wrong; and why not math-verify: the gold is always a plain integer, where an exact
numeric compare is as right, ~1000x faster and has no parser to time out.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from rlsys.records import PromptRow
from rlsys.tasks.base import Problem, Task, extract_answer, hash_split

INSTALL_HINT = "pip install reasoning-gym==0.1.25 (it is in requirements/cpu.lock)"
MAX_ANSWER_CHARS = 64
ANSWER_INSTRUCTION = "End your response with a line Answer: <number>"
_BOXED_RE = re.compile(r"\\boxed\{([^{}]{1,64})\}")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# Commas only as thousands separators: "1,234,567" is a number, "4,2" is not.
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _parse_number(text: str) -> Fraction | None:
    """The number ``text`` states (``1,234``, ``$5``, ``-3.50``, ``12.``), else None."""
    t = text.strip().rstrip(".").replace("\\$", "").replace("$", "").strip()
    t = t.strip("*_ ")  # markdown emphasis around the number
    if "," in t:
        if not _THOUSANDS_RE.fullmatch(t):
            return None
        t = t.replace(",", "")
    if not _NUMBER_RE.fullmatch(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _gold(answer: str) -> Fraction:
    value = _parse_number(answer) if isinstance(answer, str) else None
    if value is None:
        raise ValueError(f"reasoning-gym answer must be a number, got {str(answer)[:80]!r}")
    return value


def final_number(completion: str) -> Fraction | None:
    """The completion's final answer as a number: the last ``Answer:`` line; else the last ``\\boxed{}``;
    else the last number in the completion's final 512 characters (lm-eval's "flexible extract": small
    pretrained models state the result, "-9 - 5 = -14", without the marker the prompt asks for)."""
    if not isinstance(completion, str):
        return None
    text = extract_answer(completion, MAX_ANSWER_CHARS)
    if text is None:
        boxes = _BOXED_RE.findall(completion[-4096:])
        text = boxes[-1] if boxes else None
    if text is None:
        numbers = _LAST_NUMBER_RE.findall(completion[-512:])
        text = numbers[-1] if numbers else None
    if text is None:
        return None
    box = _BOXED_RE.fullmatch(text.strip().strip("$"))
    return _parse_number(box.group(1) if box else text)


def canonical_answer(completion: str, answer: str) -> str | None:
    """The gold answer's text when the completion's final number equals it, else None."""
    gold = _gold(answer)
    got = final_number(completion)
    return answer.strip() if got is not None and got == gold else None


def verify(completion: str, answer: str) -> bool:
    """True iff the completion's final number equals ``answer`` exactly. Never raises on any
    completion; ``ValueError`` when ``answer`` is not a number (a data bug)."""
    return canonical_answer(completion, answer) is not None


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(f"the reasoning-gym tasks need the reasoning_gym package: {INSTALL_HINT}") from e
    return reasoning_gym


@dataclass(frozen=True)
class GymSpec:
    """A reasoning-gym generator and its settings for the in-distribution and the ood splits."""

    name: str  # rlsys task name (prompt ids, data=<name>)
    dataset: str  # reasoning-gym dataset name
    config: dict[str, Any] = field(default_factory=dict)
    ood_config: dict[str, Any] = field(default_factory=dict)
    # > 0: this fraction of the generator's templates (``dataset.task_indices``) is ood-only.
    ood_template_fraction: float = 0.0


class GymTask(Task):
    """One reasoning-gym dataset as a built-in task (see the module docstring)."""

    def __init__(self, spec: GymSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.verifier = "rlsys.tasks.rgym:verify"

    def sample_problem(self, split: str, rng: random.Random) -> Problem | None:
        rg = _import_reasoning_gym()
        config = self.spec.ood_config if split == "ood" else self.spec.config
        seed = rng.getrandbits(63)
        dataset = rg.create_dataset(self.spec.dataset, size=1, seed=seed, **config)
        if self.spec.ood_template_fraction > 0:
            template = str(dataset.task_indices[0])
            ood_template = hash_split(f"{self.name}/template", template, self.spec.ood_template_fraction) == "test"
            if ood_template != (split == "ood"):
                return None
        item = dataset[0]
        question = str(item["question"]).strip()
        answer = str(item["answer"]).strip()
        try:
            _gold(answer)
        except ValueError:
            return None  # a non-numeric item: draw again
        key = " ".join(question.split())
        if split == "ood" and self.split_of_key(key) == "train":
            # Harder settings can still produce a training question by chance (gsm_symbolic's number
            # ranges overlap): ood keeps only questions that can never be training rows.
            return None
        return Problem(key, f"{question}\n{ANSWER_INSTRUCTION}", answer, (("rg_seed", str(seed)),))

    def problem_key(self, row: PromptRow) -> str:
        return dict(row.meta)["key"]

    def verify(self, completion: str, answer: str) -> bool:
        return verify(completion, answer)

    def canonical_answer(self, completion: str, answer: str) -> str | None:
        return canonical_answer(completion, answer)

    def solutions(self, row: PromptRow) -> list[str]:
        _gold(row.answer)
        return [row.answer.strip()]

    def reference_solution(self, row: PromptRow, rng: random.Random) -> str:
        """``"Answer: <gold>"`` (one correct answer; ``rng`` unused)."""
        _gold(row.answer)
        return f"Answer: {row.answer.strip()}"


GSM_SYMBOLIC = GymSpec("gsm_symbolic", "gsm_symbolic", ood_template_fraction=0.15)
ARITHMETIC = GymSpec(
    "arithmetic",
    "basic_arithmetic",
    {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    {"min_terms": 4, "max_terms": 5, "min_digits": 2, "max_digits": 3},
)
