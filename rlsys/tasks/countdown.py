"""Countdown: reach a target from a few small numbers. The multi-solution task.

Rules (stated in every prompt): combine the given numbers with ``+ - *`` and parentheses to make
the target; each given number may be used AT MOST once (a sub-multiset, at least two numbers).
No division, no exponent, no unary minus, no other characters. "At most once" is deliberate: it
gives every prompt several correct expressions (3.2 on average for the train split), which is where
F-GRPO differs from GRPO (a common correct mode and rare correct ones).

Prompt / answer format::

    user:      "Use the numbers 7 2 6 5 to make 31. Use + - * ( ), each number at most once.
                End with Answer: <expression>"
    response:  "Answer: 7*5+2-6"      (only the text after the LAST "Answer:" is graded)
    row.answer: '{"numbers":[7,2,6,5],"target":31}'
    solutions:  7*5+2-6 (p = 0.73), (7+6)*2+5 (p = 0.18), 5*(7-2)+6 (p = 0.08)

Canonical form. Two expressions are the same solution when they agree up to commutativity and
associativity of + and *, and moving terms across a subtraction (``a-(b-c)`` == ``a-b+c``). The
canonical string flattens sums and products, orders terms and factors by decreasing value (ties by
text), writes positive terms first, and parenthesizes only sums inside products: ``(6+2)*5-7``.
:func:`solutions` enumerates every canonical solution whose intermediate results are all positive
(the classic Countdown rule; the verifier itself accepts any correct expression, negative
intermediates included).

SFT prior. :func:`solution_prior` ranks a prompt's solutions by a fixed preference for simple,
left-to-right forms -- key (number of parentheses, numbers used, length, text) -- and gives rank r
the probability ``(1/r^2) / sum_k (1/k^2)``. So the first form gets about 60-80 % of the mass and
the last ones a few percent or less: the rare correct modes an RL run can keep or lose.
:func:`reference_solution` samples from that prior.

Splits: ``train``/``test`` use 4 numbers from 2..9 and a target in 1..99 reachable in at least 2
canonical ways, split by a hash of (sorted numbers, target); ``ood`` uses 5 numbers (one more than
training), so it can never coincide with an in-distribution problem.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from rlsys.records import PromptRow
from rlsys.tasks.base import Problem, Task, extract_answer

NAME = "countdown"
VERIFIER = "rlsys.tasks.countdown:verify"
# Longest final answer the verifier parses; 5 one- or two-digit numbers with parentheses and
# spaces fit easily. Longer answers are rejected before parsing.
MAX_ANSWER_CHARS = 64
# A row's numbers and target must stay small so verification and enumeration stay cheap.
_MAX_NUMBERS = 6
_MAX_ABS_VALUE = 10**6

# ---- expression nodes ---------------------------------------------------------------------------
# A node is a plain tuple (text, value, kind, first, second), hashed and cached cheaply:
#   kind "n": a number literal                      first = second = None
#   kind "s": a flattened sum  pos - neg            first = positive terms, second = negative terms
#   kind "p": a flattened product                   first = factors, second = None
# Terms of a sum are never sums and factors of a product never products (flattening), so the
# canonical text of a node is a function of its mathematical shape up to the stated equivalences.
_Node = tuple


def _leaf(value: int) -> _Node:
    return (str(value), value, "n", None, None)


def _order(node: _Node) -> tuple[int, str]:
    return (-node[1], node[0])


def _make_sum(pos: tuple, neg: tuple) -> _Node:
    pos = tuple(sorted(pos, key=_order))
    neg = tuple(sorted(neg, key=_order))
    text = "+".join(t[0] for t in pos) + "".join("-" + t[0] for t in neg)
    value = sum(t[1] for t in pos) - sum(t[1] for t in neg)
    return (text, value, "s", pos, neg)


def _make_product(factors: tuple) -> _Node:
    factors = tuple(sorted(factors, key=_order))
    text = "*".join(f"({f[0]})" if f[2] == "s" else f[0] for f in factors)
    value = 1
    for f in factors:
        value *= f[1]
    return (text, value, "p", factors, None)


def _pos(x: _Node) -> tuple:
    return x[3] if x[2] == "s" else (x,)


def _neg(x: _Node) -> tuple:
    return x[4] if x[2] == "s" else ()


def _factors(x: _Node) -> tuple:
    return x[3] if x[2] == "p" else (x,)


def _add(x: _Node, y: _Node) -> _Node:
    return _make_sum(_pos(x) + _pos(y), _neg(x) + _neg(y))


def _sub(x: _Node, y: _Node) -> _Node:
    return _make_sum(_pos(x) + _neg(y), _neg(x) + _pos(y))


def _mul(x: _Node, y: _Node) -> _Node:
    return _make_product(_factors(x) + _factors(y))


# ---- safe parser (never eval) --------------------------------------------------------------------
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*()]))")
_ALLOWED_CHARS = frozenset("0123456789+-*() ")


class _ParseError(Exception):
    pass


class _Parser:
    """Recursive descent over ``expr := term (('+'|'-') term)*``, ``term := factor ('*' factor)*``,
    ``factor := NUMBER | '(' expr ')'``. Input length is bounded by the caller, so recursion
    depth (one level per parenthesis) is too."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise _ParseError(f"unexpected character at {pos}")
            if m.group(1) is not None:
                digits = m.group(1)
                if len(digits) > 1 and digits[0] == "0":
                    raise _ParseError("number with a leading zero")
                self.tokens.append(("num", digits))
            else:
                self.tokens.append(("op", m.group(2)))
            pos = m.end()
        self.i = 0
        self.literals: list[int] = []

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def parse(self) -> _Node:
        node = self._expr()
        if self.i != len(self.tokens):
            raise _ParseError("trailing tokens")
        return node

    def _expr(self) -> _Node:
        node = self._term()
        while (tok := self._peek()) is not None and tok[1] in ("+", "-"):
            self.i += 1
            rhs = self._term()
            node = _add(node, rhs) if tok[1] == "+" else _sub(node, rhs)
        return node

    def _term(self) -> _Node:
        node = self._factor()
        while (tok := self._peek()) is not None and tok[1] == "*":
            self.i += 1
            node = _mul(node, self._factor())
        return node

    def _factor(self) -> _Node:
        tok = self._peek()
        if tok is None:
            raise _ParseError("unexpected end")
        self.i += 1
        if tok[0] == "num":
            value = int(tok[1])
            self.literals.append(value)
            return _leaf(value)
        if tok[1] == "(":
            node = self._expr()
            close = self._peek()
            if close is None or close[1] != ")":
                raise _ParseError("missing ')'")
            self.i += 1
            return node
        raise _ParseError(f"unexpected {tok[1]!r}")


