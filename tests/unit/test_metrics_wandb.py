"""What MetricsLogger sends W&B beyond scalars, read back from a real offline run file: per-step
histograms of the groups' success rates and focal weights, each evaluation's pass@k table and native
line plot, and the resolved run config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlsys.config import RLConfig, resolve, run_config
from rlsys.metrics import MetricsLogger
from tests import wandb_records


@pytest.fixture(autouse=True)
def no_wandb_service_left():
    """wandb.init starts a wandb-core service process that outlives the run; stop it, so that no
    later test in this process sees a child it did not start (the sandbox tests count children)."""
    yield
    import wandb

    wandb.teardown()


def test_histograms_pass_at_k_and_the_resolved_config_reach_the_offline_run(tmp_path):
    cfg = resolve(RLConfig())
    logger = MetricsLogger(tmp_path, wandb_mode="offline", project="t", config=run_config(cfg))
    success = [0.0, 0.125, 0.125, 1.0]  # G = 8: one bin per possible rate
    logger.log(1, {"reward/mean": 0.3})
    logger.log_histograms(1, {"algo/group_success_rate": (success, 9), "algo/group_focal_weight": ([1.0, 0.5], 20)})
    logger.log_pass_at_k("step_000001", 1, {1: 0.2, 4: 0.5, 16: 0.8})
    logger.close()

    path = wandb_records.run_file(tmp_path)
    rows = wandb_records.history(path)
    hist = next(r for r in rows if "algo/group_success_rate/_type" in r)
    assert hist["_step"] == 1 and hist["algo/group_success_rate/_type"] == "histogram"
    assert hist["algo/group_success_rate/values"] == [1, 2, 0, 0, 0, 0, 0, 0, 1]
    assert hist["algo/group_success_rate/bins"] == pytest.approx(list(np.linspace(0, 1, 10)))
    assert sum(hist["algo/group_focal_weight/values"]) == 2
    table = next(r for r in rows if "eval/pass_at_k_step_000001/_type" in r)
    assert table["eval/pass_at_k_step_000001/_type"] == "table-file"
    assert table["eval/pass_at_k_step_000001/nrows"] == 3
    assert table["eval/pass_at_k_plot_step_000001_table/_type"] == "table-file"  # the line plot's data
    # The line plot is a native W&B (Vega) panel over that table, x = log2 k.
    raw = path.read_bytes()
    assert b'"panelDefId":"wandb/line/v0"' in raw and b'"x":"log2_k","y":"pass@k"' in raw
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/pass_at_k_step_000001_*.table.json"))
    assert len(media) == 1
    import json

    data = json.loads(media[0].read_text())
    assert data["columns"] == ["k", "log2_k", "pass@k"]
    assert data["data"] == [[1, 0.0, 0.2], [4, 2.0, 0.5], [16, math.log2(16), 0.8]]
    # The run config: every setting, and what the start-up resolved.
    config = wandb_records.run_config(path)
    assert config["trainer"]["total_steps"] == 80
    assert config["resolved"]["sync.transport"] == "torchdist" and config["resolved"]["sync.backend"] == "gloo"
    assert config["resolved"]["model.dtype"] in ("bfloat16", "float32")
    assert config["resolved"]["model.dtype"] == cfg.model.dtype and config["resolved"]["algo.is_correction"] == "off"


def test_nothing_is_sent_with_wandb_disabled(tmp_path):
    logger = MetricsLogger(tmp_path, wandb_mode="disabled")
    logger.log_histograms(1, {"algo/group_success_rate": ([0.5], 9)})
    logger.log_pass_at_k("start", 0, {1: 0.1})
    logger.close()
    assert not (tmp_path / "wandb").exists()
