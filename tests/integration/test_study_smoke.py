"""The F-GRPO study script end to end at its smoke size: every method trains on a real local Ray
cluster (vLLM rollout, reward pool, DeepSpeed learner), the hard-examples selection runs, every
final checkpoint is evaluated on both splits, and the report (table + one plot per split) is
written. Numbers are not checked (two steps from a random model learn nothing); the plumbing is."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "study_fgrpo.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _study_module():
    """The script as a module, for its method labels (it lives outside the package)."""
    spec = importlib.util.spec_from_file_location("study_fgrpo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(mod)
    return mod


def _table_rows(readme: str) -> list[list[str]]:
    """Cells of the first markdown table after the results heading (header and rule excluded)."""
    lines = readme.split("## Results", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_smoke_study_writes_a_row_per_method_and_a_plot_per_split(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, never one the caller happens to be in
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    study = _study_module()
    expected = (
        ["starting policy (no RL)"]
        + [m.label for m in study.METHODS]
        + [f"{study.SELECTION_METHOD.label}, {s} 10%" for s in study.SELECTIONS]
    )
    readme = (out / "README.md").read_text()
    rows = _table_rows(readme)
    assert [r[0] for r in rows] == expected
    kmax = max(study.PRESETS["smoke"].eval_k)
    header = readme.split("## Results", 1)[1]
    for col in (
        "test pass@1",
        f"test pass@{kmax}",
        "ood pass@1",
        f"ood pass@{kmax}",
        "mixed groups",
        "focal weight",
        "learnable groups",
    ):
        assert col in header
    for r in rows:
        # pass@1 and pass@kmax of both splits: probabilities, printed as numbers.
        assert all(0.0 <= float(c.split(" ± ")[0]) <= 1.0 for c in r[2:6]), r

    for split in ("test", "ood"):
        png = out / f"pass_at_k_{split}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
        assert f"pass_at_k_{split}.png" in readme

    results = json.loads((out / "results.json").read_text())
    assert [g["label"] for g in results["groups"]] == expected
    for g in results["groups"][1:]:
        for run in g["runs"]:
            for key in ("algo/mixed_group_fraction", "algo/focal_weight_mean", "algo/learnable_fraction"):
                assert 0.0 <= run["train"][key] <= 1.0 and math.isfinite(run["train"][key])
            assert set(run["eval"]) == {"test", "ood"}
            assert not (out / "rl" / run["run"] / "checkpoints").exists()  # deleted once evaluated
    assert (out / "difficulty" / "hardest.jsonl").stat().st_size > 0
    assert (out / "difficulty" / "easiest.jsonl").stat().st_size > 0