def _parse_expression(text: str) -> tuple[_Node, list[int]] | None:
    """(canonical node, literals used) for a well-formed expression, None for anything else."""
    if len(text) > MAX_ANSWER_CHARS or not set(text) <= _ALLOWED_CHARS:
        return None
    try:
        parser = _Parser(text)
        node = parser.parse()
    except (_ParseError, RecursionError):
        return None
    return node, parser.literals


# ---- the row's answer --------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def parse_answer(answer: str) -> tuple[tuple[int, ...], int]:
    """(numbers, target) from a row's answer JSON ``{"numbers": [...], "target": N}``.

    Raises ``ValueError`` naming the problem when ``answer`` is not such an object (a data bug).
    """
    try:
        obj = json.loads(answer)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"countdown answer is not JSON ({exc}): {str(answer)[:80]!r}") from None
    if not isinstance(obj, dict) or set(obj) != {"numbers", "target"}:
        raise ValueError(f'countdown answer must be {{"numbers": [int, ...], "target": int}}, got {answer[:80]!r}')
    numbers, target = obj["numbers"], obj["target"]
    ok_numbers = (
        isinstance(numbers, list)
        and 2 <= len(numbers) <= _MAX_NUMBERS
        and all(type(v) is int and 0 < v <= _MAX_ABS_VALUE for v in numbers)
    )
    if not ok_numbers or type(target) is not int or abs(target) > _MAX_ABS_VALUE:
        raise ValueError(
            f"countdown answer needs 2..{_MAX_NUMBERS} positive int numbers and an int target "
            f"(|values| <= {_MAX_ABS_VALUE}), got {answer[:80]!r}"
        )
    return tuple(numbers), target


def _check(completion: str, answer: str) -> _Node | None:
    """The canonical node of a correct final answer, None when it is wrong or malformed."""
    numbers, target = parse_answer(answer)
    text = extract_answer(completion, MAX_ANSWER_CHARS)
    if text is None:
        return None
    parsed = _parse_expression(text)
    if parsed is None:
        return None
    node, literals = parsed
    # Multiset check before trusting the value: each literal must be a given number, used at most
    # as many times as it was given; at least two numbers (the target is never a given number, and
    # a bare number is not an expression).
    if len(literals) < 2 or Counter(literals) - Counter(numbers):
        return None
    return node if node[1] == target else None


