"""The learner's exceptions (a leaf module: the group, the engine and the state format all raise them)."""

from __future__ import annotations

from rlsys.workers.supervision import WorkerError, WorkerTimeout

__all__ = ["LearnerError", "LearnerStateError", "LearnerTimeout", "PEER_FAILED"]


class LearnerError(WorkerError):
    """A learner rank failed or timed out; the message names the rank and the phase."""


class LearnerTimeout(LearnerError, WorkerTimeout):
    """Learner rank(s) did not finish a call within its deadline (the ranks wait for each other)."""


class LearnerStateError(ValueError):
    """A learner state directory is incomplete, damaged, or does not fit this learner layout."""


# Ends the error of a rank that stopped only because another rank failed (LearnerGroup reports the other).
PEER_FAILED = "this rank stopped with them"
