"""ActorGroup, the one supervisor of the rollout, reward and learner actors, over tiny Ray actors.

Marked ``integration``: it starts Ray on a loopback-only local cluster. The actor classes are defined
inside functions so that Ray ships them by value (the workers need not import this test module).
The rollout and reward groups are run with their actor class swapped for a fake, which checks their
own error paths in seconds, without vLLM or verifier processes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rlsys.cluster import connect, loopback_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    started = connect(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def _worker_class() -> type:
    class Worker:
        def __init__(self, index: int, die_in_call: bool = False, fail_init: bool = False, mortal: bool = False):
            if fail_init:
                raise ValueError(f"worker {index} refuses to start")
            self.index = index
            self.die_in_call = die_in_call
            self.mortal = mortal
            self.seen: list[str] = []

        def die_after(self, seconds: float) -> tuple[int, int]:
            time.sleep(seconds)
            if self.mortal:
                os._exit(1)
            return self.index, os.getpid()

        def record(self, tag: str) -> None:
            self.seen.append(tag)

        def seen_tags(self) -> list[str]:
            return self.seen

        def ready(self) -> int:
            return self.index

        def pid(self) -> int:
            return os.getpid()

        def work(self, seconds: float = 0.0) -> tuple[int, int]:
            if self.die_in_call:
                os._exit(1)  # an actor death, not an error raised by the call
            time.sleep(seconds)
            return self.index, os.getpid()

        def boom(self) -> None:
            raise KeyError("bad input")

        def raise_worker_error(self) -> None:
            from rlsys.workers.supervision import WorkerTimeout

            raise WorkerTimeout("inner timeout", group="inner", workers=(7,), deadline_s=3.0)

        def shutdown(self) -> None:
            pass

    return Worker


def _group(num_workers: int = 2, **kwargs: Any):
    from rlsys.workers.group import ActorGroup, Labels

    kwargs.setdefault("init_args", lambda i: ((i,), {}))
    return ActorGroup(
        _worker_class(),
        num_workers,
        labels=Labels("test", "test worker"),
        options={"num_cpus": 0.1},
        ready_timeout_s=60,
        **kwargs,
    )


def test_call_over_its_deadline_raises_worker_timeout_naming_group_worker_deadline(ray_cluster: None) -> None:
    from rlsys.workers.supervision import WorkerError, WorkerTimeout

    group = _group()
    group.start()
    try:
        with pytest.raises(WorkerTimeout) as info:
            group.call({0: lambda a: a.work.remote(0.0), 1: lambda a: a.work.remote(30.0)}, "work", 1.0)
        err = info.value
        assert (err.group, err.workers, err.worker, err.deadline_s) == ("test", (1,), 1, 1.0)
        assert isinstance(err, WorkerError) and isinstance(err, RuntimeError) and isinstance(err, TimeoutError)
        assert "test worker 1 did not answer within 1 s" in str(err)
    finally:
        group.shutdown(timeout_s=1.0)
    assert group.actors == []


def test_error_raised_by_a_call_is_not_retried(ray_cluster: None) -> None:
    from rlsys.workers.supervision import RestartPolicy, WorkerError, WorkerTimeout

    group = _group(restart=RestartPolicy(max_restarts=3, backoff_s=0.0), config_key="test.max_restarts")
    group.start()
    try:
        with pytest.raises(WorkerError, match=r"phase poking: test worker 0 failed: .*bad input") as info:
            group.call({0: lambda a: a.boom.remote()}, "poking", 30.0)
        assert info.value.workers == (0,)
        assert group.restarts == 0
        # A WorkerError raised inside an actor crosses Ray with its fields (the learner raises its own).
        import ray

        with pytest.raises(WorkerTimeout) as raw:
            ray.get(group.actors[1].raise_worker_error.remote(), timeout=60)
        assert (raw.value.group, raw.value.workers, raw.value.deadline_s) == ("inner", (7,), 3.0)
        assert isinstance(raw.value, ray.exceptions.RayTaskError) and "inner timeout" in str(raw.value)
    finally:
        group.shutdown()


def test_death_is_replaced_with_on_start_and_the_call_reissued(ray_cluster: None) -> None:
    import ray

    from rlsys.workers.supervision import RestartPolicy

    created: list[int] = []
    started: list[int] = []
    retired: list[int] = []

    def init_args(i: int) -> tuple[tuple, dict]:
        created.append(i)
        # Only the first actor in slot 1 dies in its call; its replacement answers.
        return (i,), {"die_in_call": i == 1 and created.count(1) == 1}

    def on_start(i: int, actor: Any) -> str:
        started.append(i)
        return f"started {i}"

    group = _group(
        init_args=init_args,
        restart=RestartPolicy(max_restarts=1, backoff_s=0.0),
        config_key="test.max_restarts",
        on_start=on_start,
        on_retire=retired.append,
    )
    assert group.start() == [0, 1]
    try:
        first_pid = ray.get(group.actors[1].pid.remote())
        results, restarts = group.call({i: (lambda a: a.work.remote(0.0)) for i in range(2)}, "work", 60.0)
        assert [results[i][0] for i in range(2)] == [0, 1]
        assert results[1][1] != first_pid
        assert restarts == {0: 0, 1: 1} and group.restarts == 1 and group.restarts_by_worker == [0, 1]
        assert started == [0, 1, 1] and retired == [1]
    finally:
        group.shutdown()
    assert sorted(retired) == [0, 1, 1]


def test_an_actor_two_threads_see_die_is_replaced_once(ray_cluster: None) -> None:
    """The off-policy trainer modes call one rollout group from two threads: a death both see is
    one replacement, and the second thread's call goes to it."""
    import ray

    from rlsys.workers.supervision import RestartPolicy

    created: list[int] = []
    started: list[int] = []

    def init_args(i: int) -> tuple[tuple, dict]:
        created.append(i)
        return (i,), {"mortal": i == 1 and created.count(1) == 1}  # only the first actor in slot 1 dies

    group = _group(
        init_args=init_args,
        restart=RestartPolicy(max_restarts=3, backoff_s=0.0),
        config_key="test.max_restarts",
        on_start=lambda i, a: started.append(i),
    )
    group.start()
    try:
        old_pid = ray.get(group.actors[1].pid.remote())
        out: dict[str, Any] = {}

        def caller(name: str, issue: Any) -> None:
            try:
                out[name] = group.call({1: issue}, name, 60.0)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                out[name] = exc

        dying = threading.Thread(target=caller, args=("dying", lambda a: a.die_after.remote(1.0)))
        queued = threading.Thread(target=caller, args=("queued", lambda a: a.work.remote(0.0)))
        dying.start()
        time.sleep(0.3)
        queued.start()  # queues behind the dying call on the same actor: both see the death
        dying.join(120)
        queued.join(120)
        assert not isinstance(out["dying"], BaseException), out["dying"]
        assert not isinstance(out["queued"], BaseException), out["queued"]
        (res_d, restarts_d), (res_q, restarts_q) = out["dying"], out["queued"]
        assert group.restarts == 1 and created.count(1) == 2 and started.count(1) == 2
        assert restarts_d[1] + restarts_q[1] == 1  # one call replaced it, the other found it replaced
        new_pid = ray.get(group.actors[1].pid.remote())
        assert res_d[1] == (1, new_pid) and res_q[1] == (1, new_pid) and new_pid != old_pid
    finally:
        group.shutdown()


