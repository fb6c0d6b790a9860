"""Ray actors and their pure helpers: rollout (vLLM), learner (DeepSpeed), weight sync, batching.

This module also holds the three ``typing.Protocol`` interfaces the training loop (rlsys.driver)
codes against, one per actor group. They name exactly the methods the driver and the in-training
evaluation call, so the loop runs just as well on in-process fakes (tests/unit/test_driver.py) as on
the Ray-backed groups (``RolloutPool``, ``RewardPool``, ``LearnerGroup``), which satisfy them
structurally. Importing this module imports no Ray, vLLM or DeepSpeed.

Calls block; each raises (naming the phase and the actor) rather than return a partial result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # records import numpy only, but the protocols need them for annotations alone
    import threading

    import numpy as np

    from rlsys.records import Grade, GradeRequest, RolloutGroup, RolloutRequest, TrainBatch, TrainStats
    from rlsys.workers.vllm_engine import GenerationStats

__all__ = ["LearnerGroupLike", "RewardGroupLike", "RolloutGroupLike"]


class RolloutGroupLike(Protocol):
    """The rollout engines (``RolloutPool``): sample, take pushed weights, score a probe."""

    @property
    def num_workers(self) -> int: ...

    @property
    def restarts(self) -> int:
        """Worker replacements since the group started (cumulative)."""
        ...

    @property
    def weights_lock(self) -> threading.RLock:
        """Held by every worker replacement and weight push; the driver holds it while the learners
        train, so that a replacement on another thread never reads weights between versions."""
        ...

    def generate(
        self, requests: list[RolloutRequest], group_size: int, seeds: dict[str, int]
    ) -> tuple[list[RolloutGroup], list[GenerationStats]]:
        """One group of ``group_size`` completions per request, in request order; ``seeds`` maps
        prompt id -> sampler seed. Stats: one per busy worker."""
        ...

    def load_weight_buckets(self, bucket_refs: list[Any], version: int) -> list[int]:
        """Load the learner's weight buckets into every engine; they then hold weights ``version``."""
        ...

    def sequence_logprobs(self, token_ids: list[int], worker: int | None = None) -> list[np.ndarray]:
        """Per engine (or only ``worker``): the [L - 1] log-probs of tokens 1.. of ``token_ids``."""
        ...

    def describe(self) -> list[dict[str, Any]]:
        """Per engine: ``{"dtype": ..., "threads": ...}``, what it really computes with."""
        ...

    def shutdown(self) -> None: ...


class RewardGroupLike(Protocol):
    """The reward actors (``RewardPool``): grade completions in sandboxes."""

    @property
    def num_workers(self) -> int: ...

    @property
    def restarts(self) -> int:
        """Actor replacements since the group started (cumulative)."""
        ...

    def validate_specs(self, specs: Iterable[str]) -> None:
        """Import every verifier spec now (ValueError if one is not allowed or does not load)."""
        ...

    def grade(self, requests: Sequence[GradeRequest]) -> list[Grade]:
        """One Grade per request, in request order."""
        ...

    def shutdown(self) -> None: ...


class LearnerGroupLike(Protocol):
    """The data-parallel learner ranks (``LearnerGroup``); errors are ``LearnerError``."""

    @property
    def num_workers(self) -> int: ...

    @property
    def ready_info(self) -> list[dict[str, Any]]:
        """Per rank: ``{"dtype": ..., "threads": ...}`` as reported when it came up."""
        ...

    def shard(self, batch: TrainBatch, pad_token_id: int = 0) -> list[TrainBatch]:
        """The global batch split into one part per rank."""
        ...

    def train_step(self, global_batch_parts: list[TrainBatch]) -> TrainStats:
        """One optimizer step over the global batch (one part per rank); the global stats."""
        ...

    def compute_logprobs(self, batch: TrainBatch, pad_token_id: int = 0) -> np.ndarray:
        """[N, L] log-probs of ``batch`` under the current weights, in the batch's layout."""
        ...

    def export_weight_buckets(self, bucket_bytes: int, dtype: str | None = None) -> list[Any]:
        """References to the current weights in buckets of about ``bucket_bytes``."""
        ...

    def save_hf(self, path: str, dtype: str | None = None) -> str:
        """A Hugging Face checkpoint of the current weights at ``path``."""
        ...

    def save_state(self, path: str, timeout_s: float | None = None) -> None:
        """Every rank's resumable training state into the directory ``path``."""
        ...

    def load_state(self, path: str, timeout_s: float | None = None) -> None:
        """Restore every rank from ``path`` (written by :meth:`save_state`)."""
        ...

    def shutdown(self, timeout_s: float = 10.0) -> None: ...
