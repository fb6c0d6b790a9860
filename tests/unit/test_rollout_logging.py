"""Rollout worker settings: vLLM's log level reaches vLLM's logger and exactly the benign per-sync
reload warning is dropped (a user reading the log must still see real load failures); a TP engine's
CPU binding splits the worker's threads over its ranks."""

from __future__ import annotations

import logging

import pytest

from rlsys.workers import vllm_engine as rollout


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


def test_cpu_bind_splits_a_workers_threads_over_its_tp_ranks():
    from rlsys.workers.vllm_engine import cpu_bind

    assert cpu_bind(2, 2, [0, 1]) == "0|1"
    assert cpu_bind(2, 4, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_bind(2, 4, list(range(8)), offset=4) == "4,5|6,7"  # the second worker's share
    assert cpu_bind(1, 3, [0, 1, 2, 3]) == "0,1,2"
    assert cpu_bind(2, 3, [0, 1, 2]) == "0|1"  # uneven: every rank gets the same count
    assert cpu_bind(4, 2, [0, 1]) == "0|1|0|1"  # more ranks than cores: they share, none is refused
    assert cpu_bind(2, 2, [5, 9]) == "5|9"  # the process's affinity, not core 0..n
    with pytest.raises(ValueError, match="tp >= 1"):
        cpu_bind(0, 2, [0, 1])


def test_version_spans_read_vllms_labels_and_fill_in_the_initial_version():
    from types import SimpleNamespace as S

    from rlsys.workers.vllm_engine import version_spans

    assert version_spans(None, 5) == ((0, 0, 5),)
    assert version_spans(None, 0) == ()
    assert version_spans([S(version="default", start=0, end=3), S(version="1", start=3, end=9)], 9) == (
        (0, 0, 3),
        (1, 3, 9),
    )
    assert version_spans([S(version="default", start=0, end=4)], 4, initial=2) == ((2, 0, 4),)