def test_calls_from_two_threads_reach_every_actor_in_one_order(ray_cluster: None) -> None:
    """Learner ranks are one collective group: if two threads' calls reached rank 0 and rank 1 in
    different orders, the ranks would wait on each other's collectives. ``call`` and ``submit``
    issue a thread's calls to all actors together. (Without that, an interleaving shows up within a
    few hundred rounds; with it, never.)"""
    import ray

    group = _group()
    group.start()
    try:
        rounds = 200
        gate = threading.Barrier(2)

        def via_call() -> None:
            for k in range(rounds):
                gate.wait()
                group.call({i: (lambda a, k=k: a.record.remote(f"call{k}")) for i in range(2)}, "record", 60.0)

        def via_submit() -> None:
            for k in range(rounds):
                gate.wait()
                ray.get(group.submit(lambda i, a, k=k: a.record.remote(f"submit{k}")), timeout=60)

        threads = [threading.Thread(target=via_call), threading.Thread(target=via_submit)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        seen = ray.get([a.seen_tags.remote() for a in group.actors], timeout=60)
        assert len(seen[0]) == 2 * rounds and seen[0] == seen[1]
    finally:
        group.shutdown()


def test_death_after_the_budget_is_spent_fails_naming_worker_and_key(ray_cluster: None) -> None:
    from rlsys.workers.supervision import RestartPolicy, WorkerError

    group = _group(
        init_args=lambda i: ((i,), {"die_in_call": i == 0}),
        restart=RestartPolicy(max_restarts=1, backoff_s=0.0),
        config_key="test.max_restarts",
    )
    group.start()
    try:
        with pytest.raises(WorkerError, match=r"phase work: test worker 0 died .*test\.max_restarts=1") as info:
            group.call({0: lambda a: a.work.remote(0.0)}, "work", 60.0)
        assert info.value.workers == (0,) and group.restarts == 1
    finally:
        group.shutdown()


def test_without_a_restart_policy_a_death_is_fatal_and_names_the_worker(ray_cluster: None) -> None:
    from rlsys.workers.supervision import WorkerError

    group = _group(init_args=lambda i: ((i,), {"die_in_call": i == 1}))
    group.start()
    try:
        with pytest.raises(WorkerError, match=r"phase train: test worker 1 failed: .*Actor") as info:
            group.call({i: (lambda a: a.work.remote(0.0)) for i in range(2)}, "train", 60.0)
        assert info.value.workers == (1,) and group.restarts == 0
    finally:
        group.shutdown()


def test_start_failure_kills_every_actor_and_names_the_worker(ray_cluster: None) -> None:
    from rlsys.workers.supervision import WorkerError

    retired: list[int] = []
    group = _group(init_args=lambda i: ((i,), {"fail_init": i == 1}), on_retire=retired.append)
    with pytest.raises(WorkerError, match=r"phase starting: test worker 1 failed: .*refuses to start") as info:
        group.start()
    assert info.value.workers == (1,)
    assert group.actors == [] and sorted(retired) == [0, 1]


# ---- the groups' own timeouts: one error type (WorkerTimeout) for rollout, reward (and learner) ----------


def test_rollout_group_timeout_is_a_worker_timeout(ray_cluster: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlsys.workers import rollout
    from rlsys.workers.supervision import WorkerTimeout

    class FakeRolloutActor:
        def __init__(self, spec: Any, worker_id: int):
            self.worker_id = worker_id

        def ready(self) -> int:
            return self.worker_id

        def scratch_files(self) -> dict:
            return {"node_id": "", "pid": os.getpid(), "paths": []}

        def generate(self, requests: list, group_size: int, seeds: list) -> Any:
            time.sleep(30)

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(rollout, "RolloutWorkerActor", FakeRolloutActor)
    group = rollout.RolloutGroup(rollout.RolloutSpec("no-model"), 1, num_cpus=0.1, timeout_s=1.0, ready_timeout_s=60)
    try:
        from rlsys.records import RolloutRequest

        with pytest.raises(WorkerTimeout) as info:
            group.generate([RolloutRequest("p0", (1, 2))], 2, {"p0": 0})
        err = info.value
        assert (err.group, err.workers, err.deadline_s) == ("rollout", (0,), 1.0)
        assert "phase rollout: rollout worker(s) [0] did not answer within rollout.timeout_s=1 s" in str(err)
        assert isinstance(err, TimeoutError)  # what the rollout group raised before: still caught as such
    finally:
        group.shutdown()


def test_reward_group_timeout_is_a_worker_timeout(ray_cluster: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlsys.records import GradeRequest
    from rlsys.workers import reward
    from rlsys.workers.supervision import WorkerTimeout

    class FakeRewardActor:
        def __init__(self, **grader_kwargs: Any):
            pass

        def ready(self) -> int:
            return 1

        def validate_specs(self, specs: list) -> None:
            pass

        def grade(self, requests: list) -> list:
            time.sleep(30)
            return []

        def close(self) -> None:
            pass

    monkeypatch.setattr(reward, "RewardWorkerImpl", FakeRewardActor)
    spec = reward.RewardSpec(
        num_workers=1,
        procs_per_worker=1,
        timeout_s=0.5,
        success_threshold=1.0,
        memory_limit_mb=0,
        allowed_functions=(),
        num_cpus=0.1,
        max_restarts=0,
    )
    group = reward.RewardGroup(spec, call_margin_s=0.5, restart_allowance_s=0.0)
    try:
        with pytest.raises(WorkerTimeout) as info:
            group.grade([GradeRequest("p0", 0, "1", "1", "math")])
        err = info.value
        assert (err.group, err.workers, err.deadline_s) == ("reward", (0,), 1.0)
        assert "reward phase: RewardWorker 0 did not finish grading 1 completions within 1s" in str(err)
    finally:
        group.shutdown()
