#!/usr/bin/env python
"""Step time of each trainer mode on the same job, in one sitting (issue 14, item 4's phase split).

Runs ``python -m rlsys.train`` once per mode (sync, one_step_off, async with ``--staleness``) on the
default tiny job (or ``--overrides``), ``--steps`` steps each, no evaluation, and reads each run's
metrics.jsonl. Step 1 is left out (start-up effects; the off-policy modes have nothing prefetched yet).
Per mode, medians over the remaining steps of:

* ``step``: the loop's step time; ``completions/s``: B x G / step;
* the phases: ``gen`` (generation, on the prefetch thread in the off-policy modes), ``train``,
  ``sync``, ``wait`` (the loop waiting for its batch), ``push_wait`` (one_step_off: the push held for
  the next batch);
* ``overhead``: the step time in no phase the loop runs (step - wait/gen+reward - train - sync -
  push_wait), as a fraction of the step;
* for one_step_off, the issue's target ``step <= 1.1 x max(gen, train) + sync``, as a ratio.

Prints a table and the ratio of each mode's step time to sync's; ``--out`` writes JSON. Numbers, not a
test: run it on the machine whose default you want to choose, and say which CPU kind it was.

    python scripts/bench_modes.py --steps 8 --out reports/bench/modes.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, steps: int, staleness: int, overrides: list[str], work: Path) -> list[dict]:
    out = work / mode
    cmd = [
        sys.executable,
        "-m",
        "rlsys.train",
        f"run.output_dir={out}",
        f"hydra.run.dir={work / (mode + '-hydra')}",
        f"trainer.total_steps={steps}",
        "trainer.eval_at_start_end=false",
        "logger.wandb_mode=disabled",
        f"trainer.mode={mode}",
        f"trainer.max_staleness={staleness}",
        *overrides,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if res.returncode != 0:
        sys.exit(f"{mode}: rlsys.train failed (rc {res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    print(f"  {mode}: {steps} steps in {time.perf_counter() - t0:.0f} s (with start-up)", flush=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarize(rows: list[dict], completions: int) -> dict[str, float]:
    rows = [r for r in rows if r["step"] > 1]

    def med(key: str) -> float:
        return statistics.median(float(r.get(key, 0.0)) for r in rows)

    def overhead(r: dict) -> float:
        fetch = r["time/wait_rollout"] if "time/wait_rollout" in r else r["time/rollout"] + r["time/reward"]
        return r["time/step"] - fetch - r["time/train"] - r["time/sync"] - r.get("time/push_wait", 0.0)

    step = med("time/step")
    s = {
        "step_s": step,
        "completions_per_s": completions / step,
        "gen_s": med("time/rollout"),
        "reward_s": med("time/reward"),
        "train_s": med("time/train"),
        "sync_s": med("time/sync"),
        "wait_s": med("time/wait_rollout"),
        "push_wait_s": med("time/push_wait"),
        "overhead_frac": statistics.median(overhead(r) / r["time/step"] for r in rows),
        "staleness_max": max(r["rollout/staleness_max"] for r in rows),
        "dropped_stale_groups": sum(r["rollout/dropped_stale_groups"] for r in rows),
        "reward_mean": statistics.mean(r["reward/mean"] for r in rows),
    }
    s["overlap_target_ratio"] = step / (1.1 * max(s["gen_s"] + s["reward_s"], s["train_s"]) + s["sync_s"])
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--staleness", type=int, default=2, help="trainer.max_staleness of the async run")
    ap.add_argument("--modes", default="sync,one_step_off,async")
    ap.add_argument("--overrides", default="", help="space-separated extra overrides for every run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    overrides = args.overrides.split()
    b = next((int(o.split("=")[1]) for o in overrides if o.startswith("trainer.prompts_per_step=")), 32)
    g = next((int(o.split("=")[1]) for o in overrides if o.startswith("algo.group_size=")), 8)
    with open("/proc/cpuinfo") as fh:
        flags = fh.read()
    kind = "AVX-512 with AVX512_BF16" if "avx512_bf16" in flags else "AVX2 only"
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        kind += " (emulating AVX2: ATEN_CPU_CAPABILITY=avx2)"
    print(f"CPU: {os.cpu_count()} cores, {kind}; {args.steps} steps per mode, B x G = {b} x {g}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlsys-bench-modes-") as tmp:
        for mode in args.modes.split(","):
            results[mode] = summarize(run(mode, args.steps, args.staleness, overrides, Path(tmp)), b * g)
    cols = ["step_s", "completions_per_s", "gen_s", "train_s", "sync_s", "wait_s", "push_wait_s", "overhead_frac"]
    print("\n| mode | " + " | ".join(cols) + " | staleness_max | vs sync |")
    print("|---" * (len(cols) + 3) + "|")
    base = results.get("sync", {}).get("step_s")
    for mode, s in results.items():
        ratio = f"{base / s['step_s']:.2f}x" if base else "-"
        print(f"| {mode} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + f" | {s['staleness_max']} | {ratio} |")
    if "one_step_off" in results:
        r = results["one_step_off"]["overlap_target_ratio"]
        print(f"\none_step_off step / (1.1 x max(gen, train) + sync) = {r:.2f} (target <= 1)")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": kind, "steps": args.steps, "results": results}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
