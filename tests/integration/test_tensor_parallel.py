"""Tensor-parallel rollout engines (issue 13): vLLM's multiprocessing executor with TP=2 on CPU, one
process per rank, each bound to its own core.

* generation matches a TP=1 engine on the same seeds (same tokens; logprobs within float32 round-off of
  a split matmul);
* a torchdist push reaches both TP ranks (each rank's crc32 equals the sender's) and the engine then
  scores the probe like the learner;
* a TP=2 worker SIGKILLed takes its rank processes with it, and its replacement joins a fresh group
  and gets the current weights before it samples.
"""

from __future__ import annotations

import glob
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from rlsys.records import RolloutRequest
from tests.integration.transfer_helpers import base_and_perturbed, engine_gaps, learner_of, local_ray

pytestmark = pytest.mark.integration

REQUESTS = [RolloutRequest(f"p{i}", tuple(range(5 + i, 17 + 2 * i))) for i in range(3)]
SEEDS = {r.prompt_id: 100 + i for i, r in enumerate(REQUESTS)}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with local_ray(4):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    return base_and_perturbed(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def tp2(ray_cluster: None, models: tuple[str, str], tmp_path_factory) -> Iterator[tuple]:
    """A TP=2 rollout engine fed by a learner through torchdist (world 1 + 2)."""
    from rlsys.workers.rollout import RolloutPool, RolloutSpec
    from rlsys.workers.weight_path import TorchDistPath

    base, perturbed = models
    with learner_of(perturbed, str(tmp_path_factory.mktemp("init"))) as learners:
        spec = RolloutSpec(
            model_path=base,
            dtype="float32",
            max_tokens=12,
            transport="torchdist",
            tensor_parallel_size=2,
            executor="mp",
        )
        shm_before = set(glob.glob("/dev/shm/psm_*"))  # segments of anything but this engine
        pool = RolloutPool(
            spec, 1, num_cpus=1, num_threads=2, timeout_s=120, ready_timeout_s=300, restart_backoff_s=0.1
        )
        path = TorchDistPath(
            learners, pool, backend="gloo", bucket_bytes=1 << 20, piece_bytes=256 << 10, timeout_s=8.0, tp_size=2
        )
        path.start()
        try:
            yield learners, pool, path, shm_before
        finally:
            pool.shutdown()


def test_tp2_generation_matches_tp1_on_the_same_seeds(tp2, models) -> None:
    from rlsys.workers.rollout import RolloutPool, RolloutSpec

    _, pool, _, _ = tp2
    info = pool.describe()[0]
    assert len(info["ranks"]) == 2 and len({r["pid"] for r in info["ranks"]}) == 2
    assert info["pid"] not in {r["pid"] for r in info["ranks"]}  # the ranks are processes of their own
    assert [r["threads"] for r in info["ranks"]] == [1, 1]  # two threads split over two ranks

    ref_pool = RolloutPool(RolloutSpec(model_path=models[0], dtype="float32", max_tokens=12), 1, num_cpus=1)
    try:
        ref, _ = ref_pool.generate(REQUESTS, 4, SEEDS)
    finally:
        ref_pool.shutdown()
    got, _ = pool.generate(REQUESTS, 4, SEEDS)
    gaps = []
    for a, b in zip(ref, got):
        assert a.prompt_id == b.prompt_id
        for ca, cb in zip(a.completions, b.completions):
            np.testing.assert_array_equal(ca.token_ids, cb.token_ids)
            gaps.append(float(np.abs(ca.logprobs - cb.logprobs).max()))
    assert max(gaps) < 1e-4, max(gaps)


def test_a_push_reaches_every_tp_rank(tp2) -> None:
    import ray

    learners, pool, path, _ = tp2
    assert min(engine_gaps(learners, pool)) > 0.05
    report = path.push(1)
    assert report.replaced == ()
    states = report.engines[0]
    assert [s["version"] for s in states] == [1, 1]
    assert [s["nbytes"] for s in states] == [report.nbytes] * 2
    assert max(engine_gaps(learners, pool)) < 1e-3
    assert ray.get(pool.workers[0].vllm_weight_version.remote()) == "1"


def test_a_killed_tp2_worker_takes_its_ranks_along_and_its_replacement_gets_the_weights(tp2) -> None:
    import ray

    learners, pool, path, shm_before = tp2
    if path.version == 0:
        path.push(1)
    info = pool.describe()[0]
    rank_pids = [r["pid"] for r in info["ranks"]]
    scratch = ray.get(pool.workers[0].scratch_files.remote(), timeout=60)["paths"]
    # Every segment this engine made is known, the ones only its TP ranks map included.
    assert set(glob.glob("/dev/shm/psm_*")) - shm_before <= set(scratch), scratch
    os.kill(info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in rank_pids):
        assert time.monotonic() < deadline, f"TP rank processes {rank_pids} outlived their engine by 30 s"
        time.sleep(0.5)
    groups, stats = pool.generate(REQUESTS, 2, SEEDS)  # the pool replaces the dead worker and re-issues
    assert len(groups) == len(REQUESTS) and stats[0].restarts == 1
    assert pool.describe()[0]["pid"] != info["pid"]
    leaked = [p for p in scratch if os.path.exists(p)]
    assert not leaked, f"the killed TP worker's files were not removed: {leaked}"
    assert [g.weight_version for g in groups] == [1] * len(REQUESTS)
    assert max(engine_gaps(learners, pool)) < 1e-3
