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
deleted), and ``--out/learning_curve.png``. A seed whose ``result.json`` exists is reused, so an
interrupted measurement continues; ``--adopt S=DIR`` takes a run started by hand instead.

Extra Hydra overrides make it any job's noise (another model, task or algorithm), and ``--compare``
puts several such folders side by side (paired by seed), e.g. the paper's GRPO vs F-GRPO::

    python scripts/quickstart_noise.py --seeds 0 1 2 3 4 --out reports/quickstart_noise   # ~5 min per seed
    python scripts/quickstart_noise.py --seeds 0 1 2 --out runs/grpo algo=grpo model=smollm2 data=arithmetic
    python scripts/quickstart_noise.py --seeds 0 1 2 --out runs/fgrpo model=smollm2 data=arithmetic
    python scripts/quickstart_noise.py --out runs/cmp --compare grpo=runs/grpo --compare f_grpo=runs/fgrpo
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
    cmd = _command(seed, run_dir, extra)
    print(f"seed {seed}: python {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    log_path = out / f"seed_{seed}.log"
    with open(log_path, "w") as log:
        res = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"seed {seed} failed with exit code {res.returncode}; see {log_path}")
    return summarize(seed, "python " + shlex.join(cmd[1:]), seconds, log_path, run_dir)


def _command(seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlsys.train",
        f"trainer.seed={seed}",
        f"run.output_dir={run_dir}",
        "logger=disabled",
        *extra,
    ]


def adopt_seed(seed: int, src: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """Take a finished run that was started by hand (``src/metrics.jsonl`` and its log ``src.log``)
    as seed ``seed``: copy both under ``out`` and summarize it as if this script had run it.

    The recorded command is the one this script would have run with ``extra``: the caller vouches
    that the run used those overrides. The wall time is the span of the log's HH:MM:SS stamps."""
    run_dir, log_path = out / f"seed_{seed}", out / f"seed_{seed}.log"
    src_log = src.parent / f"{src.name}.log"
    for needed in (src / "metrics.jsonl", src_log):
        if not needed.is_file():
            raise RuntimeError(f"--adopt {seed}={src}: {needed} is missing (a run dir and its log <dir>.log)")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "metrics.jsonl", run_dir / "metrics.jsonl")
    shutil.copyfile(src_log, log_path)
    stamps = [
        int(h) * 3600 + int(m) * 60 + int(s)
        for h, m, s in re.findall(r"^(\d\d):(\d\d):(\d\d) ", log_path.read_text(), re.M)
    ]
    if len(stamps) < 2:
        raise RuntimeError(f"--adopt {seed}={src}: {src_log} has no HH:MM:SS log lines to time the run by")
    seconds = float((stamps[-1] - stamps[0]) % 86400)  # a run that crossed midnight
    cmd = _command(seed, run_dir, extra)
    print(f"seed {seed}: adopted {src} ({seconds:.0f} s)", flush=True)
    return summarize(seed, "python " + shlex.join(cmd[1:]), seconds, log_path, run_dir)


