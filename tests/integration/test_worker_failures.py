"""Worker deaths mid-step: rollout and reward workers are SIGKILLed and the pools recover.

Real Ray (loopback-only local cluster) and real vLLM engines on the tiny model. What is checked:

* a rollout worker killed while generating is replaced, brought to the latest pushed weights
  (version 1, not the checkpoint it starts from), its prompts are re-issued with the same seeds,
  and the call returns every prompt exactly once with the same tokens an unkilled call produced;
* a rollout worker that cannot come back fails the call with a RuntimeError naming the worker,
  the phase and the last error, in bounded time (no hang);
* a reward actor killed while grading is replaced and its chunk re-graded: every grade exactly once.

The vLLM engines run one thread each (Ray sets OMP_NUM_THREADS from num_cpus=1); the whole module
takes ~1-2 minutes on the 2-core box, mostly engine start-ups.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rlsys.cluster import connect, loopback_env
from rlsys.records import GRADE_OK, GRADE_TIMEOUT, GradeRequest, RolloutRequest

pytestmark = pytest.mark.integration

REWARD_FNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit", "reward_fns.py")
NUM_PROMPTS = 8
GROUP_SIZE = 4
MAX_TOKENS = 384  # long enough that a generate call is still running when the kill lands


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    # Logical CPUs: two rollout actors (1 each) plus reward actors; they share the 2 real cores.
    started = connect(None, num_cpus=4)
    yield
    if started:
        ray.shutdown()


def copy_tiny_model(dest: Path) -> str:
    """A private copy of the cached tiny model (test 2 removes it; the cache is shared)."""
    from rlsys.models import ensure_tiny_model

    shutil.copytree(ensure_tiny_model(), dest)
    return str(dest)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return copy_tiny_model(tmp_path_factory.mktemp("wf") / "tiny")


def make_requests(model_path: str) -> list[RolloutRequest]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [
        RolloutRequest(f"p{k}", tuple(tok(f"Question {k}: what is {k} plus {k + 3}? Answer:")["input_ids"]))
        for k in range(NUM_PROMPTS)
    ]


def perturbed_weight_refs(model_path: str, scale: float = 0.05) -> list:
    """The checkpoint's weights plus seeded noise, as Ray weight-bucket refs (held by the caller)."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from rlsys.workers.weight_sync import iter_buckets

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1234)
    named = []
    # state_dict() lists the tied lm_head.weight too; vLLM's Qwen2 loader skips it (the learner sends it once).
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t = (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype)
        named.append((name, t))
    return [ray.put(b) for b in iter_buckets(named, 1 << 20)]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_when_busy(pid: int, done: threading.Event, busy_cpu_s: float = 0.3, limit_s: float = 60.0) -> float | None:
    """SIGKILL ``pid`` once it has burned ``busy_cpu_s`` of CPU (it is generating); return the kill time.

    Returns None if ``done`` is set first (the call finished before the kill could land).
    """
    start = cpu_seconds(pid)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not done.is_set():
        if cpu_seconds(pid) - start >= busy_cpu_s:
            os.kill(pid, signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.02)
    return None


def token_ids(groups) -> dict[str, list[list[int]]]:
    return {g.prompt_id: [c.token_ids.tolist() for c in g.completions] for g in groups}


def test_supervision_classifies_ray_errors() -> None:
    import ray.exceptions as rex

    from rlsys.workers.supervision import RestartBudget, RestartPolicy, is_actor_death

    assert is_actor_death(rex.ActorDiedError())
    assert is_actor_death(rex.RayActorError())
    assert is_actor_death(rex.WorkerCrashedError())
    assert is_actor_death(rex.ObjectLostError("00" * 28, "owner", "call site"))
    assert not is_actor_death(rex.GetTimeoutError("slow"))
    assert not is_actor_death(ValueError("bad input"))
    # An error raised by the task, even one wrapping a "lost object" cause, is not a death.
    wrapped = rex.RayTaskError("f", "tb", rex.ObjectLostError("00" * 28, "owner", "call site")).as_instanceof_cause()
    assert not is_actor_death(wrapped)

    budget = RestartBudget("rollout", 2, RestartPolicy(max_restarts=1, backoff_s=0.0), "rollout.max_restarts")
    assert budget.charge(1, "rollout", RuntimeError("boom")) == 1
    with pytest.raises(RuntimeError, match=r"phase rollout: rollout worker 1 died.*rollout\.max_restarts=1.*boom"):
        budget.charge(1, "rollout", RuntimeError("boom"))
    assert budget.charge(0, "rollout", RuntimeError("boom")) == 1
    assert (budget.total, budget.by_worker) == (2, [1, 1])
    assert RestartPolicy(backoff_s=0.5, backoff_max_s=1.5).backoff(3) == 1.5