def verify(completion: str, answer: str) -> bool:
    """True iff the text after the last ``Answer:`` is a correct countdown expression.

    Correct: only digits, ``+ - * ( )`` and spaces, at most :data:`MAX_ANSWER_CHARS` characters,
    well formed, uses at least two of the given numbers with each used at most as often as given,
    and evaluates exactly to the target. Never evaluates code; never raises on any completion.
    Raises ``ValueError`` when ``answer`` is not a countdown answer JSON.
    """
    return _check(completion, answer) is not None


def canonical_answer(completion: str, answer: str) -> str | None:
    """The canonical form of the completion's expression when it is correct, else None.

    Two correct completions with the same canonical form are the same solution "mode"; counting
    distinct canonical answers measures how many modes a policy still finds.
    """
    node = _check(completion, answer)
    return None if node is None else node[0]


# ---- enumeration -------------------------------------------------------------------------------


def _splits(ms: tuple[int, ...]):
    """Unordered splits of a sorted multiset into two non-empty sub-multisets, without repeats."""
    n = len(ms)
    seen = set()
    for mask in range(1, (1 << n) - 1):
        if not mask & 1:  # element 0 always goes left: each unordered split is visited once
            continue
        left = tuple(ms[i] for i in range(n) if mask >> i & 1)
        right = tuple(ms[i] for i in range(n) if not mask >> i & 1)
        if (left, right) not in seen:
            seen.add((left, right))
            yield left, right


@lru_cache(maxsize=4096)
def _exact(ms: tuple[int, ...]) -> tuple[_Node, ...]:
    """Every canonical expression using exactly the sorted multiset ``ms``, positive throughout."""
    if len(ms) == 1:
        return (_leaf(ms[0]),)
    out: dict[str, _Node] = {}
    for left, right in _splits(ms):
        for x in _exact(left):
            for y in _exact(right):
                cands = [_add(x, y), _mul(x, y)]
                if x[1] > y[1]:
                    cands.append(_sub(x, y))
                elif y[1] > x[1]:
                    cands.append(_sub(y, x))
                for node in cands:
                    out.setdefault(node[0], node)
    return tuple(out.values())


def _preference(text: str) -> tuple[int, int, int, str]:
    # Simple, left-to-right forms first: fewer parentheses, fewer numbers, shorter.
    return (text.count("("), len(re.findall(r"\d+", text)), len(text), text)


