"""The supervision policy without Ray: restart budget, backoff, and one error hierarchy for all groups."""

from __future__ import annotations

import pickle
import sys

import pytest

from rlsys.workers.supervision import RestartBudget, RestartPolicy, WorkerError, WorkerTimeout


def test_worker_timeout_is_a_worker_error_and_a_timeout_error() -> None:
    err = WorkerTimeout(
        "phase rollout: rollout worker(s) [1] did not answer", group="rollout", workers=[1], deadline_s=2.5
    )
    assert isinstance(err, WorkerError) and isinstance(err, RuntimeError) and isinstance(err, TimeoutError)
    assert (err.group, err.workers, err.worker, err.deadline_s) == ("rollout", (1,), 1, 2.5)
    assert str(err) == "phase rollout: rollout worker(s) [1] did not answer"


@pytest.mark.parametrize(
    "err",
    [
        WorkerError("reward phase: RewardWorker 0 failed", group="reward", workers=(0,)),
        WorkerTimeout(
            "learner phase 'train': rank(s) [0, 1] did not finish", group="learner", workers=(0, 1), deadline_s=900.0
        ),
        WorkerError("plain message"),
    ],
)
def test_worker_errors_survive_pickling_with_their_fields(err: WorkerError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert back.__dict__ == err.__dict__


def test_restart_budget_raises_a_worker_error_naming_group_worker_and_key() -> None:
    budget = RestartBudget(
        "reward",
        2,
        RestartPolicy(max_restarts=1, backoff_s=0.0),
        "reward.max_restarts",
        label=lambda w, what: f"reward phase: RewardWorker {w} died while {what}",
    )
    assert budget.charge(0, "grading", RuntimeError("boom")) == 1
    with pytest.raises(WorkerError, match=r"RewardWorker 0 died while grading .*reward\.max_restarts=1.*boom") as info:
        budget.charge(0, "grading", RuntimeError("boom"))
    assert (info.value.group, info.value.workers) == ("reward", (0,))
    assert (budget.total, budget.by_worker) == (1, [1, 0])


def test_restart_policy_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(max_restarts=5, backoff_s=0.5, backoff_max_s=1.5)
    assert [policy.backoff(n) for n in range(5)] == [0.0, 0.5, 1.0, 1.5, 1.5]
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)


@pytest.mark.parametrize(
    "modules, forbidden",
    [
        # rlsys.rewards is the Ray-free half of grading: neither Ray nor the workers layer above it.
        ("rlsys.rewards, rlsys.rewards.grader", ("ray", "rlsys.workers")),
        # The supervisor loads Ray only when a group starts.
        ("rlsys.workers.group, rlsys.workers.supervision, rlsys.workers.reward, rlsys.workers.rollout", ("ray",)),
    ],
)
def test_imports_stay_off_ray(modules: str, forbidden: tuple[str, ...]) -> None:
    import subprocess

    code = (
        f"import sys, {modules}; "
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r})]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
