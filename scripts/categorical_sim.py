#!/usr/bin/env python
"""Reproduce the paper's categorical simulation (Section 5.1 / Fig. 2) with rlsys.algo.categorical.

Sweeps group size N over powers of two, gamma (focal exponent) and seeds, for each combination of
surrogate (prob | logprob) and optimizer (sgd | adam), and writes into --out:

* ``categorical_runs.csv``        one row per combination x N x gamma x seed: final Q_pos, M_ret
* ``categorical_summary.csv``     seed mean / std / min / max per combination x N x gamma
* ``categorical_trajectories.csv`` Q_pos(t), M_ret(t) every --record-every steps (seed means)
* ``categorical_sim.png``         rows = combinations, columns = final Q_pos and M_ret vs N (log-x),
                                   one line per gamma (seed mean, shaded min..max over seeds)
* ``run_info.json``               arguments, timings, environment

Full size (paper): A = 128,000, C = 10,000, N = 2 .. 131,072, 1000 steps, 4 seeds, gamma in {0, 1}.
``--small``: A = 2000, C = 150, N = 2 .. 256, 100 steps, 2 seeds (a few seconds; used by the tests).
``--replot`` redraws the PNG from an existing summary CSV.

Precision: by default SGD runs in float64 (at lr 1e-2 its logit updates are ~1e-8, below float32
resolution) and Adam in float32 (updates ~lr, and 2x faster); metrics are always float64.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from rlsys.algo.categorical import OPTIMIZERS, SURROGATES, CategoricalSetup, simulate  # noqa: E402

FULL = dict(num_actions=128_000, num_correct=10_000, max_log2_n=17, steps=1000, seeds=4)
SMALL = dict(num_actions=2000, num_correct=150, max_log2_n=8, steps=100, seeds=2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=_REPO / "reports" / "categorical", help="output directory")
    p.add_argument("--small", action="store_true", help="small preset for tests (seconds)")
    p.add_argument("--num-actions", type=int, default=None, help="A (default: preset)")
    p.add_argument("--num-correct", type=int, default=None, help="C (default: preset)")
    p.add_argument("--min-log2-n", type=int, default=1, help="smallest N = 2**this (default 1)")
    p.add_argument("--max-log2-n", type=int, default=None, help="largest N = 2**this (default: preset)")
    p.add_argument("--steps", type=int, default=None, help="update steps (default: preset)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..S-1 (default: preset)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1.0], help="focal exponents")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (paper: 1e-2)")
    p.add_argument("--surrogates", nargs="+", choices=SURROGATES, default=list(SURROGATES))
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "float64"],
        default="auto",
        help="logit/optimizer dtype; auto = float64 for sgd (its ~1e-8 logit updates vanish "
        "in float32) and float32 for adam (fast). Sampling CDF and metrics are float64.",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--record-every", type=int, default=None, help="trajectory interval in steps (default: steps // 20)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw categorical_sim.png from an existing --out/categorical_summary.csv",
    )
    args = p.parse_args(argv)
    preset = SMALL if args.small else FULL
    for key in ("num_actions", "num_correct", "max_log2_n", "steps", "seeds"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.record_every is None:
        args.record_every = max(1, args.steps // 20)
    if not 1 <= args.min_log2_n <= args.max_log2_n:
        p.error("--min-log2-n must be >= 1 and <= --max-log2-n")
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be >= 1")
    return args


def _plot(summary: list[dict], combos: list[str], gammas: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.2 * len(combos)), squeeze=False)
    for row, combo in enumerate(combos):
        for col, (metric, label) in enumerate((("q_pos", "final Q_pos"), ("m_ret", "final M_ret"))):
            ax = axes[row][col]
            for gamma in gammas:
                rows = [r for r in summary if r["combination"] == combo and r["gamma"] == gamma]
                rows.sort(key=lambda r: r["N"])
                ns = np.array([r["N"] for r in rows])
                mean = np.array([r[f"{metric}_mean"] for r in rows])
                lo = np.array([r[f"{metric}_min"] for r in rows])
                hi = np.array([r[f"{metric}_max"] for r in rows])
                (line,) = ax.plot(ns, mean, marker="o", ms=3, label=f"gamma = {gamma:g}")
                ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_xlabel("group size N")
            ax.set_ylabel(label)
            ax.set_title(f"{combo}: {label}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _dtype(choice: str, optimizer: str) -> torch.dtype:
    if choice == "auto":
        return torch.float64 if optimizer == "sgd" else torch.float32
    return torch.float64 if choice == "float64" else torch.float32


def _replot(out: Path) -> int:
    with open(out / "categorical_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    for r in summary:
        for k, v in r.items():
            if k == "N" or k == "n_seeds":
                r[k] = int(v)
            elif k not in ("combination", "surrogate", "optimizer"):
                r[k] = float(v)
    combos = list(dict.fromkeys(r["combination"] for r in summary))
    gammas = sorted({float(r["gamma"]) for r in summary})
    info_path = out / "run_info.json"
    title = "Categorical sim (mean, min..max over seeds)"
    if info_path.exists():
        a = json.loads(info_path.read_text())["args"]
        title = (
            f"Categorical sim: A={a['num_actions']}, C={a['num_correct']}, {a['steps']} steps, lr={a['lr']:g}, "
            f"{a['seeds']} seeds (mean, min..max)"
        )
    _plot(summary, combos, gammas, out / "categorical_sim.png", title)
    print(f"redrew {out / 'categorical_sim.png'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return _replot(args.out)
    torch.set_num_threads(max(1, args.threads))
    setup = CategoricalSetup(num_actions=args.num_actions, num_correct=args.num_correct)
    ns = [2**k for k in range(args.min_log2_n, args.max_log2_n + 1)]
    seeds = list(range(args.seeds))
    combos = [(s, o) for s in args.surrogates for o in args.optimizers]
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"categorical sim: A={setup.num_actions} C={setup.num_correct} N={ns[0]}..{ns[-1]} steps={args.steps} "
        f"seeds={len(seeds)} gammas={args.gammas} combos={['/'.join(c) for c in combos]} dtype={args.dtype} "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )

    run_rows: list[dict] = []
    summary: list[dict] = []
    traj_rows: list[dict] = []
    combo_seconds = {}
    t_start = time.perf_counter()
    for surrogate, optimizer in combos:
        combo = f"{surrogate}/{optimizer}"
        t_combo = time.perf_counter()
        for n in ns:
            res = simulate(
                setup,
                n,
                gammas=args.gammas,
                seeds=seeds,
                steps=args.steps,
                lr=args.lr,
                surrogate=surrogate,
                optimizer=optimizer,
                dtype=_dtype(args.dtype, optimizer),
                record_every=args.record_every,
            )
            for gi, gamma in enumerate(res.gammas):
                for si, seed in enumerate(res.seeds):
                    run_rows.append(
                        dict(
                            combination=combo,
                            surrogate=surrogate,
                            optimizer=optimizer,
                            N=n,
                            gamma=gamma,
                            seed=seed,
                            dtype=str(_dtype(args.dtype, optimizer)).replace("torch.", ""),
                            q_pos=float(res.q_pos[gi, si]),
                            m_ret=float(res.m_ret[gi, si]),
                            q_pos_init=res.q_pos_init,
                            steps=args.steps,
                            lr=args.lr,
                            num_actions=setup.num_actions,
                            num_correct=setup.num_correct,
                        )
                    )
                q, m = res.q_pos[gi], res.m_ret[gi]
                summary.append(
                    dict(
                        combination=combo,
                        surrogate=surrogate,
                        optimizer=optimizer,
                        N=n,
                        gamma=gamma,
                        n_seeds=len(seeds),
                        q_pos_mean=float(q.mean()),
                        q_pos_std=float(q.std()),
                        q_pos_min=float(q.min()),
                        q_pos_max=float(q.max()),
                        m_ret_mean=float(m.mean()),
                        m_ret_std=float(m.std()),
                        m_ret_min=float(m.min()),
                        m_ret_max=float(m.max()),
                    )
                )
                for ti, step in enumerate(res.record_steps):
                    # Trajectories exist whenever steps were recorded.
                    assert res.q_pos_traj is not None and res.m_ret_traj is not None
                    traj_rows.append(
                        dict(
                            combination=combo,
                            N=n,
                            gamma=gamma,
                            step=step,
                            q_pos_mean=float(res.q_pos_traj[ti, gi].mean()),
                            m_ret_mean=float(res.m_ret_traj[ti, gi].mean()),
                        )
                    )
            means = " ".join(
                f"g={g:g}: Q={res.q_pos[i].mean():.4f} M={res.m_ret[i].mean():.4f}" for i, g in enumerate(res.gammas)
            )
            print(f"[{combo}] N={n:>6d} {res.wall_seconds:7.1f}s  {means}", flush=True)
        combo_seconds[combo] = time.perf_counter() - t_combo
        print(f"[{combo}] done in {combo_seconds[combo]:.1f}s", flush=True)
    total = time.perf_counter() - t_start

    def write_csv(name: str, rows: list[dict]) -> None:
        with open(args.out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)

    write_csv("categorical_runs.csv", run_rows)
    write_csv("categorical_summary.csv", summary)
    write_csv("categorical_trajectories.csv", traj_rows)
    combo_names = [f"{s}/{o}" for s, o in combos]
    if not args.no_plot:
        _plot(
            summary,
            combo_names,
            [float(g) for g in args.gammas],
            args.out / "categorical_sim.png",
            f"Categorical sim: A={setup.num_actions}, C={setup.num_correct}, {args.steps} steps, lr={args.lr:g}, "
            f"{len(seeds)} seeds (mean, min..max)",
        )
    info = dict(
        argv=list(argv) if argv is not None else sys.argv[1:],
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        total_seconds=total,
        combo_seconds=combo_seconds,
        torch=torch.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        optimizer_note="adam = torch.optim.Adam semantics, betas (0.9, 0.999), eps 1e-8, weight decay 0, ascent",
    )
    (args.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"total time {total:.1f}s; outputs in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
