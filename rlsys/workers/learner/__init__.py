"""The learner: DeepSpeed ZeRO 0-3 data-parallel policy optimisation, as plain class and Ray actor.

Modules (each imports only those above it, plus :mod:`rlsys.algo`, records, batching, weight_sync):

* :mod:`.errors` — :class:`LearnerError` (a rank failed or timed out; names rank and phase) and
  :class:`LearnerStateError` (a state directory is incomplete or does not fit).
* :mod:`.spec` — :class:`LearnerSpec`, everything a rank is built from, identical on every rank.
* :mod:`.state` — the resumable state format: manifest, optimizer layout, save / load of one rank.
* :mod:`.export` — weights out: (name, tensor) streams, weight buckets, Hugging Face checkpoints.
* :mod:`.engine` — :class:`Learner`, one data-parallel rank in one process: process group, DeepSpeed
  engine, model loading, reference policy, ``train_step`` / ``compute_logprobs``. Its module
  docstring states the exact-gradient contract. The chunked log-prob head it trains through
  (formerly ``_LogprobHead`` here) is public math: :class:`rlsys.algo.logprobs.LogprobHead`.
* :mod:`.group` — :data:`LearnerWorker` (a thin Ray actor around one Learner) and
  :class:`LearnerGroup`, the driver's handle on all ranks.

Importing this package imports torch but neither Ray nor DeepSpeed nor transformers (those are
imported where a learner is built or an actor started).
"""

from __future__ import annotations

from rlsys.workers.learner.engine import Learner
from rlsys.workers.learner.errors import LearnerError, LearnerStateError
from rlsys.workers.learner.export import unpack_weight_bucket
from rlsys.workers.learner.group import LearnerGroup, LearnerWorker
from rlsys.workers.learner.spec import DTYPES, LearnerSpec
from rlsys.workers.learner.spec import _lr_factor as _lr_factor  # the warmup schedule, read by its unit test
from rlsys.workers.learner.state import (
    LEARNER_STATE_FORMAT,
    LEARNER_STATE_MANIFEST,
    LEARNER_STATE_VERSION,
    read_learner_state_manifest,
)

__all__ = [
    "DTYPES",
    "LEARNER_STATE_FORMAT",
    "LEARNER_STATE_MANIFEST",
    "LEARNER_STATE_VERSION",
    "Learner",
    "LearnerError",
    "LearnerGroup",
    "LearnerSpec",
    "LearnerStateError",
    "LearnerWorker",
    "read_learner_state_manifest",
    "unpack_weight_bucket",
]
