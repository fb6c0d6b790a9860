"""Rewards: the grader, verifiers and their sandbox; no Ray here.

The Ray actor and the driver-side group of reward actors live in :mod:`rlsys.workers.reward`;
this package imports neither Ray nor ``rlsys.workers`` (math-verify loads where it is used).
"""

from rlsys.rewards.code_exec import run_code
from rlsys.rewards.grader import COUNTER_KEYS, RewardGrader
from rlsys.rewards.sandbox import ChildConfig, Job, SandboxStartError, VerifierSandbox
from rlsys.rewards.verifiers import (
    BUILTIN_VERIFIERS,
    NO_ANSWER_DETAIL,
    GradeFailure,
    check_spec_allowed,
    coerce_result,
    extract_final_answer,
    normalize_whitespace,
    resolve_verifier,
    run_verifier,
)

__all__ = [
    "BUILTIN_VERIFIERS",
    "COUNTER_KEYS",
    "NO_ANSWER_DETAIL",
    "ChildConfig",
    "GradeFailure",
    "Job",
    "RewardGrader",
    "SandboxStartError",
    "VerifierSandbox",
    "check_spec_allowed",
    "coerce_result",
    "extract_final_answer",
    "normalize_whitespace",
    "resolve_verifier",
    "run_code",
    "run_verifier",
]
