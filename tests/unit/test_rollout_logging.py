"""The rollout worker's vLLM log settings: the level reaches vLLM's logger and exactly the benign
per-sync reload warning is dropped (a user reading the log must still see real load failures)."""

from __future__ import annotations

import logging

import pytest

from rlsys.workers import rollout


@pytest.fixture
def vllm_logger(monkeypatch):
    """A stand-in 'vllm' logger with one capturing handler, restored afterwards."""
    logger = logging.getLogger("vllm")
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    old_level, old_handlers, old_propagate = logger.level, logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    yield logger, records
    logger.handlers, logger.propagate = old_handlers, old_propagate
    logger.setLevel(old_level)


def test_level_and_benign_warning(vllm_logger):
    logger, records = vllm_logger
    rollout._configure_vllm_logging("WARNING")
    rollout._configure_vllm_logging("WARNING")  # idempotent: one filter, not two
    # The module vLLM 0.32 logs it from (tests/integration/test_train.py checks the real log).
    child = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert len(child.filters) == 1
    child.info("Reloading weights inplace...")
    child.warning("%s: Failed to load weights", "RotaryEmbedding")
    child.warning("%s: Failed to load weights", "QKVParallelLinear")
    child.error("engine died")
    logging.getLogger("vllm.other").warning("some other warning")
    assert [r.getMessage() for r in records] == [
        "QKVParallelLinear: Failed to load weights",
        "engine died",
        "some other warning",
    ]


def test_info_level_keeps_info(vllm_logger):
    logger, records = vllm_logger
    rollout._configure_vllm_logging("INFO")
    logging.getLogger("vllm.x").info("Reloading weights inplace...")
    assert [r.getMessage() for r in records] == ["Reloading weights inplace..."]
