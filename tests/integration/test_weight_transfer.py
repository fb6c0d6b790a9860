"""The torchdist weight path end to end: a real DeepSpeed learner (Ray actor) broadcasting over gloo into
real vLLM (CPU) engines through vLLM's weight-transfer protocol (issue 13).

The learner starts from a perturbed copy of the tiny model and the engines from the original, so a
sync that moved nothing would show: after ``push`` every engine scores a probe like the learner (and
unlike before), each TP rank's crc32 equals the sender's, and vLLM's own weight version is the
pushed one. Then the failure paths, made deterministic with signals: a rollout worker frozen
(SIGSTOP) through a whole transfer is dropped by the sender within ``sync.timeout_s`` and replaced;
one frozen and then SIGKILLed while the sender is blocked on it mid-stream is replaced too; in both
cases the replacement joins a fresh group, receives the current weights before ``push`` returns, and
the untouched engine's transfer completes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration.transfer_helpers import base_and_perturbed, engine_gaps, learner_of, local_ray

pytestmark = pytest.mark.integration

TIMEOUT_S = 8.0  # sync.timeout_s of these tests: a hung engine is dropped after this


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with local_ray(4):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """(the tiny model, a perturbed copy): engines start from the first, the learner from the second."""
    return base_and_perturbed(tmp_path_factory.mktemp("wt"))


@pytest.fixture(scope="module")
def actors(ray_cluster: None, models: tuple[str, str], tmp_path_factory) -> Iterator[tuple]:
    from rlsys.workers.rollout import RolloutPool, RolloutSpec
    from rlsys.workers.weight_path import TorchDistPath

    base, perturbed = models
    with learner_of(perturbed, str(tmp_path_factory.mktemp("init"))) as learners:
        spec = RolloutSpec(model_path=base, dtype="float32", max_tokens=8, transport="torchdist")
        pool = RolloutPool(
            spec, 2, num_cpus=1, timeout_s=120, ready_timeout_s=300, max_restarts=4, restart_backoff_s=0.1
        )
        path = TorchDistPath(
            learners, pool, backend="gloo", bucket_bytes=1 << 20, piece_bytes=256 << 10, timeout_s=TIMEOUT_S
        )
        path.start()
        try:
            yield learners, pool, path
        finally:
            pool.shutdown()


def worker_pid(pool, i: int) -> int:
    import ray

    return int(ray.get(pool.workers[i].pid.remote(), timeout=60))


def test_push_delivers_the_learners_weights_to_every_engine(actors) -> None:
    import ray

    learners, pool, path = actors
    before = engine_gaps(learners, pool)
    assert min(before) > 0.05, before  # the engines start from other weights than the learner's
    report = path.push(1)
    assert report.replaced == ()
    assert report.nbytes > 4 << 20
    assert sorted(report.engines) == [0, 1]
    for states in report.engines.values():
        assert [s["version"] for s in states] == [1]
        assert states[0]["nbytes"] == report.nbytes
    after = engine_gaps(learners, pool)
    assert max(after) < 1e-3, after  # float32 on both sides: the same weights score the same
    assert pool.weight_version == 1
    assert ray.get([w.weight_version.remote() for w in pool.workers]) == [1, 1]
    # vLLM's own bookkeeping carries the version too (stamped on outputs by the engine core).
    versions = ray.get([w.vllm_weight_version.remote() for w in pool.workers])
    assert versions == ["1", "1"]


def test_an_engine_frozen_through_a_transfer_is_dropped_in_time_and_replaced(actors) -> None:
    learners, pool, path = actors
    pid = worker_pid(pool, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        report = path.push(2)
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # gone already if the pool killed it, as it should
        except ProcessLookupError:
            pass
    assert report.replaced == (1,)
    assert worker_pid(pool, 1) != pid
    # One sender timeout for the frozen engine, then the replacement's start-up and transfer.
    assert took < TIMEOUT_S + 120, took
    assert max(engine_gaps(learners, pool)) < 1e-3
    assert pool.weight_version == 2


def test_an_engine_killed_mid_stream_is_replaced_and_gets_the_current_weights(actors) -> None:
    learners, pool, path = actors
    pid = worker_pid(pool, 0)
    os.kill(pid, signal.SIGSTOP)  # the sender blocks on it mid-stream ...
    killer = threading.Timer(1.0, lambda: os.kill(pid, signal.SIGKILL))  # ... until it dies
    killer.start()
    try:
        report = path.push(3)
    finally:
        killer.cancel()
    assert report.replaced == (0,)
    assert worker_pid(pool, 0) != pid
    assert max(engine_gaps(learners, pool)) < 1e-3
    assert pool.restarts == 2