def test_rollout_worker_killed_mid_generate_is_restarted_with_current_weights(
    ray_cluster: None, model_dir: str
) -> None:
    import ray

    from rlsys.workers.rollout import RolloutPool, RolloutSpec

    requests = make_requests(model_dir)
    seeds = {r.prompt_id: 1000 + k for k, r in enumerate(requests)}
    probe = list(requests[0].prompt_token_ids) + [5, 6, 7, 8]
    spec = RolloutSpec(model_dir, max_tokens=MAX_TOKENS, kv_cache_memory_bytes=64 << 20, seed=0)
    pool = RolloutPool(spec, 2, num_cpus=1, timeout_s=300, ready_timeout_s=300, max_restarts=3, restart_backoff_s=0.1)
    try:
        initial_lp = pool.sequence_logprobs(probe, worker=0)[0]
        refs = perturbed_weight_refs(model_dir)
        pool.load_weight_buckets(refs, 1)
        del refs  # the pool holds them now: a restarted worker must get version 1 from it
        pushed_lp = pool.sequence_logprobs(probe, worker=0)[0]
        assert np.abs(pushed_lp - initial_lp).max() > 0.1, "the perturbation should change the model"

        # Reference: the same call on unkilled workers (same weights, same seeds).
        t0 = time.monotonic()
        reference, _ = pool.generate(requests, GROUP_SIZE, seeds)
        reference_s = time.monotonic() - t0

        victim = 1
        pid = ray.get(pool.workers[victim].pid.remote())
        dead_files = list(pool._scratch[victim]["paths"])
        assert any("vllm_dist_" in p for p in dead_files), dead_files  # the rendezvous file a SIGKILL leaks
        result: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                result["out"] = pool.generate(requests, GROUP_SIZE, seeds)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                result["err"] = e
            finally:
                result["t_end"] = time.monotonic()
                done.set()

        thread = threading.Thread(target=run)
        thread.start()
        t_kill = kill_when_busy(pid, done)
        thread.join(timeout=600)
        assert not thread.is_alive(), "generate hung after a worker was killed"
        assert t_kill is not None, "generate finished before the worker could be killed (make MAX_TOKENS larger)"
        if "err" in result:
            raise result["err"]
        groups, stats = result["out"]
        recovery_s = result["t_end"] - t_kill

        # Every requested prompt exactly once, in request order, each a full group.
        counts = Counter(g.prompt_id for g in groups)
        assert counts == Counter(r.prompt_id for r in requests)
        assert [g.prompt_id for g in groups] == [r.prompt_id for r in requests]
        assert all(len(g.completions) == GROUP_SIZE for g in groups)
        # The replacement sampled with the re-pushed weights (version 1), not the checkpoint's.
        assert {g.weight_version for g in groups} == {1}
        killed = [g for g in groups if g.worker_id == victim]
        assert killed, "the killed worker's prompts should have been re-issued to its replacement"
        # Same (weights, prompt, seed) -> the same tokens as the unkilled reference call.
        assert token_ids(groups) == token_ids(reference)
        assert pool.restarts == 1 and pool.restarts_by_worker == [0, 1]
        assert {s.worker_id: s.restarts for s in stats} == {0: 0, 1: 1}
        assert ray.get(pool.workers[victim].pid.remote()) != pid
        assert ray.get(pool.workers[victim].weight_version.remote()) == 1
        # The replacement scores like the survivor (same weights), and its predecessor's files are gone.
        lp = pool.sequence_logprobs(probe)
        assert np.abs(lp[0] - lp[1]).max() < 1e-3
        assert not [p for p in dead_files if os.path.exists(p)]
        print(
            f"\nrollout: reference call {reference_s:.1f} s; kill -> call complete {recovery_s:.1f} s "
            f"(engine restart + weight re-push + re-issued shard)"
        )
        live_files = [p for s in pool._scratch for p in s.get("paths", [])]
    finally:
        pool.shutdown()
    assert not [p for p in live_files if os.path.exists(p)], "shutdown should leave no vLLM scratch files"


