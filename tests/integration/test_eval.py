"""End to end: `python -m rlsys.eval` and `python -m rlsys.difficulty` on a local Ray cluster with a vLLM
(CPU) rollout worker and the reward pool, evaluating the randomly initialised tiny model on a small
JSONL file graded by a user function that random text passes part of the time."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlsys.algo import pass_at_k
from rlsys.difficulty import num_to_select

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DIGIT = "tests.integration.eval_fns:has_digit"
NUM_PROMPTS = 5
SMALL = ["rollout.max_tokens=16", "cluster.num_cpus=4"]


def digit_data(tmp_path: Path) -> list[str]:
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as fh:
        for i in range(NUM_PROMPTS):
            fh.write(json.dumps({"prompt": f"Write a number near {i}.", "answer": str(i)}) + "\n")
    return ["data=file", f"data.path={path}", f"data.verifier={DIGIT}", f"reward.allowed_functions=[{DIGIT}]"]


def run_cli(module: str, tmp_path: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        module,
        f"run.output_dir={tmp_path / 'run'}",
        f"hydra.run.dir={tmp_path / 'hydra' / module}",
        *SMALL,
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def test_eval_and_difficulty_cli(tmp_path):
    data = digit_data(tmp_path)

    # ---- eval -------------------------------------------------------------------------------------
    res = run_cli("rlsys.eval", tmp_path, *data, "eval.n=16", "eval.k=[1,4,16]", "logger.wandb_mode=offline")
    assert res.returncode == 0, res.stdout[-6000:]
    out = tmp_path / "run" / "eval"
    (js,) = out.glob("*.json")
    (cs,) = out.glob("*.csv")
    (png,) = out.glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    doc = json.loads(js.read_text())
    r = doc["result"]
    assert doc["config"]["eval"]["n"] == 16 and r["ks"] == [1, 4, 16]
    assert r["num_problems"] == NUM_PROMPTS and len(r["problems"]) == NUM_PROMPTS
    n = np.array([p["n"] for p in r["problems"]])
    c = np.array([p["c"] for p in r["problems"]])
    assert (n == 16).all() and ((c >= 0) & (c <= n)).all()
    vals = [r["pass_at_k"][str(k)] for k in r["ks"]]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert vals == sorted(vals), f"pass@k must not decrease in k: {vals}"
    for k in r["ks"]:
        assert r["pass_at_k"][str(k)] == pytest.approx(float(np.mean(pass_at_k(n, c, k))))
    assert r["pass_at_k"]["1"] == pytest.approx(c.sum() / n.sum())
    assert 0 < c.sum() < n.sum(), "the digit verifier should pass some samples and fail others"
    assert r["num_timeouts"] == 0 and r["num_errors"] == 0
    with open(cs) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(x["k"]) for x in rows] == [1, 4, 16]
    assert [float(x["pass_at_k"]) for x in rows] == pytest.approx(vals, abs=1e-6)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval/pass@16"] == pytest.approx(vals[-1])
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert "pass@k" in res.stdout and str(js) in res.stdout  # the table and the paths are printed

    # ---- difficulty -------------------------------------------------------------------------------
    res = run_cli(
        "rlsys.difficulty",
        tmp_path,
        *data,
        "difficulty.k=8",
        "difficulty.fraction=0.5",
        "difficulty.select=hardest",
        "logger=disabled",
    )
    assert res.returncode == 0, res.stdout[-6000:]
    dd = tmp_path / "run" / "difficulty"
    from rlsys.data import load_rows

    annotated, _ = load_rows(dd / "annotated.jsonl", id_key="prompt_id")
    selected, _ = load_rows(dd / "selected.jsonl", id_key="prompt_id")
    assert len(annotated) == NUM_PROMPTS
    assert len(selected) == num_to_select(NUM_PROMPTS, 0.5) == 3
    recs = [json.loads(line) for line in (dd / "annotated.jsonl").read_text().splitlines()]
    assert all(x["num_samples"] == 8 and x["pass_rate"] == pytest.approx(x["num_correct"] / 8) for x in recs)
    rate = {x["prompt_id"]: x["pass_rate"] for x in recs}
    sel_rates = [rate[row.prompt_id] for row in selected]
    assert sel_rates == sorted(sel_rates)  # hardest first
    rest = [v for pid, v in rate.items() if pid not in {row.prompt_id for row in selected}]
    assert max(sel_rates) <= min(rest)
    summary = json.loads((dd / "summary.json").read_text())
    assert summary["num_prompts"] == NUM_PROMPTS and summary["num_selected"] == 3
    assert sum(summary["histogram"]["prompts"]) == NUM_PROMPTS
    assert summary["learnable_fraction"] == pytest.approx(np.mean([0 < v < 1 for v in rate.values()]))
    assert (dd / "pass_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_rejects_k_above_n_before_starting_anything(tmp_path):
    res = run_cli("rlsys.eval", tmp_path, "eval.n=4", "eval.k=[1,8]", "logger=disabled", timeout=120)
    assert res.returncode == 2
    assert "eval.k" in res.stdout and "started a local" not in res.stdout
