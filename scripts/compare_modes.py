#!/usr/bin/env python
"""Does overlapping rollouts with training hurt learning? The default job in each trainer mode, >= 3 seeds
(issue 14, item 5).

Per (mode, seed): ``python -m rlsys.train trainer.mode=<mode> trainer.seed=<seed>`` with the default
job otherwise: the tiny model's SFT warm start, countdown, F-GRPO, 80 steps, and the held-out evaluation
at start and end (``eval.*`` defaults: 64 problems, n = 64, the same problems for every run). Reads each
run's metrics.jsonl for:
* the train reward, as the mean over the last 10 steps;
* held-out pass@1 per sample and pass@16 at the end;
* the staleness the run had.
Writes ``results.json`` and a ``README.md`` table (mean +- std across seeds per mode) under ``--out``, and
copies each run's metrics.jsonl to ``metrics/<mode>-s<seed>.jsonl`` there (``runs/`` is gitignored: the
checkpoints stay out of the repository, the curves go in). A run whose ``runs/<mode>-s<seed>/metrics.jsonl``
already holds its last step is reused.

    python scripts/compare_modes.py --seeds 0,1,2 --out reports/modes_learning
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "sync": [],
    "one_step_off": ["trainer.mode=one_step_off"],
    "async": ["trainer.mode=async", "trainer.max_staleness=2"],
}


def rows_of(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(mode: str, seed: int, steps: int, root: Path, extra: list[str]) -> dict:
    out = root / "runs" / f"{mode}-s{seed}"
    rows = rows_of(out)
    if not any(r["step"] == steps and "eval/pass@1" in r for r in rows):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "rlsys.train", f"run.output_dir={out}", f"hydra.run.dir={out}/hydra"]
        cmd += [f"trainer.total_steps={steps}", f"trainer.seed={seed}", "logger.wandb_mode=disabled"]
        cmd += [*MODES[mode], *extra]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if res.returncode != 0:
            sys.exit(f"{mode} seed {seed} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
        print(f"  {mode} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows = rows_of(out)
    keep = root / "metrics" / f"{mode}-s{seed}.jsonl"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text((out / "metrics.jsonl").read_text())
    train = [r for r in rows if r["step"] >= 1]
    start = next(r for r in rows if r["step"] == 0)
    end = train[-1]
    return {
        "reward_last10": statistics.mean(r["reward/mean"] for r in train[-10:]),
        "reward_first": train[0]["reward/mean"],
        "pass1_start": start["eval/pass@1"],
        "pass1_end": end["eval/pass@1"],
        "pass16_end": end.get("eval/pass@16", float("nan")),
        "staleness_mean": statistics.mean(r["rollout/staleness_mean"] for r in train),
        "dropped_stale_groups": sum(r["rollout/dropped_stale_groups"] for r in train),
        "step_s_median": statistics.median(r["time/step"] for r in train[1:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--overrides", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "modes_learning")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    with open("/proc/cpuinfo") as fh:
        kind = "AVX-512 with AVX512_BF16" if "avx512_bf16" in fh.read() else "AVX2 only"
    results = {m: {s: run(m, s, args.steps, args.out, args.overrides.split()) for s in seeds} for m in modes}
    (args.out / "results.json").write_text(json.dumps({"cpu": kind, "steps": args.steps, "results": results}, indent=1))

    def cell(m: str, key: str) -> str:
        v = [results[m][s][key] for s in seeds]
        return f"{statistics.mean(v):.3f} +- {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    start_pass1 = statistics.mean(results[modes[0]][s]["pass1_start"] for s in seeds)
    keys = ["reward_last10", "pass1_end", "pass16_end", "staleness_mean", "step_s_median"]
    lines = [
        "# Learning per trainer mode (issue 14, item 5)",
        "",
        f"Default job (tiny model SFT warm start, countdown, F-GRPO gamma 0.5, B x G = 32 x 8, {args.steps} steps),",
        f"seeds {seeds}; this machine: {os.cpu_count()} cores, {kind}. Mean +- std across seeds.",
        f"Held-out pass@1 of the warm start: {start_pass1:.3f}.",
        "",
        "    python scripts/compare_modes.py --seeds " + args.seeds + f" --steps {args.steps}",
        "",
        "| mode | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
        *[f"| {m} | " + " | ".join(cell(m, k) for k in keys) + " |" for m in modes],
        "",
        "Per seed:",
        "",
        "| mode | seed | " + " | ".join(keys) + " | dropped_stale_groups |",
        "|---" * (len(keys) + 3) + "|",
        *[
            f"| {m} | {s} | "
            + " | ".join(f"{results[m][s][k]:.3f}" for k in keys)
            + f" | {results[m][s]['dropped_stale_groups']} |"
            for m in modes
            for s in seeds
        ],
        "",
    ]
    disc = args.out / "discussion.md"
    if disc.exists():
        lines += [disc.read_text()]
    (args.out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
