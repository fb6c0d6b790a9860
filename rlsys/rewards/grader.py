"""The reward grader: grades ``GradeRequest`` records in sandboxed child processes (no Ray).

:class:`RewardGrader` is the whole of grading; the Ray actor around it and the driver-side group of
actors live in :mod:`rlsys.workers.reward`, so this package never imports Ray (nor ``rlsys.workers``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from rlsys.records import GRADE_INVALID, GRADE_OK, GRADE_STATUSES, Grade, GradeRequest
from rlsys.rewards.sandbox import ChildConfig, Job, VerifierSandbox
from rlsys.rewards.verifiers import NO_ANSWER_DETAIL, check_spec_allowed, is_builtin, split_spec, truncate

DEFAULT_MAX_COMPLETION_CHARS = 64 * 1024
# Counter keys besides the statuses: child replacements, and ok-but-unanswered grades (the model did
# not state a final answer in the expected format: worth watching, it is the classic silent zero).
COUNTER_KEYS = (*GRADE_STATUSES, "no_answer", "restarts")


class RewardGrader:
    """Grades completions with sandboxed verifiers; ``grade`` never raises for a bad completion.

    ``num_procs`` children verify in parallel, each request under a hard ``timeout_s`` wall-clock
    limit (the child is SIGKILLed and replaced on overrun: status "timeout"; a child that dies gives
    status "error"). User functions (``"module:function"`` / ``"file.py:function"``) run only when
    listed in ``allowed_functions`` (or as ``"module:*"``); built-ins and ``rlsys.*`` modules are always
    allowed. A completion (or gold answer) longer than ``max_completion_chars`` is graded "invalid"
    without running. ``memory_limit_mb`` caps each child's address space (None/0: no cap).
    ``success_threshold`` decides ``correct`` for verifiers returning a bare float.
    Relative ``file.py`` specs resolve against ``base_dir`` (default: the current directory).
    """

    def __init__(
        self,
        num_procs: int = 1,
        timeout_s: float = 5.0,
        success_threshold: float = 1.0,
        allowed_functions: Iterable[str] = (),
        memory_limit_mb: int | None = 2048,
        *,
        max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS,
        max_detail_chars: int = 200,
        startup_timeout_s: float = 120.0,
        base_dir: str | None = None,
    ):
        self.allowed_functions = tuple(allowed_functions)
        for entry in self.allowed_functions:
            if is_builtin(entry):
                continue
            if entry.endswith(":*") and entry[:-2].strip():
                continue  # every function of a module/file
            try:
                split_spec(entry)
            except ValueError as exc:
                raise ValueError(f"RewardGrader allowed_functions entry {entry!r} is malformed: {exc}") from None
        if max_completion_chars < 1:
            raise ValueError(f"RewardGrader max_completion_chars must be >= 1, got {max_completion_chars}")
        self.timeout_s = float(timeout_s)
        self.max_completion_chars = int(max_completion_chars)
        self.max_detail_chars = int(max_detail_chars)
        self._validated: set[str] = set()
        self._counts = dict.fromkeys(COUNTER_KEYS, 0)
        config = ChildConfig(
            allowed_functions=self.allowed_functions,
            base_dir=os.path.abspath(base_dir or os.getcwd()),
            success_threshold=float(success_threshold),
            memory_limit_mb=memory_limit_mb,
            max_detail_chars=self.max_detail_chars,
        )
        self._sandbox = VerifierSandbox(
            num_procs=num_procs,
            timeout_s=timeout_s,
            config=config,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def num_procs(self) -> int:
        return self._sandbox.num_procs

    def validate_specs(self, specs: Iterable[str]) -> None:
        """Check and import every verifier spec now, so a typo fails at start-up and not mid-run.

        Raises ValueError naming each bad spec: not allowed (and how to allow it), malformed,
        module/file missing, import failure, no such function. Already-validated specs are skipped.
        """
        new = [s for s in dict.fromkeys(specs) if s not in self._validated]
        if not new:
            return
        for spec in new:
            if not isinstance(spec, str):
                raise ValueError(f"verifier spec must be a string, got {type(spec).__name__}: {spec!r:.80}")
            check_spec_allowed(spec, self.allowed_functions)
        errors = self._sandbox.resolve([s for s in new if not is_builtin(s)])
        if errors:
            raise ValueError("invalid verifier spec(s): " + "; ".join(errors.values()))
        self._validated.update(new)

    def _precheck(self, request: GradeRequest) -> str:
        """Return why ``request`` is graded invalid without running, or "" when it may run."""
        if not isinstance(request.completion, str):
            return f"completion is {type(request.completion).__name__}, expected str"
        if not isinstance(request.answer, str):
            return f"answer is {type(request.answer).__name__}, expected str"
        if len(request.completion) > self.max_completion_chars:
            return f"completion has {len(request.completion)} chars, over the {self.max_completion_chars} limit"
        if len(request.answer) > self.max_completion_chars:
            return f"answer has {len(request.answer)} chars, over the {self.max_completion_chars} limit"
        return ""

    def grade(self, requests: Sequence[GradeRequest]) -> list[Grade]:
        """Return one Grade per request, in request order.

        Raises ValueError only for a verifier spec that is not allowed or cannot be resolved (a
        config error, checked once per spec); bad completions become non-"ok" grades instead.
        """
        self.validate_specs(r.verifier for r in requests)
        grades: list[Grade | None] = [None] * len(requests)
        jobs: list[Job] = []
        job_rows: list[int] = []
        for row, request in enumerate(requests):
            why = self._precheck(request)
            if why:
                grades[row] = Grade(
                    request.prompt_id,
                    request.sample_index,
                    0.0,
                    False,
                    GRADE_INVALID,
                    truncate(why, self.max_detail_chars),
                )
            else:
                jobs.append(Job(request.verifier, request.completion, request.answer))
                job_rows.append(row)
        for row, ((reward, correct, status, detail), seconds) in zip(job_rows, self._sandbox.run(jobs)):
            request = requests[row]
            reward = float(reward) if status == GRADE_OK and math.isfinite(reward) else 0.0
            grades[row] = Grade(
                request.prompt_id,
                request.sample_index,
                reward,
                bool(correct) and status == GRADE_OK,
                status,
                truncate(detail, self.max_detail_chars),
                seconds,
            )
        out: list[Grade] = []
        for row, grade in enumerate(grades):
            if grade is None:  # every row is filled by the precheck or the sandbox
                raise RuntimeError(f"RewardGrader lost request {row} (a bug: every request must get a grade)")
            self._counts[grade.status] += 1
            if grade.detail == NO_ANSWER_DETAIL:
                self._counts["no_answer"] += 1
            out.append(grade)
        return out

    def counters(self) -> dict[str, int]:
        """Cumulative counts: one per status in GRADE_STATUSES, "no_answer", and "restarts"."""
        return {**self._counts, "restarts": self._sandbox.restarts}

    def isolation(self) -> list[dict[str, Any]]:
        """Per verifier process: pid, scratch dir, and whether netns / seccomp / a code launcher are on."""
        return self._sandbox.isolation()

    def close(self) -> None:
        """Kill the verifier children (idempotent)."""
        self._sandbox.close()

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
