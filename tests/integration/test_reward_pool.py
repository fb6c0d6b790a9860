"""RewardPool over real Ray actors on a loopback-only local cluster.

Marked ``integration``: it starts Ray (a few seconds) and two actors each with a verifier process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from rlsys.cluster import connect, loopback_env
from rlsys.records import GRADE_ERROR, GRADE_OK, GRADE_TIMEOUT, GradeRequest

pytestmark = pytest.mark.integration

REWARD_FNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "reward_fns.py")
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    started = connect(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_reward_pool_grades_a_mixed_batch(ray_cluster: None) -> None:
    from rlsys.workers.reward import RewardPool

    pool = RewardPool(
        num_workers=2,
        timeout_s=TIMEOUT_S,
        procs_per_worker=1,
        allowed_functions=[f"{REWARD_FNS}:*"],
        actor_options={"num_cpus": 1},
    )
    try:
        requests = []
        for p in range(4):
            for s in range(4):
                completion = rf"\boxed{{{s}}}" if s < 3 else "no answer"
                requests.append(GradeRequest(f"p{p}", s, completion, "1", "math"))
        requests.append(GradeRequest("hang", 0, "hang", "1", f"{REWARD_FNS}:sleep_if_asked"))
        requests.append(GradeRequest("die", 0, "x", "1", f"{REWARD_FNS}:exits"))
        requests.append(GradeRequest("fn", 0, "1", "1", f"{REWARD_FNS}:sleep_if_asked"))
        requests.reverse()  # the pool must return grades in request order, not actor order

        start = time.monotonic()
        grades = pool.grade(requests)
        elapsed = time.monotonic() - start

        assert [(g.prompt_id, g.sample_index) for g in grades] == [(r.prompt_id, r.sample_index) for r in requests]
        by_key = {(g.prompt_id, g.sample_index): g for g in grades}
        assert by_key[("hang", 0)].status == GRADE_TIMEOUT
        assert by_key[("die", 0)].status == GRADE_ERROR
        assert by_key[("fn", 0)].correct
        for p in range(4):
            assert [by_key[(f"p{p}", s)].correct for s in range(4)] == [False, True, False, False]
        assert elapsed < 30.0

        counters = pool.counters()
        assert counters[GRADE_OK] == 17
        assert counters[GRADE_TIMEOUT] == 1
        assert counters[GRADE_ERROR] == 1
        assert counters["no_answer"] == 4
        assert counters["restarts"] == 2

        with pytest.raises(ValueError, match="is not allowed"):
            pool.grade([GradeRequest("x", 0, "1", "1", "some_module:fn")])
        with pytest.raises(ValueError, match="duplicate"):
            pool.grade([requests[0], requests[0]])
        assert pool.grade([]) == []
    finally:
        pool.shutdown()
    pool.shutdown()  # idempotent


def test_reward_pool_names_a_dead_actor(ray_cluster: None) -> None:
    import ray

    from rlsys.workers.reward import RewardPool

    pool = RewardPool(num_workers=2, timeout_s=TIMEOUT_S, num_cpus=0.5, max_restarts=0)
    try:
        ray.kill(pool._actors[1])
        requests = [GradeRequest("p", i, r"\boxed{1}", "1", "math") for i in range(4)]
        with pytest.raises(RuntimeError, match="reward phase: RewardWorker 1 died"):
            pool.grade(requests)
    finally:
        pool.shutdown()
