"""Rewards: verifiers, their sandbox, and the reward pool (see ``pool`` for the Ray side).

Importing this package never imports Ray or math-verify; both load where they are used.
"""

from rlsys.rewards.code_exec import run_code
from rlsys.rewards.pool import COUNTER_KEYS, RewardGrader, RewardPool, RewardWorkerImpl
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
    "RewardPool",
    "RewardWorkerImpl",
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
