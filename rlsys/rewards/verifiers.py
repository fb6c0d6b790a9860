"""Built-in verifiers, final-answer extraction, and resolution of user verifier functions.

A verifier spec names how one completion is graded against its reference answer:

* ``"math"``  -- the final answer (see :func:`extract_final_answer`) and the gold answer are parsed
  with math-verify and compared symbolically/numerically (``\\frac{1}{2}`` equals ``0.5``).
* ``"exact"`` -- the final answer (or, when there is none, the whole completion) equals the gold
  answer after whitespace normalization.
* ``"regex"`` -- the gold answer is a regular expression that must ``fullmatch`` the final answer
  (or, when there is none, the whole completion), after whitespace normalization.
* ``"module:function"`` or ``"path/to/file.py:function"`` -- a user function
  ``fn(completion: str, answer: str) -> bool | float | tuple[float, bool]``. It is resolved only when
  the spec is allowed (:func:`check_spec_allowed`); ``rlsys.*`` modules are always allowed.

Every verifier is reduced to an :data:`Outcome` ``(reward, correct, status, detail)`` by
:func:`run_verifier`, which never raises: a verifier that raises, or returns something that is not a
finite reward, yields reward 0.0 with status ``error`` / ``invalid`` and a short detail. A verifier
that knows why it cannot grade (the code it ran timed out, say) raises :class:`GradeFailure` with
the status to record.

This module is imported in the driver (for :func:`extract_final_answer` and spec checks) and in the
sandbox children (to run verifiers); math-verify is imported lazily so the driver stays light.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from rlsys.records import GRADE_ERROR, GRADE_INVALID, GRADE_OK, GRADE_STATUSES

BUILTIN_VERIFIERS = ("math", "exact", "regex")

# (reward, correct, status, detail): what a verifier run reduces to, cheap to pickle across processes.
Outcome = tuple[float, bool, str, str]

# Detail attached to a "math"/"exact"/"regex" grade whose completion had no final answer to extract.
# Counted separately by the grader so that a prompt format the model ignores is visible, not silent.
NO_ANSWER_DETAIL = "no final answer found"

DEFAULT_MAX_DETAIL_CHARS = 200

# Brace nesting a "math" final answer may have. math-verify's LaTeX parse time grows exponentially
# with nesting (15 nested \frac take seconds, 20 never finish); real final answers stay far below.
MAX_MATH_NESTING = 10


class GradeFailure(Exception):
    """Raised by a verifier to grade a completion 0 with a given non-"ok" status and detail.

    For a verifier that ran something that failed in a way worth counting apart from a wrong answer:
    ``GradeFailure("timeout", "code timed out")``. ``status`` must be "timeout", "error" or "invalid".
    """

    def __init__(self, status: str, detail: str = ""):
        if status not in GRADE_STATUSES or status == GRADE_OK:
            raise ValueError(f"GradeFailure status must be one of timeout/error/invalid, got {status!r}")
        super().__init__(detail)
        self.status = status
        self.detail = detail


# "\\boxed{...}" / "\\fbox{...}", or "\\boxed 5" with one bare token (an escaped "\\$" may be part of it).
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*\{|\s+(?P<bare>(?:\\\$|[^\s{}$])+))")
# What may stand between two boxes for them to be read as one answer ("\\boxed{1}, \\boxed{2} and
# \\boxed{3}"): whitespace, "," ";", the words "and"/"or" (also in \\text{}), math delimiters and
# LaTeX spacing. Anything else (a word, a sentence) separates them: then only the last box counts.
_BOX_SEPARATOR_RE = re.compile(
    r"(?:\s|[,;$]|\band\b|\bor\b|\\[()\[\]]|\\q?quad\b|\\[,;:! ]|\\text\{\s*(?:(?:and|or|,)\s*)?\})*",
    re.IGNORECASE,
)
# At most this many trailing boxes are joined into one answer, and only when at most this many
# separator characters stand between two of them (both bound the work on hostile text).
MAX_JOINED_BOXES = 32
MAX_BOX_SEPARATOR_CHARS = 64
# A line "Answer: ...", optionally "Final answer", optionally in markdown bold/italics or a quote/heading.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_]*(?:final[ \t]+)?answer[ \t]*[*_]*[ \t]*[:：][ \t]*[*_]*[ \t]*(?P<answer>.*?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_WHITESPACE_RE = re.compile(r"\s+")
# Besides an unescaped "$" (see _unescaped_dollars: "\\$" is a currency sign, not a delimiter).
_LATEX_DELIMITERS = ("\\(", "\\[", "\\boxed", "\\fbox")


def truncate(text: str, max_chars: int = DEFAULT_MAX_DETAIL_CHARS) -> str:
    """Return ``text`` cut to at most ``max_chars`` characters (an ellipsis marks a cut)."""
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 3)] + "..."


def _balanced_braces(text: str, start: int) -> str | None:
    """Return the content of the brace group whose ``{`` is at ``start - 1``, or None if unclosed."""
    depth = 1
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{ or \}) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _unescaped_dollars(text: str) -> list[int]:
    """Positions of the ``$`` in ``text`` that are math delimiters, i.e. not escaped as ``\\$``.

    A ``$`` is escaped when an odd number of backslashes precede it (``\\\\$`` is a line break, then a
    delimiter).
    """
    positions = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # the escaped character, "$" included, is skipped
            continue
        if ch == "$":
            positions.append(i)
        i += 1
    return positions


def _has_math_dollar(text: str) -> bool:
    return "$" in text and bool(_unescaped_dollars(text))


def _box_content(text: str, match: re.Match[str]) -> tuple[int, str | None]:
    """The end (just past the closing brace or bare token) and stripped content of one box match.

    The content is None for a box never closed (it then ends with the text).
    """
    bare = match.group("bare")
    if bare is not None:  # "\\boxed 5": a single bare token
        return match.end(), bare.rstrip(".")
    content = _balanced_braces(text, match.end())
    if content is None:
        return len(text), None
    return match.end() + len(content) + 1, content.strip()


def _final_boxed_answer(text: str, boxes: list[re.Match[str]]) -> str | None:
    """The answer the trailing boxes of ``text`` state (see :func:`extract_final_answer`).

    Only the last :data:`MAX_JOINED_BOXES` boxes are scanned, so the cost stays linear in the text.
    """
    last = boxes[-1]
    start = last.start()
    content = _box_content(text, last)[1]
    if not content:
        return None
    contents = [content]
    for prev in reversed(boxes[-MAX_JOINED_BOXES:-1]):
        prev_end, prev_content = _box_content(text, prev)
        if not prev_content or prev_end > start:
            break  # an unclosed or empty box, or one that contains the next: stop joining
        if start - prev_end > MAX_BOX_SEPARATOR_CHARS or not _BOX_SEPARATOR_RE.fullmatch(text, prev_end, start):
            break
        if prev_content != contents[-1]:  # "\\boxed{5} \\boxed{5}" states 5 once
            contents.append(prev_content)
        start = prev.start()
    return ", ".join(reversed(contents))


def _strip_decorations(answer: str) -> str:
    """Strip what models wrap an "Answer:" value in: markdown emphasis, one ``$...$``, a final period.

    An escaped ``\\$`` is a currency sign, not a delimiter: ``$\\$5$`` becomes ``\\$5``, ``\\$5`` stays.
    """
    answer = answer.strip()
    for _ in range(2):  # "**$42$**." needs two passes
        answer = answer.strip().rstrip(".").strip()
        if len(answer) >= 4 and answer.startswith("**") and answer.endswith("**"):
            answer = answer[2:-2]
        elif len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "*_":
            answer = answer[1:-1]
        elif answer and answer[-1] in "*_":
            # "Answer: **42**": the line pattern ate the opening "**", so drop the closing one too
            # (only when no other "*"/"_" is in the answer, and it is not x^* or an escaped \_).
            mark = answer[-1]
            body = answer.rstrip(mark)
            if mark not in body and not body.endswith(("^", "\\")):
                answer = body
        if len(answer) >= 2 and _unescaped_dollars(answer) == [0, len(answer) - 1]:
            answer = answer[1:-1]
    return answer.strip()


def extract_final_answer(text: str) -> str | None:
    """Return the final answer stated in ``text``, or None when it states none.

    In this order:

    1. Boxes. The last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5`` with one bare token)
       wins, with nested and escaped braces handled; its content is returned stripped. A last
       ``\\boxed{`` that is never closed (a truncated completion) yields None rather than an earlier,
       intermediate boxed value. Several boxes at the end that are separated only by whitespace,
       ``,`` ``;``, "and"/"or", ``$``/``\\(``/``\\)``/``\\[``/``\\]`` or LaTeX spacing (``\\quad``,
       ``\\,``, ``\\text{ and }``), at most 64 characters of them between two boxes, state one
       answer (up to 32 boxes): their contents are joined with ", " in order
       (``\\boxed{1}, \\boxed{2} and \\boxed{3}`` gives ``"1, 2, 3"``; a repeated box counts once).
       Boxes separated by anything else (``\\boxed{1} first, then \\boxed{2}``) do not join: the last
       wins.
    2. Without any box, the text after the last line starting with "Answer:" (or "Final answer:", any
       case, optionally in markdown emphasis), without surrounding emphasis, one enclosing ``$...$``
       and a trailing period.

    An escaped ``\\$`` is a literal currency sign everywhere: it is kept in the answer (math-verify
    ignores it) and never taken for a ``$`` delimiter. An empty answer counts as none.
    """
    boxes = list(_BOXED_RE.finditer(text))
    if boxes:
        return _final_boxed_answer(text, boxes)
    lines = list(_ANSWER_LINE_RE.finditer(text))
    if lines:
        answer = _strip_decorations(lines[-1].group("answer"))
        return answer or None
    return None


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip both ends."""
    return _WHITESPACE_RE.sub(" ", text).strip()


# ---------------------------------------------------------------------------------------------------
# Built-in verifiers. Each returns an Outcome; an exception escaping one is turned into an error grade
# by run_verifier.


def _as_latex(text: str) -> str:
    """Wrap ``text`` in ``$...$`` unless it already carries LaTeX delimiters.

    math-verify only parses LaTeX that is delimited (``$..$``, ``\\(..\\)``, ``\\boxed{}``); a bare
    ``\\frac{1}{2}`` would otherwise fall through to the plain-expression parser and fail. An
    escaped ``\\$`` is not a delimiter: ``\\$16,386.20`` is wrapped (``$\\$16,386.20$``), which
    math-verify reads as 16386.2.
    """
    if _has_math_dollar(text) or any(d in text for d in _LATEX_DELIMITERS):
        return text
    return f"${text}$"


_MATH_VERIFY: Any = None
_GOLD_CACHE: dict[str, Any] = {}
_GOLD_CACHE_MAX = 4096


def _math_verify() -> Any:
    """Import math-verify once per process (slow: it pulls in sympy and an ANTLR parser)."""
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        import logging

        import math_verify

        # We disable math-verify's own signal.alarm timeouts (the sandbox kills a hung process; an
        # in-library timeout would silently turn a hang into a wrong answer), so silence the warning
        # it logs about that, and its debug chatter about unparseable predictions.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _MATH_VERIFY = math_verify
    return _MATH_VERIFY


def brace_depth(text: str) -> int:
    """The deepest ``{`` nesting in ``text`` (escaped ``\\{`` ignored; unbalanced text is fine)."""
    depth = deepest = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def _parse_math(text: str) -> list[Any]:
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    return mv.parse(_as_latex(text), extraction_config=config, parsing_timeout=None)


def verify_math(completion: str, answer: str) -> Outcome:
    """Built-in ``"math"``: math-verify equivalence of the final answer and the gold answer.

    The final answer is what :func:`extract_final_answer` returns; it and the gold answer are wrapped
    in ``$...$`` unless they carry a LaTeX delimiter, then parsed and compared by math-verify.

    * An escaped ``\\$`` is a currency sign, never a math delimiter: ``\\boxed{\\$16,386.20}`` and
      ``Answer: \\$5`` are read as 16386.2 and 5 (math-verify drops the ``\\$``).
    * Several boxes: the boxes at the end of the completion that are separated only by commas,
      "and"/"or", whitespace or delimiters are one answer, their contents joined as a list
      (``\\boxed{1}, \\boxed{2}, \\boxed{3}`` is ``1, 2, 3``, the set {1, 2, 3}, which equals a gold
      ``\\{1,2,3\\}`` or ``3, 2, 1``); boxes separated by other text do not join and the last wins
      (``\\boxed{1} first, then \\boxed{2}`` is 2). This follows math-verify's own joining of
      adjacent boxes, with a stricter notion of "adjacent" (see ``docs/verifiers.md``).

    Never raises on any completion; its cost is bounded by :data:`MAX_MATH_NESTING` and the extraction
    limits. A gold answer math-verify cannot parse grades "error"; a too-deeply nested final answer
    grades "invalid".
    """
    gold = _GOLD_CACHE.get(answer)
    if gold is None:
        gold = _parse_math(answer)
        if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[answer] = gold
    if not gold:
        # A dataset problem, not the model's: make it loud rather than a silent 0.
        return 0.0, False, GRADE_ERROR, truncate(f"gold answer not parseable by math-verify: {answer!r}")
    predicted = extract_final_answer(completion)
    if predicted is None:
        return 0.0, False, GRADE_OK, NO_ANSWER_DETAIL
    depth = brace_depth(predicted)
    if depth > MAX_MATH_NESTING:
        return 0.0, False, GRADE_INVALID, f"final answer nested {depth} braces deep, over the {MAX_MATH_NESTING} limit"
    parsed = _parse_math(predicted)
    if not parsed:
        return 0.0, False, GRADE_OK, "final answer not parseable"
    ok = bool(_math_verify().verify(gold, parsed, timeout_seconds=None))
    return (1.0 if ok else 0.0), ok, GRADE_OK, ""


def _answer_or_completion(completion: str) -> tuple[str, str]:
    predicted = extract_final_answer(completion)
    if predicted is None:
        return normalize_whitespace(completion), NO_ANSWER_DETAIL
    return normalize_whitespace(predicted), ""


def verify_exact(completion: str, answer: str) -> Outcome:
    """Built-in ``"exact"``: whitespace-normalized string equality (final answer, else whole text)."""
    predicted, detail = _answer_or_completion(completion)
    ok = predicted == normalize_whitespace(answer)
    return (1.0 if ok else 0.0), ok, GRADE_OK, detail


def verify_regex(completion: str, answer: str) -> Outcome:
    """Built-in ``"regex"``: the gold answer must ``re.fullmatch`` the final answer (else whole text)."""
    try:
        pattern = re.compile(answer)
    except re.error as exc:
        return 0.0, False, GRADE_ERROR, truncate(f"gold answer is not a valid regex: {exc}")
    predicted, detail = _answer_or_completion(completion)
    ok = pattern.fullmatch(predicted) is not None
    return (1.0 if ok else 0.0), ok, GRADE_OK, detail


_BUILTINS: dict[str, Callable[[str, str], Outcome]] = {
    "math": verify_math,
    "exact": verify_exact,
    "regex": verify_regex,
}


def warm_up() -> None:
    """Run each built-in once so a fresh process pays regex compilation and parser set-up now."""
    verify_math("\\boxed{\\frac{1}{2}}", "0.5")
    verify_exact("Answer: 1", "1")
    verify_regex("Answer: 1", "[0-9]+")


# ---------------------------------------------------------------------------------------------------
# Spec handling.


def split_spec(spec: str) -> tuple[str, str]:
    """Split a user spec ``"module:function"`` / ``"path.py:function"`` into (target, function).

    Raises ValueError naming the spec when it has no ``:function`` part or an empty side.
    """
    target, sep, function = spec.rpartition(":")
    if not sep or not target.strip() or not function.strip() or not function.isidentifier():
        raise ValueError(
            f"verifier spec {spec!r} is neither a built-in {BUILTIN_VERIFIERS} nor of the form "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    return target.strip(), function.strip()


def is_builtin(spec: str) -> bool:
    return spec in _BUILTINS


def check_spec_allowed(spec: str, allowed_functions: Iterable[str]) -> None:
    """Raise ValueError unless ``spec`` may be resolved. Imports nothing.

    Allowed are: the built-ins; ``rlsys.*`` modules; a spec listed verbatim in ``allowed_functions``;
    a spec whose module/file is listed as ``"module:*"`` / ``"file.py:*"``.
    """
    if is_builtin(spec):
        return
    target, _ = split_spec(spec)
    if not target.endswith(".py") and (target == "rlsys" or target.startswith("rlsys.")):
        return
    allowed = set(allowed_functions)
    if spec in allowed or f"{target}:*" in allowed:
        return
    raise ValueError(
        f"verifier {spec!r} is not allowed: user verifier functions run only when listed in the "
        f"grader's allowed_functions (the reward config's allow-list); add {spec!r} (or "
        f"{target + ':*'!r} for every function of that module) to it"
    )


def _load_file_module(path: str) -> Any:
    """Import a ``.py`` file as a module named after its absolute path (stable, collision-free)."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    name = f"_rlsys_verifier_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before exec so that pickling by reference works
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve_verifier(
    spec: str, allowed_functions: Iterable[str] = (), base_dir: str | None = None
) -> Callable[..., Any]:
    """Return the callable a spec names, after checking it is allowed.

    Built-ins return their Outcome-returning function; user specs return the user's function (to be
    run through :func:`run_verifier`). A relative ``file.py`` path is taken relative to ``base_dir``
    (default: the current directory). Raises ValueError naming the spec on any failure (not allowed,
    module/file missing, import error, no such function, not callable).
    """
    check_spec_allowed(spec, allowed_functions)
    if is_builtin(spec):
        return _BUILTINS[spec]
    target, function = split_spec(spec)
    try:
        if target.endswith(".py"):
            path = target if os.path.isabs(target) else os.path.join(base_dir or os.getcwd(), target)
            path = os.path.abspath(path)
            if not os.path.isfile(path):
                raise ValueError(f"verifier {spec!r}: file {path!r} does not exist")
            module = _load_file_module(path)
        else:
            module = importlib.import_module(target)
    except ValueError:
        raise
    except BaseException as exc:  # an import can raise anything, SystemExit included
        raise ValueError(
            f"verifier {spec!r}: importing {target!r} failed: {type(exc).__name__}: {truncate(str(exc))}"
        ) from exc
    fn = getattr(module, function, None)
    if fn is None:
        raise ValueError(f"verifier {spec!r}: {target!r} has no attribute {function!r}")
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {target}.{function} is not callable")
    return fn


# ---------------------------------------------------------------------------------------------------
# Running a verifier.


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _is_bool(value: Any) -> bool:
    # numpy's bool is not a bool subclass; accept it by name to avoid importing numpy here.
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def coerce_result(value: Any, success_threshold: float = 1.0) -> Outcome:
    """Reduce a user verifier's return value to an Outcome.

    bool -> (1.0 | 0.0, value); a finite real -> (value, value >= success_threshold);
    a 2-tuple (finite real, bool) -> as given; anything else -> (0.0, False, "invalid", why).
    """
    if _is_bool(value):
        ok = bool(value)
        return (1.0 if ok else 0.0), ok, GRADE_OK, ""
    if isinstance(value, tuple):
        if len(value) != 2:
            return 0.0, False, GRADE_INVALID, f"returned a tuple of length {len(value)}, expected (reward, correct)"
        reward = _finite_float(value[0])
        if reward is None:
            return 0.0, False, GRADE_INVALID, truncate(f"returned reward {value[0]!r:.60}, expected a finite number")
        if not _is_bool(value[1]):
            return 0.0, False, GRADE_INVALID, f"returned correct of type {type(value[1]).__name__}, expected bool"
        return reward, bool(value[1]), GRADE_OK, ""
    reward = _finite_float(value)
    if reward is not None:
        return reward, reward >= success_threshold, GRADE_OK, ""
    if isinstance(value, numbers.Real):
        return 0.0, False, GRADE_INVALID, f"returned non-finite reward {value!r}"
    return 0.0, False, GRADE_INVALID, f"returned {type(value).__name__}, expected bool, float or (float, bool)"


def run_verifier(
    fn: Callable[..., Any],
    completion: str,
    answer: str,
    success_threshold: float = 1.0,
    max_detail_chars: int = DEFAULT_MAX_DETAIL_CHARS,
) -> Outcome:
    """Run one verifier in this process and return its Outcome; never raises (except KeyboardInterrupt).

    Built-ins return Outcomes already; user functions' results go through :func:`coerce_result`.
    :class:`GradeFailure` becomes (0.0, False, its status, its detail); any other exception
    (SystemExit included) becomes (0.0, False, "error", "<ExcType>: <message>").
    There is no timeout here: run this inside the sandbox, which kills a verifier that hangs.
    """
    try:
        if fn in _BUILTINS.values():
            reward, correct, status, detail = fn(completion, answer)
        else:
            reward, correct, status, detail = coerce_result(fn(completion, answer), success_threshold)
    except KeyboardInterrupt:
        raise
    except GradeFailure as exc:
        return 0.0, False, exc.status, truncate(str(exc.detail), max_detail_chars)
    except BaseException as exc:  # noqa: BLE001 - a verifier may raise anything, SystemExit included
        try:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except BaseException:  # noqa: BLE001 - str() of a hostile exception can raise too
            message = type(exc).__name__
        return 0.0, False, GRADE_ERROR, truncate(message, max_detail_chars)
    if status == GRADE_OK and not math.isfinite(reward):
        return 0.0, False, GRADE_INVALID, "non-finite reward"
    return float(reward), bool(correct), status, truncate(detail, max_detail_chars)
