"""scripts/quickstart_noise.py's bookkeeping: adopting hand-started runs, the per-seed report and the
side-by-side comparison, on metrics files written here (no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def noise() -> Any:
    return load_script("quickstart_noise")


def _eval(step: int, p1: float, p4: float) -> dict[str, Any]:
    return {
        "step": step,
        "eval/pass@1": p1,
        "eval/pass@1_stderr": 0.01,
        "eval/pass@4": p4,
        "eval/pass@4_stderr": 0.02,
        "eval/num_problems": 32,
        "eval/response_length": 20.0 - step,
        "eval/distinct_correct": p4,
    }


def _fake_run(root: Path, name: str, after: tuple[float, float], rewards: list[float], start: str) -> Path:
    """A run dir as rlsys.train leaves it (metrics.jsonl) and its log beside it (``<dir>.log``)."""
    run = root / name
    run.mkdir(parents=True)
    rows = [_eval(0, 0.10, 0.30)]
    rows += [
        {"step": i + 1, "reward/mean": r, "time/step": 2.0, "algo/mixed_group_fraction": 0.5}
        for i, r in enumerate(rewards)
    ]
    rows[-1].update(_eval(len(rewards), *after))  # as rlsys.train logs it: the last step's row holds the final eval
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{name}.log").write_text(
        f"{start} I rlsys.config: model.dtype=auto: cpu: AVX512_BF16 -> bfloat16\n"
        "a line without a stamp\n00:01:05 I done\n"
    )
    return run


def test_adopt_times_the_log_across_midnight_and_reports_the_gain(noise: Any, tmp_path: Path) -> None:
    src = tmp_path / "hand"
    a = _fake_run(src, "s0", (0.20, 0.28), [0.1, 0.2, 0.3], start="23:59:00")
    b = _fake_run(src, "s1", (0.14, 0.26), [0.1, 0.1, 0.1], start="00:00:05")
    out = tmp_path / "grpo"
    out.mkdir()
    r0 = noise.adopt_seed(0, a, out, ["algo=grpo"])
    r1 = noise.adopt_seed(1, b, out, ["algo=grpo"])
    assert r0["seconds"] == 125.0  # 23:59:00 -> 00:01:05
    assert r1["seconds"] == 60.0
    assert "trainer.seed=0" in r0["command"] and "algo=grpo" in r0["command"]
    assert r0["train_reward"] == [0.1, 0.2, 0.3] and r0["dtype"] == "cpu: AVX512_BF16 -> bfloat16"
    assert (out / "seed_0" / "result.json").is_file() and (out / "seed_0.log").is_file()
    results = [json.loads(json.dumps(r)) for r in (r0, r1)]
    text = noise.report(results, out, ["--seeds", "0", "1"], ["algo=grpo"])
    # gains +0.10 and +0.04: mean 0.07, sample std 0.0424 -> larger than the noise
    assert "Gain in pass@1: mean +0.070, std 0.042" in text
    assert "is larger than the run-to-run noise" in text
    assert "the default job with the overrides shown" in text and "Warm start" not in text


def test_adopt_names_what_is_missing(noise: Any, tmp_path: Path) -> None:
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "metrics.jsonl").write_text("")
    with pytest.raises(RuntimeError, match=r"lonely\.log is missing"):
        noise.adopt_seed(0, tmp_path / "lonely", tmp_path / "out", [])


def test_compare_pairs_by_seed_and_refuses_different_starting_points(noise: Any, tmp_path: Path) -> None:
    groups = {}
    for label, afters in (("grpo", [(0.20, 0.25), (0.16, 0.27)]), ("f_grpo", [(0.18, 0.31), (0.17, 0.33)])):
        out = tmp_path / label
        out.mkdir()
        runs = [
            noise.adopt_seed(s, _fake_run(tmp_path / f"{label}_src", f"s{s}", aft, [0.1, 0.2], "10:00:00"), out, [])
            for s, aft in enumerate(afters)
        ]
        noise.report([json.loads(json.dumps(r)) for r in runs], out, [], [])
        groups[label] = out
    cmp_out = tmp_path / "cmp"
    cmp_out.mkdir()
    text = noise.compare(groups, cmp_out, [])
    # f_grpo minus grpo, per seed: pass@4 +0.06 and +0.06; pass@1 -0.02 and +0.01
    assert "- pass@4: +0.060 +- 0.000" in text
    assert "- pass@1: -0.005 +- 0.021" in text
    assert "| grpo | 0, 1 | 0.180 +- 0.028 | 0.260 +- 0.014 |" in text
    assert (cmp_out / "comparison.png").stat().st_size > 0

    # A run evaluated from another starting point cannot be compared.
    other = tmp_path / "other"
    other.mkdir()
    run = _fake_run(tmp_path / "other_src", "s0", (0.2, 0.3), [0.1], "10:00:00")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0]["eval/pass@1"] = 0.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    noise.report([json.loads(json.dumps(noise.adopt_seed(0, run, other, [])))], other, [], [])
    with pytest.raises(RuntimeError, match="not evaluated from the same starting point"):
        noise.compare({"grpo": groups["grpo"], "other": other}, cmp_out, [])
