"""docs/byo.md runs as written: its bash blocks, in order, in one shell (a fresh directory as the
working dir), on the real stack: the shipped SmolLM2-135M-Instruct exported as a Hugging Face
checkpoint, a GSM8K-format JSONL, ``rlsys-eval`` and two steps of ``rlsys-train``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def guide_script() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "byo.md").read_text(), flags=re.S)
    assert len(blocks) == 4, "docs/byo.md: expected 4 bash blocks (data, model, eval, train)"
    return "set -euo pipefail\n" + "\n".join(blocks)


def test_the_bring_your_own_guide_runs_as_written(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(
        ["bash", "-c", guide_script()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "my_problems.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["answer"].rsplit("#### ", 1)[1].isdigit() for r in rows)
    # The evaluation graded 8 problems x 4 samples and reported pass@1 and pass@4.
    assert re.search(r"pass@1 +[0-9.]+", res.stdout + res.stderr), res.stdout[-3000:]
    # Two training steps on the file, and a final checkpoint that is a Hugging Face directory.
    train = tmp_path / "outputs" / "byo-train"
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # After each push the engine scores the probe like the learner: the 30-layer model's weights arrived.
    assert all(m["sync/logprob_diff"] < 0.1 for m in metrics), [m["sync/logprob_diff"] for m in metrics]
    ckpt = train / "checkpoints" / "step_000002"
    assert (ckpt / "config.json").exists() and list(ckpt.glob("*.safetensors"))
    assert "step_000002" in res.stdout
