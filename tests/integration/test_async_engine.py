"""The async engine interface (issue 13, item 6): rollout workers on vLLM's AsyncLLM take a torchdist
weight push while their generate calls are in flight. The push pauses generation in keep mode,
transfers, and resumes: nothing is aborted, the in-flight completions continue under the new weights,
and each completion's ``version_spans`` say which tokens which version sampled."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rlsys.records import RolloutRequest
from tests.integration.transfer_helpers import base_and_perturbed, engine_gaps, learner_of, local_ray

pytestmark = pytest.mark.integration

LONG = [RolloutRequest(f"long{i}", tuple(range(5 + i, 15 + i))) for i in range(8)]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with local_ray(4):
        yield


@pytest.fixture(scope="module")
def async_actors(ray_cluster: None, tmp_path_factory) -> Iterator[tuple]:
    from rlsys.workers.rollout import RolloutPool, RolloutSpec
    from rlsys.workers.weight_path import TorchDistPath

    base, perturbed = base_and_perturbed(tmp_path_factory.mktemp("async"))
    with learner_of(perturbed, str(tmp_path_factory.mktemp("init"))) as learners:
        spec = RolloutSpec(
            model_path=base, dtype="float32", max_tokens=400, transport="torchdist", engine="async", max_model_len=512
        )
        pool = RolloutPool(spec, 1, num_cpus=1, num_threads=2, timeout_s=120, ready_timeout_s=300)
        path = TorchDistPath(learners, pool, backend="gloo", bucket_bytes=1 << 20, piece_bytes=256 << 10, timeout_s=8.0)
        path.start()
        try:
            yield learners, pool, path
        finally:
            pool.shutdown()


def test_a_push_lands_in_flight_and_completions_record_both_versions(async_actors) -> None:
    import ray

    learners, pool, path = async_actors
    worker = pool.workers[0]
    info = pool.describe()[0]
    assert info["ranks"][0]["pid"] != info["pid"]  # AsyncLLM's engine core is a process of its own
    assert min(engine_gaps(learners, pool)) > 0.05
    seeds = list(range(len(LONG)))
    ray.get(worker.generate.remote(LONG[:1], 1, [0]), timeout=120)  # warm: the first step is slow
    t0 = time.monotonic()
    inflight = worker.generate.remote(LONG, 4, seeds)
    time.sleep(0.5)  # some tokens are sampled under version 0 ...
    report = path.push(1)  # ... the rest under version 1, after a pause in keep mode
    groups, stats = ray.get(inflight, timeout=300)
    took = time.monotonic() - t0
    assert report.replaced == ()
    state = report.engines[0][0]
    assert state["version"] == 1 and state["pause_s"] > 0
    assert len(groups) == len(LONG) and all(len(g.completions) == 4 for g in groups)
    mixed = 0
    for g in groups:
        for c in g.completions:
            spans = c.version_spans
            # Contiguous, in order, covering every token, versions never going back.
            assert spans[0][1] == 0 and spans[-1][2] == len(c.token_ids), spans
            assert all(a[2] == b[1] for a, b in zip(spans, spans[1:])), spans
            assert [v for v, _, _ in spans] == sorted(v for v, _, _ in spans), spans
            assert {v for v, _, _ in spans} <= {0, 1}
            mixed += len(spans) == 2
        assert g.weight_version == min(v for c in g.completions for v, _, _ in c.version_spans)
    assert mixed > 0, f"no completion spanned the update (generation took {took:.1f} s)"
    assert stats.num_tokens == sum(len(c.token_ids) for g in groups for c in g.completions)
    assert max(engine_gaps(learners, pool)) < 1e-3  # the update landed: the engine scores like the learner
    assert ray.get(worker.vllm_weight_version.remote()) == "1"


def test_after_the_push_every_token_is_the_new_version(async_actors) -> None:
    learners, pool, path = async_actors
    if path.version == 0:
        path.push(1)
    groups, _ = pool.generate(LONG[:2], 2, {r.prompt_id: 5 for r in LONG[:2]})
    for g in groups:
        assert g.weight_version == 1
        for c in g.completions:
            assert c.version_spans == ((1, 0, len(c.token_ids)),)


def test_a_killed_async_worker_takes_its_engine_core_along_and_is_replaced(async_actors) -> None:
    import os
    import signal

    import psutil

    learners, pool, path = async_actors
    if path.version == 0:
        path.push(1)
    info = pool.describe()[0]
    core = info["ranks"][0]["pid"]
    os.kill(info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(core) and psutil.Process(core).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"AsyncLLM engine core {core} outlived its worker by 30 s"
        time.sleep(0.5)
    groups, stats = pool.generate(LONG[:2], 2, {r.prompt_id: 5 for r in LONG[:2]})
    assert stats[0].restarts == 1 and [g.weight_version for g in groups] == [1, 1]
    assert max(engine_gaps(learners, pool)) < 1e-3