def test_rollout_worker_that_cannot_come_back_fails_fast(ray_cluster: None, tmp_path: Path) -> None:
    import ray

    from rlsys.workers.rollout import RolloutPool, RolloutSpec

    model = copy_tiny_model(tmp_path / "tiny")
    requests = make_requests(model)[:2]
    seeds = {r.prompt_id: k for k, r in enumerate(requests)}
    pool = RolloutPool(
        RolloutSpec(model, max_tokens=8, kv_cache_memory_bytes=64 << 20),
        1,
        num_cpus=1,
        timeout_s=120,
        ready_timeout_s=120,
        max_restarts=2,
        restart_backoff_s=0.1,
    )
    try:
        # Every replacement will fail at start-up (its checkpoint is gone), and the worker dies now.
        shutil.rmtree(model)
        os.kill(ray.get(pool.workers[0].pid.remote()), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            pool.generate(requests, 2, seeds)
        elapsed = time.monotonic() - t0
        message = str(info.value)
        assert "phase rollout" in message and "rollout worker 0" in message, message
        assert "rollout.max_restarts=2" in message, message
        assert "Last error:" in message and model in message, message  # the root cause: no checkpoint
        assert pool.restarts == 2
        assert elapsed < 180, f"giving up took {elapsed:.0f} s"
        print(f"\nrollout: gave up after {pool.restarts} failed restarts in {elapsed:.1f} s: {message[:300]}")
    finally:
        pool.shutdown()


def test_reward_worker_killed_mid_grading_is_restarted(ray_cluster: None) -> None:
    import ray

    from rlsys.workers.reward import RewardPool

    slow = f"{REWARD_FNS}:sleep_if_asked"
    pool = RewardPool(
        num_workers=2,
        timeout_s=1.0,
        procs_per_worker=1,
        allowed_functions=[f"{REWARD_FNS}:*"],
        num_cpus=0.5,
        max_restarts=2,
        restart_backoff_s=0.1,
    )
    try:
        requests = []
        for p in range(4):
            for s in range(4):
                # Two "hang" samples per prompt: each chunk takes several seconds (timeouts),
                # so the kill below lands while the victim is grading.
                completion = "hang" if s < 2 else ("1" if s == 2 else "0")
                requests.append(GradeRequest(f"p{p}", s, completion, "1", slow))
        victim = 1
        pid = ray.get(pool._actors[victim].pid.remote())
        result: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                result["grades"] = pool.grade(requests)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                result["err"] = e
            finally:
                result["t_end"] = time.monotonic()
                done.set()

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.5)
        assert not done.is_set(), "grading finished before the kill"
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        thread.join(timeout=300)
        assert not thread.is_alive(), "grade hung after a reward actor was killed"
        if "err" in result:
            raise result["err"]
        grades = result["grades"]
        keys = [(g.prompt_id, g.sample_index) for g in grades]
        assert keys == [(r.prompt_id, r.sample_index) for r in requests]
        assert len(set(keys)) == len(requests)
        for g in grades:
            if g.sample_index < 2:
                assert g.status == GRADE_TIMEOUT, g
            else:
                assert g.status == GRADE_OK and g.correct == (g.sample_index == 2), g
        assert pool.restarts == 1 and pool.restarts_by_worker == [0, 1]
        assert ray.get(pool._actors[victim].pid.remote()) != pid
        # The dead actor never reported; the replacement graded its whole chunk.
        assert pool.counters()[GRADE_TIMEOUT] == 8
        print(f"\nreward: kill -> grades complete {result['t_end'] - t_kill:.1f} s")
    finally:
        pool.shutdown()
