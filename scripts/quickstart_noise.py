#!/usr/bin/env python
"""Run-to-run noise of the default job: does held-out pass@1 rise by more than it varies?

Runs ``python -m rlsys.train trainer.seed=S`` (the default job, exactly as ``./scripts/quickstart.sh``
runs it, W&B off) once per seed, one after the other, each in its own subprocess and output
directory. Every run starts from the same cached SFT warm start and is evaluated before and after
training on the same held-out problems with the same sampling seeds, so "before" is identical
across runs and the spread of "after" is the run-to-run noise (training randomness plus the
evaluation's sampling noise).

Writes ``--out/README.md`` (per-seed table, mean and std of the gain, the verdict) and
``--out/results.json``; each run's ``metrics.jsonl`` stays under ``--out/seed_<S>/`` (checkpoints are
deleted). A seed whose ``result.json`` exists is reused, so an interrupted measurement continues.

Usage::

    python scripts/quickstart_noise.py --seeds 0 1 2 3 4 --out reports/quickstart_noise   # ~5 min per seed
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def eval_rows(metrics_path: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(evaluation before training, evaluation after it, training rows) of one run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/pass@1" in r]
    steps = [r for r in rows if "reward/mean" in r]
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise RuntimeError(
            f"{metrics_path}: expected an evaluation at step 0 and one at the end, got steps "
            f"{[r['step'] for r in evals]} (is trainer.eval_at_start_end on?)"
        )
    return evals[0], evals[-1], steps


def run_seed(seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    run_dir = out / f"seed_{seed}"
    done = run_dir / "result.json"
    if done.exists():
        print(f"seed {seed}: reusing {done}", flush=True)
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "rlsys.train",
        f"trainer.seed={seed}",
        f"run.output_dir={run_dir}",
        "logger=disabled",
        *extra,
    ]
    print(f"seed {seed}: python {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    log_path = out / f"seed_{seed}.log"
    with open(log_path, "w") as log:
        res = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"seed {seed} failed with exit code {res.returncode}; see {log_path}")
    before, after, steps = eval_rows(run_dir / "metrics.jsonl")
    text = log_path.read_text()
    warm = re.search(r"SFT warm start: (?:reusing|wrote) (\S+)", text)
    dtype = re.search(r"model\.dtype=auto: (.*)", text)
    phases = {
        k: statistics.median(r[k] for r in steps if isinstance(r.get(k), (int, float)))
        for k in ("time/step", "time/rollout", "time/reward", "time/train", "time/sync", "cpu/rollout", "cpu/train")
        if any(isinstance(r.get(k), (int, float)) for r in steps)
    }
    ks = sorted(int(k.split("@")[1]) for k in before if k.startswith("eval/pass@") and not k.endswith("_stderr"))
    result = {
        "seed": seed,
        "command": "python " + shlex.join(cmd[1:]),
        "seconds": seconds,
        "before": {k: before[f"eval/pass@{k}"] for k in ks},
        "after": {k: after[f"eval/pass@{k}"] for k in ks},
        "stderr_after": {k: after[f"eval/pass@{k}_stderr"] for k in ks},
        "num_problems": after["eval/num_problems"],
        "steps": len(steps),
        "warm_start": warm.group(1) if warm else None,
        "dtype": dtype.group(1) if dtype else None,
        "phase_medians": phases,
        "train_reward_first": steps[0]["reward/mean"],
        "train_reward_last": steps[-1]["reward/mean"],
    }
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    print(f"seed {seed}: pass@1 {result['before'][1]:.3f} -> {result['after'][1]:.3f} in {seconds:.0f} s", flush=True)
    return result


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def report(results: list[dict[str, Any]], out: Path, argv: list[str]) -> str:
    ks = sorted(int(k) for k in results[0]["before"])
    gains = [r["after"]["1"] - r["before"]["1"] for r in results]
    g_mean, g_std = mean_std(gains)
    a_mean, a_std = mean_std([r["after"]["1"] for r in results])
    before = results[0]["before"]["1"]
    se_eval = mean_std([r["stderr_after"]["1"] for r in results])[0]
    lines = [
        "# Run-to-run noise of the default job",
        "",
        f"`python scripts/quickstart_noise.py {shlex.join(argv)}` on {platform.node() or 'this machine'}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each row is `{results[0]['command']}` with "
        "its seed: the default job (F-GRPO gamma 0.5 on countdown from the cached SFT warm start), evaluated "
        f"before and after training on the same {results[0]['num_problems']:.0f} held-out problems with the "
        f"same sampling seeds. Warm start: `{results[0].get('warm_start')}`.",
        "",
        f"CPU: {_cpu_kind()}; model.dtype=auto resolved to: {results[0].get('dtype')}.",
        "",
        "| seed | "
        + " | ".join(f"pass@{k} before -> after" for k in ks)
        + " | pass@1 gain | train reward first -> last | wall |",
        "|---|" + "---|" * (len(ks) + 3),
    ]
    for r, g in zip(results, gains):
        lines.append(
            f"| {r['seed']} | "
            + " | ".join(f"{r['before'][str(k)]:.3f} -> {r['after'][str(k)]:.3f}" for k in ks)
            + f" | {g:+.3f} | {r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f} | {r['seconds']:.0f} s |"
        )
    med = [r.get("phase_medians") or {} for r in results]
    if all(med):
        keys = list(med[0])
        lines += [
            "",
            "Per-step medians (seconds; cpu = fraction of all cores busy in the phase):",
            "",
            "| seed | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        lines += [
            f"| {r['seed']} | " + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in keys) + " |"
            for r, m in zip(results, med)
        ]
    verdict = "larger than" if g_mean > g_std else "NOT larger than"
    lines += [
        "",
        f"- pass@1 before: {before:.3f} (identical for every seed: same model, problems and sampling seeds).",
        f"- pass@1 after: mean {a_mean:.3f}, std across seeds {a_std:.3f} (the run-to-run noise; the evaluation's "
        f"own standard error across problems is ~{se_eval:.3f}, most of it shared by all runs since they see "
        "the same problems).",
        f"- Gain in pass@1: mean {g_mean:+.3f}, std {g_std:.3f}, min {min(gains):+.3f}, max {max(gains):+.3f} "
        f"over {len(gains)} seeds: the mean gain is {verdict} the run-to-run noise "
        f"({g_mean / g_std:.1f} std)."
        if len(gains) > 1
        else f"- Gain in pass@1: {g_mean:+.3f} (one seed).",
        f"- Seeds with a positive gain: {sum(g > 0 for g in gains)} of {len(gains)}.",
        "",
    ]
    text = "\n".join(lines)
    (out / "README.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {"runs": results, "gain_mean": g_mean, "gain_std": g_std, "after_mean": a_mean, "after_std": a_std},
            indent=2,
        )
        + "\n"
    )
    return text


def _cpu_kind() -> str:
    """This machine's CPU kind as the runs saw it (an AVX2-only CPU can be emulated by env caps)."""
    import os

    cpuinfo = "/proc/cpuinfo"
    flags = Path(cpuinfo).read_text() if os.path.exists(cpuinfo) else ""
    kind = "AVX-512 with native bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "AVX2-only"
    caps = {
        k: os.environ[k]
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ
    }
    if caps:
        kind += " emulating AVX2-only (" + " ".join(f"{k}={v}" for k, v in caps.items()) + ")"
    return f"{kind}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "quickstart_noise")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [json.loads(json.dumps(run_seed(s, args.out, args.overrides))) for s in args.seeds]  # str keys
    print(report(results, args.out, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
