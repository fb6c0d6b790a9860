"""vLLM log hygiene shared by every process that runs a model (standard library only).

Installed in the rollout actor (:func:`rlsys.workers.vllm_engine._configure_vllm_logging`) and, through
the worker extension's import (:mod:`rlsys.workers.vllm_ext`), in every process that holds model ranks:
vLLM's mp executor workers and AsyncLLM's engine-core process, which log the reload warning themselves.
"""

from __future__ import annotations

import logging


class DropBenignReloadWarning(logging.Filter):
    """Drops vLLM's per-sync "RotaryEmbedding: Failed to load weights" warning.

    On a weight reload vLLM 0.32 warns for every layer that has loadable tensors but got none from
    the checkpoint; for RotaryEmbedding that tensor is the derived cos/sin cache, never in a
    checkpoint, and vLLM puts the original back. So the warning fires on every sync and means
    nothing; a real failure still shows for any other layer, and the per-sync probe check
    (``sync/logprob_diff``) fails the run if the weights did not land.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


# The vLLM module that logs the warning above. A filter on a logger sees the records created on that
# logger (not those of its children), and vLLM attaches its handlers only when the engine starts, so
# the filter sits here. If vLLM moves the module the warning simply reappears.
VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def drop_benign_reload_warning() -> None:
    """Install :class:`DropBenignReloadWarning` on vLLM's reload logger of this process (once)."""
    reload_log = logging.getLogger(VLLM_RELOAD_LOGGER)
    if not any(isinstance(f, DropBenignReloadWarning) for f in reload_log.filters):
        reload_log.addFilter(DropBenignReloadWarning())
