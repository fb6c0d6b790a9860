"""The off-policy trainer modes and PPO mini-batches end to end on the real stack (Ray, vLLM CPU,
DeepSpeed): the training CLI in ``trainer.mode=one_step_off`` (with two PPO mini-batches) and in
``trainer.mode=async`` on the async engine (weights land while requests are in flight), each with
the staleness bound asserted from the versions every completion recorded.

Exact resume per mode lives in tests/integration/test_resume.py.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.test_train import check_run, compute_line, digit_data, run_train

pytestmark = pytest.mark.integration


def _updates(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "updates.jsonl").read_text().splitlines()]


def test_one_step_off_with_ppo_mini_batches(tmp_path):
    res, bad = run_train(
        tmp_path,
        "trainer.total_steps=3",
        "trainer.mode=one_step_off",
        "trainer.mini_batches=2",
        "model.dtype=float32",  # the first update's ratio is then 1 to float32 rounding
        "cluster.num_cpus=4",
        *digit_data(tmp_path),
    )
    rows = check_run(tmp_path, res, bad, steps=3)
    assert "trainer.mode=one_step_off: generating up to 1 batch(es) ahead" in res.stdout
    # Batch 1 is the initial policy's; every later one was sampled one version before it was trained.
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1]
    assert [r["rollout/staleness_mean"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["rollout/dropped_stale_groups"] == 0 for r in rows)
    # The importance correction is on by default off-policy (truncate at 2).
    assert all(0 < r["train/tis_weight_mean"] <= 2 for r in rows)
    # Two optimizer steps per batch, pi_old once; the second update runs on moved weights.
    assert all(r["train/updates"] == 2 and r["time/pi_old"] > 0 for r in rows)
    ups = _updates(tmp_path)
    assert [(u["step"], u["update"]) for u in ups] == [(s, k) for s in (1, 2, 3) for k in (0, 1)]
    for first, second in zip(ups[::2], ups[1::2]):
        assert abs(first["ratio_max"] - 1) < 1e-4 and abs(first["ratio_min"] - 1) < 1e-4
        assert second["ratio_max"] - second["ratio_min"] > 1e-4
    # Generation overlaps training: the two roles split the machine's cores instead of each taking all.
    learners, engines = compute_line(res.stdout)
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    assert learners == [("float32", half)] and engines == [("float32", half)]


def test_async_mode_on_the_async_engine(tmp_path):
    res, bad = run_train(
        tmp_path,
        "trainer.total_steps=4",
        "trainer.mode=async",
        "trainer.max_staleness=2",
        "rollout=async",
        "sync.transport=torchdist",
        "cluster.num_cpus=4",
        *digit_data(tmp_path),
        timeout=1200,
    )
    rows = check_run(tmp_path, res, bad, steps=4)
    assert all(r["rollout/staleness_max"] <= 2 and r["rollout/dropped_stale_groups"] == 0 for r in rows)
    assert rows[0]["rollout/staleness_max"] == 0
    assert max(r["rollout/staleness_max"] for r in rows) >= 1  # it did run ahead
    assert all("time/wait_rollout" in r and "time/rollout_idle" in r for r in rows)
