"""A Hydra sweep on a local machine: ``python -m rlsys.train -m algo=grpo,f_grpo``, 1-step jobs on
the real stack. Each job runs in its own directory with its own local Ray cluster (started and
stopped), is grouped in W&B under the sweep's name with its overrides as name and tags, and
scripts/collect_sweep.py gathers the jobs into one table and plot."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests import wandb_records
from tests.integration.test_train import ROOT, SMALL, digit_data
from tests.scripts import load_script

pytestmark = pytest.mark.integration


def test_a_local_sweep_runs_each_job_apart_grouped_in_wandb_and_collected(tmp_path):
    sweep = tmp_path / "sweep"
    small = [o for o in SMALL if not o.startswith("trainer.total_steps=")]
    cmd = [sys.executable, "-m", "rlsys.train", "-m", *small, "trainer.total_steps=1", "algo=grpo,f_grpo"]
    cmd += [f"hydra.sweep.dir={sweep}", "cluster.num_cpus=4", *digit_data(tmp_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert out.count("started a local loopback-only Ray cluster") == 2  # one per job, each stopped after
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.jsonl").exists())
    assert jobs == ["0", "1"]
    for job, algo in zip(jobs, ["grpo", "f_grpo"]):
        path = wandb_records.run_file(sweep / job)
        info = wandb_records.run_info(path)
        assert info["group"] == "sweep"
        assert f"algo={algo}" in info["name"].split(",")  # the name: the job's overrides, sorted
        assert {"algo", "trainer.total_steps", "cluster.num_cpus"} <= set(info["tags"])
        assert wandb_records.run_config(path)["algo"]["name"] == algo
        assert (sweep / job / "checkpoints" / "step_000001").is_dir()

    result = load_script("collect_sweep").collect(sweep, tmp_path / "collected")
    assert [j["job"] for j in result["jobs"]] == ["0", "1"] and all(j["finished"] for j in result["jobs"])
    assert result["ks"] == [1, 4] and len(result["configs"]) == 2
    with open(tmp_path / "collected" / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [next(o for o in r["overrides"].split() if o.startswith("algo=")) for r in rows] == [
        "algo=grpo",
        "algo=f_grpo",
    ]
    assert all(0 <= float(r["pass@1_end"]) <= float(r["pass@4_end"]) <= 1 for r in rows)
    assert (tmp_path / "collected" / "sweep_pass_at_k.png").stat().st_size > 0
    assert "Per configuration" in (tmp_path / "collected" / "sweep.md").read_text()