@lru_cache(maxsize=4096)
def _solutions_by_value(ms: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    """value -> canonical expressions (>= 2 numbers, sub-multisets of ``ms``), preferred first."""
    by_value: dict[int, set[str]] = {}
    n = len(ms)
    subs = {tuple(ms[i] for i in range(n) if mask >> i & 1) for mask in range(1, 1 << n)}
    for sub in subs:
        if len(sub) < 2:
            continue
        for node in _exact(sub):
            by_value.setdefault(node[1], set()).add(node[0])
    return {v: tuple(sorted(s, key=_preference)) for v, s in by_value.items()}


def enumerate_solutions(numbers: tuple[int, ...] | list[int], target: int) -> list[str]:
    """All canonical solutions for (numbers, target), most preferred first (see module doc)."""
    return list(_solutions_by_value(tuple(sorted(numbers))).get(target, ()))


def prior_weights(k: int) -> list[float]:
    """The SFT prior over ``k`` ranked solutions: rank r gets (1/r^2) / sum_j (1/j^2)."""
    raw = [1.0 / (r * r) for r in range(1, k + 1)]
    total = sum(raw)
    return [w / total for w in raw]


# ---- the task ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountdownSpec:
    """One distribution of countdown problems.

    ``num_numbers``: how many numbers a prompt gives (drawn uniformly from the tuple);
    numbers are drawn uniformly from ``low..high`` (repeats allowed); the target is drawn
    uniformly among values in ``target_low..target_high`` that are not a given number and have at
    least ``min_solutions`` canonical solutions.
    """

    num_numbers: tuple[int, ...] = (4,)
    low: int = 2
    high: int = 9
    target_low: int = 1
    target_high: int = 99
    min_solutions: int = 2

    def __post_init__(self) -> None:
        if not self.num_numbers or not all(2 <= k <= 5 for k in self.num_numbers):
            # 6+ numbers make enumeration slow (seconds per prompt) for a verifier-side task.
            raise ValueError(f"CountdownSpec.num_numbers must be in 2..5, got {self.num_numbers}")
        if not 1 <= self.low <= self.high <= 999:
            raise ValueError(f"CountdownSpec needs 1 <= low <= high <= 999, got {self.low}..{self.high}")
        if self.target_low > self.target_high or self.min_solutions < 1:
            raise ValueError(
                f"CountdownSpec needs target_low <= target_high and min_solutions >= 1, got "
                f"{self.target_low}..{self.target_high}, min_solutions={self.min_solutions}"
            )


TRAIN_SPEC = CountdownSpec()
# One more number than training: structurally disjoint from train/test.
OOD_SPEC = CountdownSpec(num_numbers=(5,))


class CountdownTask(Task):
    """Countdown with ``spec`` for train/test and ``ood_spec`` for ood (see module doc)."""

    name = NAME
    verifier = VERIFIER

    def __init__(self, spec: CountdownSpec = TRAIN_SPEC, ood_spec: CountdownSpec = OOD_SPEC) -> None:
        more_numbers = min(ood_spec.num_numbers) > max(spec.num_numbers)
        larger_numbers = ood_spec.low > spec.high
        if not (more_numbers or larger_numbers):
            raise ValueError(
                "countdown ood_spec must be structurally out of distribution: more numbers than "
                f"any train prompt (ood {ood_spec.num_numbers} vs train {spec.num_numbers}) or "
                f"numbers above the train range (ood low {ood_spec.low} vs train high {spec.high})"
            )
        self.spec = spec
        self.ood_spec = ood_spec

    def sample_problem(self, split: str, rng: random.Random) -> Problem | None:
        spec = self.ood_spec if split == "ood" else self.spec
        k = rng.choice(spec.num_numbers)
        numbers = [rng.randint(spec.low, spec.high) for _ in range(k)]
        by_value = _solutions_by_value(tuple(sorted(numbers)))
        targets = sorted(
            v
            for v, sols in by_value.items()
            if spec.target_low <= v <= spec.target_high and v not in numbers and len(sols) >= spec.min_solutions
        )
        if not targets:
            return None
        target = rng.choice(targets)
        shown = " ".join(str(v) for v in numbers)
        prompt = (
            f"Use the numbers {shown} to make {target}. Use + - * ( ), each number at most once. "
            f"End with Answer: <expression>"
        )
        answer = json.dumps({"numbers": numbers, "target": target}, separators=(",", ":"))
        key = ",".join(str(v) for v in sorted(numbers)) + f"={target}"
        return Problem(key, prompt, answer, (("num_solutions", str(len(by_value[target]))),))

    def problem_key(self, row: PromptRow) -> str:
        numbers, target = parse_answer(row.answer)
        return ",".join(str(v) for v in sorted(numbers)) + f"={target}"

    def verify(self, completion: str, answer: str) -> bool:
        return verify(completion, answer)

    def canonical_answer(self, completion: str, answer: str) -> str | None:
        return canonical_answer(completion, answer)

    def solutions(self, row: PromptRow) -> list[str]:
        numbers, target = parse_answer(row.answer)
        return enumerate_solutions(numbers, target)

    def solution_prior(self, row: PromptRow) -> list[tuple[str, float]]:
        """(canonical solution, SFT probability) pairs, most likely first; probabilities sum to 1."""
        sols = self.solutions(row)
        return list(zip(sols, prior_weights(len(sols))))

    def reference_solution(self, row: PromptRow, rng: random.Random) -> str:
        """``"Answer: <expr>"`` with expr drawn from :meth:`solution_prior`.

        Raises ``ValueError`` when the row has no solution (only possible for hand-made rows).
        """
        prior = self.solution_prior(row)
        if not prior:
            raise ValueError(f"{row.prompt_id}: countdown row has no solution: {row.answer}")
        sols, weights = zip(*prior)
        return f"Answer: {rng.choices(sols, weights=weights, k=1)[0]}"


TASK = CountdownTask()


def generate(split: str, n: int, seed: int) -> list[PromptRow]:
    """``TASK.generate``: n unique countdown rows of ``split``, deterministic in ``seed``."""
    return TASK.generate(split, n, seed)


def solutions(row: PromptRow) -> list[str]:
    """``TASK.solutions``: every canonical solution of ``row``, most preferred first."""
    return TASK.solutions(row)


def solution_prior(row: PromptRow) -> list[tuple[str, float]]:
    """``TASK.solution_prior``: (solution, SFT probability), most likely first."""
    return TASK.solution_prior(row)


def reference_solution(row: PromptRow, rng: random.Random) -> str:
    """``TASK.reference_solution``: an SFT response sampled from the skewed prior."""
    return TASK.reference_solution(row, rng)
