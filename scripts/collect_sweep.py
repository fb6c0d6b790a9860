#!/usr/bin/env python
"""Collect a Hydra sweep's runs into one table and one plot.

    python -m rlsys.train -m algo=grpo,f_grpo trainer.seed=0,1,2 hydra.sweep.dir=multirun/fgrpo
    python scripts/collect_sweep.py multirun/fgrpo

Every job directory of the sweep (``<sweep>/<n>/``) holds its overrides (``.hydra/overrides.yaml``)
and its ``metrics.jsonl``. This reads each job's last training row and its held-out pass@k at the
start (step 0) and the end. It writes, under the sweep directory (or ``--out``):
* ``sweep.csv``: one row per job;
* ``sweep.md``: the per-job table, and one table per configuration, the seeds pooled
  (mean +- std over the jobs whose overrides differ only in ``trainer.seed``);
* ``sweep_pass_at_k.png``: end-of-run pass@k against k (log scale), one line per configuration,
  the seeds' spread as error bars.
A job without a finished metrics.jsonl is listed as unfinished, not dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

SEED_KEY = "trainer.seed"


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job directories, in job-number order."""
    jobs = [p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def read_job(job: Path) -> dict[str, Any]:
    """One job: its overrides, final training metrics and pass@k at start and end."""
    import yaml

    overrides = [str(o) for o in (yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [])]
    metrics_path = job / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    train = [r for r in rows if r["step"] >= 1]
    start: dict[str, Any] = next((r for r in rows if r["step"] == 0 and any(k.startswith("eval/pass@") for k in r)), {})
    evals = [r for r in train if any(k.startswith("eval/pass@") for k in r)]
    end: dict[str, Any] = evals[-1] if evals else {}

    def passk(row: dict) -> dict[int, float]:
        return {
            int(k.split("@")[1]): float(v)
            for k, v in row.items()
            if k.startswith("eval/pass@") and not k.endswith("_stderr") and isinstance(v, (int, float))
        }

    return {
        "job": job.name,
        "overrides": overrides,
        "finished": bool(train) and bool(end),
        "steps": train[-1]["step"] if train else 0,
        "reward_first": train[0]["reward/mean"] if train else math.nan,
        "reward_last": train[-1]["reward/mean"] if train else math.nan,
        "pass_start": passk(start),
        "pass_end": passk(end),
    }


def config_of(job: dict[str, Any]) -> str:
    """The job's overrides without the seed: the configuration its seeds share."""
    rest = [o for o in job["overrides"] if o.split("=", 1)[0].lstrip("+~") != SEED_KEY]
    return " ".join(sorted(rest)) or "(defaults)"


def _fmt(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def collect(sweep: Path, out: Path) -> dict[str, Any]:
    """Read every job of ``sweep`` and write sweep.csv, sweep.md and sweep_pass_at_k.png into ``out``."""
    jobs = [read_job(j) for j in job_dirs(sweep)]
    if not jobs:
        raise SystemExit(f"{sweep}: no Hydra job directories (<n>/.hydra/overrides.yaml) found")
    ks = sorted({k for j in jobs for k in j["pass_end"]})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["job", "overrides", "finished", "steps", "reward_first", "reward_last"]
            + [f"pass@{k}_start" for k in ks]
            + [f"pass@{k}_end" for k in ks]
        )
        for j in jobs:
            w.writerow(
                [j["job"], " ".join(j["overrides"]), j["finished"], j["steps"], j["reward_first"], j["reward_last"]]
                + [j["pass_start"].get(k, "") for k in ks]
                + [j["pass_end"].get(k, "") for k in ks]
            )
    configs: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        if j["finished"]:
            configs.setdefault(config_of(j), []).append(j)
    lines = [
        f"# Sweep {sweep}",
        "",
        f"{len(jobs)} job(s), {sum(j['finished'] for j in jobs)} finished. Collected by scripts/collect_sweep.py.",
        "",
        "| job | overrides | steps | reward first -> last | " + " | ".join(f"pass@{k} start -> end" for k in ks) + " |",
        "|---" * (4 + len(ks)) + "|",
    ]
    for j in jobs:
        cells = [
            f"{j['pass_start'].get(k, math.nan):.3f} -> {j['pass_end'].get(k, math.nan):.3f}" if j["finished"] else "-"
            for k in ks
        ]
        reward = f"{j['reward_first']:.3f} -> {j['reward_last']:.3f}" if j["steps"] else "unfinished"
        head = f"| {j['job']} | {' '.join(j['overrides'])} | {j['steps']} | {reward} | "
        lines.append(head + " | ".join(cells) + " |")
    lines += [
        "",
        "Per configuration (the seeds pooled; mean +- std over seeds):",
        "",
        "| configuration | seeds | " + " | ".join(f"pass@{k} end" for k in ks) + " | pass@1 gain |",
        "|---" * (3 + len(ks)) + "|",
    ]
    for name, members in configs.items():
        gain = [m["pass_end"].get(1, math.nan) - m["pass_start"].get(1, math.nan) for m in members]
        cells = [_fmt([m["pass_end"].get(k, math.nan) for m in members]) for k in ks]
        lines.append(f"| {name} | {len(members)} | " + " | ".join(cells) + f" | {_fmt(gain)} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(configs, ks, out / "sweep_pass_at_k.png")
    return {"jobs": jobs, "configs": {n: [m["job"] for m in ms] for n, ms in configs.items()}, "ks": ks}


def _plot(configs: dict[str, list[dict[str, Any]]], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, members in configs.items():
        values = [[m["pass_end"].get(k, math.nan) for m in members] for k in ks]
        means = [statistics.mean(v) for v in values]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(ks, means, yerr=spread, marker="o", capsize=3, label=f"{name} (n={len(members)})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("held-out pass@k at the end")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("pass@k per configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="the sweep directory (hydra.sweep.dir)")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep directory)")
    args = ap.parse_args()
    result = collect(args.sweep, args.out or args.sweep)
    print((Path(args.out or args.sweep) / "sweep.md").read_text())
    if not all(j["finished"] for j in result["jobs"]):
        print("some jobs did not finish (see the table)", file=sys.stderr)


if __name__ == "__main__":
    main()