def summarize(seed: int, command: str, seconds: float, log_path: Path, run_dir: Path) -> dict[str, Any]:
    """The per-seed record (``run_dir/result.json``) of a finished run: pass@k before and after, phase
    medians, the train reward curve."""
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
        "command": command,
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
        "train_reward": [r["reward/mean"] for r in steps],
        "mixed_group_fraction": [r.get("algo/mixed_group_fraction") for r in steps],
        "response_length_before": before.get("eval/response_length"),
        "response_length_after": after.get("eval/response_length"),
        "distinct_correct_before": before.get("eval/distinct_correct"),
        "distinct_correct_after": after.get("eval/distinct_correct"),
    }
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"seed {seed}: pass@1 {result['before'][1]:.3f} -> {result['after'][1]:.3f} in {seconds:.0f} s", flush=True)
    return result


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def report(results: list[dict[str, Any]], out: Path, argv: list[str], overrides: list[str]) -> str:
    ks = sorted(int(k) for k in results[0]["before"])
    gains = [r["after"]["1"] - r["before"]["1"] for r in results]
    g_mean, g_std = mean_std(gains)
    a_mean, a_std = mean_std([r["after"]["1"] for r in results])
    before = results[0]["before"]["1"]
    se_eval = mean_std([r["stderr_after"]["1"] for r in results])[0]
    job = (
        "the default job (F-GRPO gamma 0.5 on countdown from the cached SFT warm start)"
        if not overrides
        else "the default job with the overrides shown"
    )
    warm = results[0].get("warm_start")
    lines = [
        "# Run-to-run noise of the default job" if not overrides else "# Run-to-run noise over seeds",
        "",
        f"`python scripts/quickstart_noise.py {shlex.join(argv)}` on {platform.node() or 'this machine'}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each row is `{results[0]['command']}` with "
        f"its seed: {job}, evaluated "
        f"before and after training on the same {results[0]['num_problems']:.0f} held-out problems with the "
        "same sampling seeds." + (f" Warm start: `{warm}`." if warm else ""),
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


def _rolling(xs: list[float], w: int) -> list[float]:
    return [sum(xs[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(xs))]


def plot(groups: dict[str, list[dict[str, Any]]], path: Path, window: int = 8) -> Path:
    """Left: the train reward per step (rolling mean over ``window`` steps), thin per seed and thick
    for the seed mean; right: held-out pass@k before training and after it (mean +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, results), color in zip(groups.items(), colors):
        curves = [_rolling(r["train_reward"], window) for r in results if r.get("train_reward")]
        for c in curves:
            ax_r.plot(range(1, len(c) + 1), c, color=color, alpha=0.3, lw=0.8)
        if curves:
            n = min(len(c) for c in curves)
            ax_r.plot(
                range(1, n + 1),
                [sum(c[i] for c in curves) / len(curves) for i in range(n)],
                color=color,
                lw=2,
                label=f"{label} ({len(curves)} seeds)",
            )
        ks = sorted(int(k) for k in results[0]["after"])
        after = [mean_std([r["after"][str(k)] for r in results]) for k in ks]
        ax_k.errorbar(
            ks,
            [m for m, _ in after],
            yerr=[0 if sd != sd else sd for _, sd in after],
            color=color,
            marker="o",
            capsize=3,
            label=f"{label} after",
        )
    ks = sorted(int(k) for k in next(iter(groups.values()))[0]["before"])
    ax_k.plot(ks, [next(iter(groups.values()))[0]["before"][str(k)] for k in ks], "k--", marker="s", label="before")
    ax_r.set(xlabel="step", ylabel=f"train reward (rolling mean, {window} steps)", title="learning curve")
    ax_k.set(xscale="log", xlabel="k", ylabel="held-out pass@k", title="pass@k (mean +- std over seeds)")
    ax_k.minorticks_off()
    ax_k.set_xticks(ks, [str(k) for k in ks])
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(dirs: dict[str, Path], out: Path, argv: list[str]) -> str:
    """Side by side: several ``--out`` folders of this script (one method each, same seeds and problems)."""
    groups = {label: json.loads((d / "results.json").read_text())["runs"] for label, d in dirs.items()}
    first = next(iter(groups.values()))
    ks = sorted(int(k) for k in first[0]["before"])
    befores = {json.dumps(r["before"], sort_keys=True) for rs in groups.values() for r in rs}
    if len(befores) != 1:
        raise RuntimeError(
            "the runs were not evaluated from the same starting point (their pass@k before differ): "
            "compare runs of one model, task and eval set"
        )
    lines = [
        "# Comparison over seeds",
        "",
        f"`python scripts/quickstart_noise.py {shlex.join(argv)}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"CPU: {_cpu_kind()}. Mean +- std over seeds of held-out pass@k "
        f"({first[0]['num_problems']:.0f} problems, the same for every run).",
        "",
        "| method | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " | pass@1 gain | distinct correct / problem "
        "| response length | wall per run |",
        "|---|---|" + "---|" * (len(ks) + 4),
        "| before (no RL) | - | "
        + " | ".join(f"{first[0]['before'][str(k)]:.3f}" for k in ks)
        + f" | - | {_num(first[0].get('distinct_correct_before'))}"
        + f" | {_num(first[0].get('response_length_before'), 1)} | - |",
    ]
    summary: dict[str, Any] = {}
    for label, rs in groups.items():
        cells = [mean_std([r["after"][str(k)] for r in rs]) for k in ks]
        gain = mean_std([r["after"]["1"] - r["before"]["1"] for r in rs])
        dc = mean_std(
            [r["distinct_correct_after"] for r in rs if r.get("distinct_correct_after") is not None] or [float("nan")]
        )
        ln = mean_std(
            [r["response_length_after"] for r in rs if r.get("response_length_after") is not None] or [float("nan")]
        )
        wall = mean_std([r["seconds"] for r in rs])
        lines.append(
            f"| {label} | {', '.join(str(r['seed']) for r in rs)} | "
            + " | ".join(f"{m:.3f} +- {sd:.3f}" for m, sd in cells)
            + f" | {gain[0]:+.3f} +- {gain[1]:.3f} | {dc[0]:.2f} +- {dc[1]:.2f} | {ln[0]:.1f}"
            + f" | {wall[0] / 60:.1f} min |"
        )
        summary[label] = {
            "seeds": [r["seed"] for r in rs],
            "after": {str(k): c for k, c in zip(ks, cells)},
            "gain_pass@1": gain,
        }
    labels = list(groups)
    if len(labels) == 2:
        a, b = (groups[x] for x in labels)
        paired = {r["seed"]: r for r in a}
        common = [r for r in b if r["seed"] in paired]
        if common:
            lines += ["", f"Paired by seed ({labels[1]} minus {labels[0]}, seeds {[r['seed'] for r in common]}):", ""]
            for k in ks:
                d = mean_std([r["after"][str(k)] - paired[r["seed"]]["after"][str(k)] for r in common])
                lines.append(f"- pass@{k}: {d[0]:+.3f} +- {d[1]:.3f}")
    png = plot(groups, out / "comparison.png")
    lines += ["", f"![comparison]({png.name})", ""]
    text = "\n".join(lines)
    (out / "README.md").write_text(text)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text


def _num(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _label_path(spec: str, what: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"{what} takes LABEL=PATH, got {spec!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "quickstart_noise")
    p.add_argument(
        "--adopt",
        action="append",
        default=[],
        metavar="SEED=RUN_DIR",
        help="use a finished run started by hand (RUN_DIR/metrics.jsonl, log RUN_DIR.log) as that seed, "
        "instead of running it; it must have used the same overrides",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=OUT_DIR",
        help="run nothing: put the results of earlier --out folders side by side in --out (repeat per method)",
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        print(compare(dict(_label_path(c, "--compare") for c in args.compare), args.out, argv))
        return 0
    adopted = {int(seed): Path(src) for seed, src in (_label_path(a, "--adopt") for a in args.adopt)}
    results = [
        json.loads(
            json.dumps(  # str keys
                adopt_seed(s, adopted[s], args.out, args.overrides)
                if s in adopted and not (args.out / f"seed_{s}" / "result.json").exists()
                else run_seed(s, args.out, args.overrides)
            )
        )
        for s in args.seeds
    ]
    print(report(results, args.out, argv, args.overrides))
    plot({"runs": results}, args.out / "learning_curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
