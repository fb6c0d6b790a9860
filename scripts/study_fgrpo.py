#!/usr/bin/env python
"""The F-GRPO study on countdown: does the focal weight keep pass@k at large k (arXiv 2602.06717)?

Runs, on ONE local Ray cluster, starting every RL run from the same SFT warm start
(:func:`rlsys.sft.warm_start`):

* GRPO at N = 8, F-GRPO at N = 8 with gamma 0.5 and 1.0, and GRPO at N = 32, for several seeds each,
  all with the same number of steps and prompts per step (N = 32 therefore samples 4x the rollouts);
* one hard-examples comparison (arXiv 2508.14094): the warm start's pass rate on a pool of train
  prompts from K = 10 samples each (:func:`rlsys.difficulty.run_difficulty`), then F-GRPO (gamma 0.5,
  N = 8, one seed) trained on the hardest 10 % and on the easiest 10 % of the pool.

Every final checkpoint, and the warm start itself, is evaluated the same way with the pieces of
:func:`rlsys.eval.run_eval` (one rollout/reward pool per checkpoint for both splits): pass@k for
k = 1 .. 256 from n = 256 samples per problem, on the in-domain ``test`` split and on the ``ood``
split (one more number per problem). Per run it also
keeps the mean over training of ``algo/mixed_group_fraction``, ``algo/focal_weight_mean`` and
``algo/learnable_fraction`` from ``metrics.jsonl``.

Outputs under ``--out``: ``README.md`` (tables, plots, commands, wall time; a hand-written
``discussion.md`` in the same directory is embedded when present), ``results.json`` (every number),
``pass_at_k_test.png`` / ``pass_at_k_ood.png`` (one curve per method, mean over seeds, error bars =
std across seeds), ``rl/<run>/`` (each run's metrics and evals; the checkpoint is deleted once
evaluated unless ``--keep-checkpoints``) and ``difficulty/`` (pool pass rates, hardest / easiest
selections).

A run whose ``rl/<run>/result.json`` already exists is reused, so an interrupted study continues
where it stopped (delete ``--out`` to start over). A run that fails (say, a worker killed from
outside) is retried once from scratch.

Usage::

    python scripts/study_fgrpo.py --preset smoke --out /tmp/study    # plumbing check, ~3 min
    nice python scripts/study_fgrpo.py --preset full --out reports/study
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("rlsys.study")

ROOT = Path(__file__).resolve().parents[1]


# ================================ what to run =========================================================


@dataclass(frozen=True)
class Method:
    """One training configuration of the comparison."""

    key: str  # file-name-safe id
    label: str  # what tables and plots call it
    overrides: tuple[str, ...]  # Hydra overrides on top of the study's base config


METHODS = (
    Method("grpo_n8", "GRPO N=8", ("algo=grpo", "algo.group_size=8")),
    Method("fgrpo_g0.5_n8", "F-GRPO γ=0.5 N=8", ("algo=f_grpo", "algo.gamma=0.5", "algo.group_size=8")),
    Method("fgrpo_g1.0_n8", "F-GRPO γ=1.0 N=8", ("algo=f_grpo", "algo.gamma=1.0", "algo.group_size=8")),
    Method("grpo_n32", "GRPO N=32", ("algo=grpo", "algo.group_size=32")),
)
# The hard-examples comparison trains this method (one seed) on each selection.
SELECTION_METHOD = METHODS[1]
SELECTIONS = ("hardest", "easiest")


@dataclass(frozen=True)
class Preset:
    """Sizes of one study. ``train`` overrides apply to every RL run (same steps, prompts per step and
    optimizer settings for every method); anything not set there is the rlsys default."""

    seeds: tuple[int, ...]
    train: tuple[str, ...]
    eval_n: int
    eval_k: tuple[int, ...]
    eval_prompts: int
    pool_size: int  # hard-examples pool (train prompts)
    difficulty_k: int
    fraction: float
    extra: tuple[str, ...] = ()  # overrides for every step, warm start and evaluation included
    num_cpus: int = 4  # local Ray cluster: the actors ask for 2.5 CPUs; oversubscribing is fine


PRESETS: dict[str, Preset] = {
    # Plumbing only: 2 steps, 1 seed, 8 samples per problem of <= 8 tokens, and no SFT (RL starts from
    # the raw tiny model), so it never waits for a warm start to train.
    "smoke": Preset(
        seeds=(0,),
        train=("trainer.total_steps=2", "trainer.prompts_per_step=4"),
        eval_n=8,
        eval_k=(1, 2, 4, 8),
        eval_prompts=8,
        pool_size=40,
        difficulty_k=4,
        fraction=0.1,
        extra=("sft.enabled=false", "rollout.max_tokens=8"),
    ),
    # The report, sized to ~45 min on an otherwise idle 2-core machine: a quarter of the default
    # recipe's rollouts per N = 8 run (40 steps x 16 prompts instead of 80 x 32), 32 problems per split.
    # The optimizer settings are the default recipe's, pinned so the report does not move with the defaults.
    "full": Preset(
        seeds=(0, 1, 2),
        train=(
            "trainer.total_steps=40",
            "trainer.prompts_per_step=16",
            "learner.lr=1e-4",
            "learner.warmup_steps=10",
            "learner.micro_batch_size=64",
        ),
        eval_n=256,
        eval_k=(1, 4, 16, 64, 256),
        eval_prompts=32,
        pool_size=320,
        difficulty_k=10,
        fraction=0.1,
    ),
}


# ================================ configs ============================================================


def compose(overrides: list[str]):
    """An RLConfig from ``conf/`` plus Hydra overrides (what ``python -m rlsys.train ...`` would build)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlsys.cli import CONF_DIR
    from rlsys.config import register_configs, to_dataclass

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_dataclass(hydra_compose("config", overrides=overrides))


def base_overrides(preset: Preset) -> list[str]:
    """Overrides shared by every step of the study."""
    return [
        "logger=disabled",
        "trainer.log_samples=0",
        f"cluster.num_cpus={preset.num_cpus}",
        f"eval.n={preset.eval_n}",
        f"eval.k=[{','.join(map(str, preset.eval_k))}]",
        f"eval.num_prompts={preset.eval_prompts}",
        *preset.extra,
    ]


def train_overrides(
    preset: Preset, method: Method, seed: int, run_dir: Path, data: Path | None, warm_start: str
) -> list[str]:
    """The exact overrides of one RL run (also printed in the README)."""
    o = [
        *base_overrides(preset),
        *preset.train,
        *method.overrides,
        f"trainer.seed={seed}",
        # Evaluation happens afterwards, on the saved checkpoint, identically for every run.
        "trainer.eval_at_start_end=false",
        "trainer.eval_every=0",
        f"run.output_dir={run_dir}",
    ]
    if data is not None:
        # A prompt file: the built-in task is off, so the warm start must be named explicitly.
        o += ["data=file", f"data.path={data}", "data.id_key=prompt_id", f"model.path={warm_start}"]
    return o


def eval_config(cfg, model_path: str, split: str, out_dir: Path, label: str):
    """``cfg`` turned into a run_eval config: ``model_path`` on the countdown ``split``."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=model_path),
        data=dataclasses.replace(cfg.data, task="countdown", path=None),
        eval=dataclasses.replace(cfg.eval, split=split, output_dir=str(out_dir)),
        run=dataclasses.replace(cfg.run, name=label, output_dir=str(out_dir)),
    )


# ================================ one run ============================================================


def training_means(metrics_path: Path) -> dict[str, float]:
    """Mean over the training steps of the group statistics F-GRPO's argument is about."""
    keys = ("algo/mixed_group_fraction", "algo/focal_weight_mean", "algo/learnable_fraction", "reward/mean")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if keys[0] in r]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} if rows else {k: float("nan") for k in keys}


def evaluate_both(cfg, model_path: str, out_dir: Path, label: str) -> dict[str, Any]:
    """pass@k (and distinct correct answers) of ``model_path`` on the test and ood splits.

    What :func:`rlsys.eval.run_eval` does for one split (same rows, samplers and seeds; JSON + CSV
    under ``out_dir/eval_<split>``), but with ONE rollout/reward pool for both splits: a pool start
    costs ~10 s on a small machine, about as much as sampling a split at n = 256.
    """
    from transformers import AutoTokenizer

    from rlsys.data import PromptFormat
    from rlsys.eval import eval_pools, evaluate, load_eval_rows, write_eval_outputs

    rows = {split: load_eval_rows(eval_config(cfg, model_path, split, out_dir, label)) for split in ("test", "ood")}
    e = cfg.eval
    max_tokens = e.max_tokens or cfg.rollout.max_tokens
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    res: dict[str, Any] = {}
    with eval_pools(
        eval_config(cfg, model_path, "test", out_dir, label),
        model_path,
        rows["test"] + rows["ood"],
        temperature=e.temperature,
        max_tokens=max_tokens,
    ) as (rollout_pool, reward_pool):
        for split, split_rows in rows.items():
            t0 = time.perf_counter()
            ev = evaluate(
                split_rows,
                tokenizer,
                rollout_pool,
                reward_pool,
                fmt=PromptFormat.from_config(cfg.data),
                n=e.n,
                ks=e.k,
                seed=e.seed,
                max_prompts_per_call=e.max_prompts_per_call,
            )
            paths = write_eval_outputs(
                ev,
                out_dir / f"eval_{split}",
                label,
                config={"model_path": model_path, "split": split, "eval": dataclasses.asdict(e)},
            )
            # The per-checkpoint plot repeats one curve of the study's plots; ~15 of them would only
            # bloat a report directory meant for version control (the JSON and CSV stay).
            paths.png.unlink(missing_ok=True)
            res[split] = {
                "pass_at_k": {str(k): v for k, v in ev.pass_at_k.items()},
                "pass_at_k_stderr": {str(k): v for k, v in ev.pass_at_k_stderr.items()},
                "distinct_correct": ev.mean_distinct_correct,
                "response_length": ev.mean_response_length,
                "seconds": time.perf_counter() - t0,
            }
            log.info("%s: %s pass@k %s", label, split, {k: round(v, 4) for k, v in ev.pass_at_k.items()})
    return res


def run_one(
    preset: Preset,
    method: Method,
    seed: int,
    out: Path,
    warm_start: str,
    data: Path | None = None,
    tag: str = "",
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Train one run and evaluate its final checkpoint; reuse a finished run's ``result.json``.

    A failure is retried once in a fresh directory: on a shared machine an actor can be killed from
    outside, and one lost run should not cost the whole study.
    """
    from rlsys.driver import train

    run_id = f"{method.key}{tag}_s{seed}"
    run_dir = out / "rl" / run_id  # not "runs/": the repository's .gitignore drops every runs/ directory
    done = run_dir / "result.json"
    if done.exists():
        log.info("%s: reusing %s", run_id, done)
        return json.loads(done.read_text())
    for attempt in (1, 2):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        overrides = train_overrides(preset, method, seed, run_dir, data, warm_start)
        t0 = time.perf_counter()
        try:
            cfg = compose(overrides)
            summary = train(cfg)
            train_s = time.perf_counter() - t0
            evals = evaluate_both(cfg, summary.checkpoint, run_dir, f"{method.label}{tag} s{seed}")
        except Exception as e:
            if attempt == 2:
                raise
            log.warning("%s failed (%s: %s); retrying once from scratch", run_id, type(e).__name__, e)
            continue
        result = {
            "run": run_id,
            "method": method.key,
            "label": method.label + tag,
            "seed": seed,
            "overrides": overrides,
            "checkpoint": summary.checkpoint,
            "steps": summary.steps,
            "train": training_means(Path(summary.metrics_path)),
            "eval": evals,
            "train_seconds": train_s,
            "seconds": time.perf_counter() - t0,
            "attempts": attempt,
        }
        if not keep_checkpoints:
            _drop_checkpoints(run_dir)
        done.write_text(json.dumps(result, indent=2) + "\n")
        return result
    raise AssertionError("unreachable")


def _drop_checkpoints(run_dir: Path) -> None:
    """Delete a finished run's checkpoints (weights + optimizer state, tens of MB per run) once it has
    been evaluated: the study directory is a report meant to be committed, not a model store."""
    for sub in ("checkpoints", ".dist"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)


# ================================ hard examples ======================================================


def select_examples(preset: Preset, out: Path, warm_start: str) -> dict[str, Any]:
    """Pass rates of the warm start on the pool (K samples each), and the hardest / easiest files."""
    from rlsys.difficulty import difficulty_summary, run_difficulty, select_by_difficulty, write_jsonl

    ddir = out / "difficulty"
    files = {s: ddir / f"{s}.jsonl" for s in SELECTIONS}
    summary_path = ddir / "study_selection.json"
    if summary_path.exists() and all(f.exists() for f in files.values()):
        return json.loads(summary_path.read_text())
    cfg = compose(
        [
            *base_overrides(preset),
            f"model.path={warm_start}",
            f"difficulty.k={preset.difficulty_k}",
            f"difficulty.pool_size={preset.pool_size}",
            f"difficulty.fraction={preset.fraction}",
            "difficulty.select=hardest",
            f"difficulty.output_dir={ddir}",
            f"run.output_dir={ddir}",
            "run.name=warm start",
        ]
    )
    t0 = time.perf_counter()
    run = run_difficulty(cfg)
    records = [json.loads(line) for line in run.annotated.read_text().splitlines() if line.strip()]
    rates = np.array([r["pass_rate"] for r in records])
    info: dict[str, Any] = {
        "pool": run.summary["num_prompts"],
        "k": preset.difficulty_k,
        "pool_mean_pass_rate": run.summary["mean_pass_rate"],
        "pool_learnable_fraction": run.summary["learnable_fraction"],
        "pool_all_wrong_fraction": run.summary["all_wrong_fraction"],
        "histogram": run.summary["histogram"]["prompts"],
        "seconds": time.perf_counter() - t0,
    }
    for sel in SELECTIONS:
        idx = select_by_difficulty(rates, sel, preset.fraction, cfg.difficulty.seed)
        write_jsonl([records[i] for i in idx], files[sel])
        stats = difficulty_summary(np.array([r["num_correct"] for r in records]), preset.difficulty_k, idx)
        info[sel] = {"file": str(files[sel]), "num_prompts": int(idx.size), **stats["selected_pass_rate"]}
    summary_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


# ================================ aggregation and report =============================================


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


@dataclass
class Group:
    """All seeds of one method (or the warm start / one selection)."""

    key: str  # a method key, "warm_start", or a selection name
    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def pass_at(self, split: str, k: int) -> list[float]:
        return [r["eval"][split]["pass_at_k"][str(k)] for r in self.runs]

    def train_stat(self, key: str) -> list[float]:
        return [r["train"][key] for r in self.runs if "train" in r]

    def distinct(self, split: str) -> list[float]:
        return [r["eval"][split]["distinct_correct"] for r in self.runs]


def results_table(groups: list[Group], kmax: int) -> str:
    head = [
        "method",
        "seeds",
        "test pass@1",
        f"test pass@{kmax}",
        "ood pass@1",
        f"ood pass@{kmax}",
        f"test distinct correct / problem (n={kmax})",
        "mixed groups",
        "focal weight",
        "learnable groups",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        train = [
            fmt(g.train_stat(k)) if g.train_stat(k) else "–"
            for k in ("algo/mixed_group_fraction", "algo/focal_weight_mean", "algo/learnable_fraction")
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    g.label,
                    str(len(g.runs)),
                    fmt(g.pass_at("test", 1)),
                    fmt(g.pass_at("test", kmax)),
                    fmt(g.pass_at("ood", 1)),
                    fmt(g.pass_at("ood", kmax)),
                    fmt(g.distinct("test"), 2),
                    *train,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def per_seed_table(groups: list[Group], kmax: int) -> str:
    head = [
        "run",
        "test pass@1",
        f"test pass@{kmax}",
        "ood pass@1",
        f"ood pass@{kmax}",
        "train reward (mean)",
        "wall (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        for r in g.runs:
            e = r["eval"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        r.get("run", g.label),
                        f"{e['test']['pass_at_k']['1']:.3f}",
                        f"{e['test']['pass_at_k'][str(kmax)]:.3f}",
                        f"{e['ood']['pass_at_k']['1']:.3f}",
                        f"{e['ood']['pass_at_k'][str(kmax)]:.3f}",
                        f"{r['train']['reward/mean']:.3f}" if "train" in r else "–",
                        f"{r.get('seconds', 0):.0f}",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def comparisons(groups: dict[str, Group], kmax: int) -> list[str]:
    """The questions of the study as numbers: mean differences and the seeds' spread."""
    out = []
    base = groups.get("grpo_n8")
    for key, what in (
        ("fgrpo_g0.5_n8", "F-GRPO γ=0.5 N=8"),
        ("fgrpo_g1.0_n8", "F-GRPO γ=1.0 N=8"),
        ("grpo_n32", "GRPO N=32"),
    ):
        g = groups.get(key)
        if base is None or g is None:
            continue
        for split in ("test", "ood"):
            for k in (1, kmax):
                a, b = g.pass_at(split, k), base.pass_at(split, k)
                d = float(np.mean(a) - np.mean(b))
                sa, sb = mean_std(a)[1], mean_std(b)[1]
                # Standard error of a difference of two independent means over seeds.
                se = math.sqrt(sa**2 / len(a) + sb**2 / len(b)) if len(a) > 1 and len(b) > 1 else float("nan")
                verdict = (
                    "n/a (one seed)"
                    if math.isnan(se)
                    else ("larger than 2 s.e." if abs(d) > 2 * se else "within 2 s.e. (not distinguishable)")
                )
                out.append(
                    f"- {what} − GRPO N=8, {split} pass@{k}: {d:+.3f} (s.e. of the difference {se:.3f}; {verdict})"
                )
    f, n32 = groups.get("fgrpo_g0.5_n8"), groups.get("grpo_n32")
    if f is not None and n32 is not None:
        for split in ("test", "ood"):
            d = float(np.mean(f.pass_at(split, kmax)) - np.mean(n32.pass_at(split, kmax)))
            out.append(f"- F-GRPO γ=0.5 N=8 − GRPO N=32, {split} pass@{kmax}: {d:+.3f}")
    h, e = groups.get("hardest"), groups.get("easiest")
    if h is not None and e is not None:
        for split in ("test", "ood"):
            for k in (1, kmax):
                d = float(np.mean(h.pass_at(split, k)) - np.mean(e.pass_at(split, k)))
                out.append(f"- hardest 10 % − easiest 10 %, {split} pass@{k}: {d:+.3f} (one seed each)")
    return out


def plot_split(groups: list[Group], split: str, ks: tuple[int, ...], path: Path, title: str) -> Path:
    from rlsys.eval import plot_pass_at_k

    curves = {g.label: {k: float(np.mean(g.pass_at(split, k))) for k in ks} for g in groups}
    errors = {g.label: {k: mean_std(g.pass_at(split, k))[1] for k in ks} for g in groups}
    return plot_pass_at_k(curves, path, errors=errors, title=title)


def plot_deltas(groups: list[Group], ks: tuple[int, ...], path: Path, reference: str = "grpo_n8") -> Path | None:
    """Both splits side by side: pass@k of every method minus that of ``reference`` (mean over seeds),
    with error bars of +-1 standard error of that difference. The absolute curves of
    :func:`plot_split` lie within a few points of each other; this is where the gaps are readable."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    ref = next((g for g in groups if g.key == reference), None)
    others = [g for g in groups if g.key != reference]
    if ref is None or not others:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=150, sharey=True)
    try:
        for ax, split in zip(axes, ("test", "ood")):
            for i, g in enumerate(others):
                d, err = [], []
                for k in ks:
                    a, b = g.pass_at(split, k), ref.pass_at(split, k)
                    d.append(float(np.mean(a) - np.mean(b)))
                    var = sum(mean_std(x)[1] ** 2 / len(x) for x in (a, b) if len(x) > 1)
                    err.append(math.sqrt(var))
                # Nudge each method sideways a little so the error bars do not hide each other.
                xs = [k * 2 ** (0.06 * (i - (len(others) - 1) / 2)) for k in ks]
                # Same colour as in the absolute plots (matplotlib's cycle in the order of ``groups``).
                ax.errorbar(
                    xs,
                    d,
                    yerr=err,
                    marker="o",
                    markersize=4,
                    capsize=3,
                    linewidth=1.4,
                    label=g.label,
                    color=f"C{groups.index(g) % 10}",
                )
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(ks))
            ax.set_xticklabels([str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("k (samples per problem)")
            ax.set_title(f"{split}: pass@k minus {ref.label}", fontsize=10)
            ax.grid(True, alpha=0.35)
        axes[0].set_ylabel("difference in pass@k (± 1 s.e. over seeds)")
        axes[1].legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_report(
    out: Path,
    preset_name: str,
    preset: Preset,
    warm: dict[str, Any],
    groups: list[Group],
    selection: dict[str, Any] | None,
    timings: dict[str, float],
    argv: list[str],
) -> Path:
    kmax = max(preset.eval_k)
    by_key = {g.key: g for g in groups}
    plots = {
        split: plot_split(
            groups,
            split,
            preset.eval_k,
            out / f"pass_at_k_{split}.png",
            f"countdown {split}: pass@k (mean over seeds ± std), {preset.eval_prompts} problems, n={preset.eval_n}",
        )
        for split in ("test", "ood")
    }
    delta_png = plot_deltas(groups, preset.eval_k, out / "pass_at_k_delta.png")
    first = next(r for g in groups for r in g.runs if "overrides" in r)
    cmd_train = "python -m rlsys.train " + " ".join(shlex.quote(o) for o in first["overrides"])
    disc = out / "discussion.md"
    lines = [
        "# F-GRPO vs GRPO on countdown (tiny model, CPU)",
        "",
        f"Generated by `python scripts/study_fgrpo.py {' '.join(shlex.quote(a) for a in argv)}` "
        f"(preset `{preset_name}`) on {platform.node() or 'this machine'}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "Every number below is in `results.json`; every run's metrics and evals are under `rl/`.",
        "",
        "## Setup",
        "",
        f"- Policy: the built-in tiny Qwen2 model, starting point `{warm['path']}` (the SFT warm start unless "
        "`sft.enabled=false`; every RL run starts from it).",
        f"- RL: {', '.join(preset.train)}; seeds {list(preset.seeds)}; everything else is the rlsys default "
        "(see `rlsys/config.py`). Same steps and prompts per step for every method, so GRPO N=32 draws 4x the "
        "rollouts of the N=8 runs.",
        f"- Evaluation of each final checkpoint and of the warm start with `rlsys.eval` (what `run_eval` does, "
        "one pool for both splits): "
        f"{preset.eval_prompts} problems per split, n={preset.eval_n} samples each (temperature 1), "
        f"unbiased pass@k for k={list(preset.eval_k)}; `test` = in-domain (4 numbers), `ood` = 5 numbers.",
        "- Training fractions: mean over the training steps of `algo/mixed_group_fraction` (0 < correct < N), "
        "`algo/focal_weight_mean` (g = (1 − success rate)^γ, 1 for GRPO) and `algo/learnable_fraction` "
        "(rewards not all equal) from each run's `metrics.jsonl`.",
    ]
    if selection:
        hard, easy = selection["hardest"], selection["easiest"]
        lines.append(
            f"- Hard examples (arXiv 2508.14094): the warm start's pass rate on {selection['pool']} train prompts "
            f"from K={selection['k']} samples each (mean {selection['pool_mean_pass_rate']:.3f}, "
            f"{100 * selection['pool_all_wrong_fraction']:.0f} % never solved, histogram over c=0..K "
            f"{selection['histogram']}); {SELECTION_METHOD.label} (seed {preset.seeds[0]}) trained on the hardest "
            f"{hard['num_prompts']} (pass rate {hard['min']:.2f}..{hard['max']:.2f}) and on the easiest "
            f"{easy['num_prompts']} (pass rate {easy['min']:.2f}..{easy['max']:.2f}) prompts, same steps and "
            "prompts per step."
        )
    lines += [
        "",
        "## Results (mean ± std across seeds)",
        "",
        results_table(groups, kmax),
        "",
        "Per run:",
        "",
        per_seed_table(groups, kmax),
        "",
        "## pass@k curves",
        "",
        "![test](pass_at_k_test.png)",
        "",
        "![ood](pass_at_k_ood.png)",
        "",
        *(
            [
                "Differences to GRPO N=8 (error bars: ± 1 s.e. of the difference over seeds; "
                "for a one-seed row that is the reference's spread alone):",
                "",
                "![delta](pass_at_k_delta.png)",
                "",
            ]
            if delta_png
            else []
        ),
        "## The questions, as numbers",
        "",
        *comparisons(by_key, kmax),
        "",
        "## Discussion",
        "",
    ]
    lines += (
        [disc.read_text().strip(), ""]
        if disc.exists()
        else ["(No hand-written analysis yet: `discussion.md` next to this file is embedded here when present.)", ""]
    )
    total = timings.get("total", 0.0)
    lines += [
        "## Commands and wall time",
        "",
        "The whole study:",
        "",
        "```",
        f"nice python scripts/study_fgrpo.py {' '.join(argv)}",
        "```",
        "",
        "It runs, per run (example: the first one; the others differ in the algo/seed/data overrides "
        "listed in `results.json`):",
        "",
        "```",
        cmd_train,
        "python -m rlsys.eval model.path=<that run's final checkpoint> eval.split=test  # and eval.split=ood",
        "```",
        "",
        f"Wall time of the invocation that produced `results.json`: {total / 60:.1f} min on {_machine()} "
        f"(warm start + its eval {timings.get('warm_start', 0) / 60:.1f} min, difficulty "
        f"{timings.get('difficulty', 0) / 60:.1f} min, RL runs {timings.get('runs', 0) / 60:.1f} min). "
        "Per-run wall times are in the per-run table.",
        "",
        "## Files",
        "",
        "- `results.json`: every number in this report, per run",
        f"- `{plots['test'].name}`, `{plots['ood'].name}`, `pass_at_k_delta.png`: the plots above",
        "- `rl/<run>/`: `metrics.jsonl`, `eval_test/`, `eval_ood/`, `result.json` (checkpoints are deleted "
        "after evaluation unless `--keep-checkpoints`)",
        "- `difficulty/`: `annotated.jsonl` (pool pass rates), `hardest.jsonl`, `easiest.jsonl`, "
        "`pass_rates.png`, `summary.json`",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores"


# ================================ main ===============================================================


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "study")
    ap.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every run's final checkpoint (deleted after evaluation by default)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite README.md and the plots from an existing results.json (e.g. after editing "
        "discussion.md); runs nothing",
    )
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    if args.report_only:
        return rewrite_report(out)
    preset = PRESETS[args.preset]
    out.mkdir(parents=True, exist_ok=True)

    from rlsys import cluster
    from rlsys.cli import setup_logging
    from rlsys.driver import policy_model_path

    setup_logging()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with cluster.session(None, preset.num_cpus, "rlsys-study"):
        t0 = time.perf_counter()
        base = compose([*base_overrides(preset), f"run.output_dir={out / 'warm_start'}"])
        ws = policy_model_path(base)  # the SFT warm start (trained once, then cached), as rlsys.train uses
        warm_file = out / "warm_start" / "result.json"
        if warm_file.exists():
            warm = json.loads(warm_file.read_text())
        else:
            warm = {"run": "warm start", "path": ws, "eval": evaluate_both(base, ws, out / "warm_start", "warm start")}
            warm_file.write_text(json.dumps(warm, indent=2) + "\n")
        timings["warm_start"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        groups = [Group("warm_start", "starting policy (no RL)", [warm])]
        for method in METHODS:
            runs = [run_one(preset, method, s, out, ws, keep_checkpoints=args.keep_checkpoints) for s in preset.seeds]
            groups.append(Group(method.key, method.label, runs))
        timings["runs"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        selection = select_examples(preset, out, ws)
        timings["difficulty"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for sel in SELECTIONS:
            r = run_one(
                preset,
                SELECTION_METHOD,
                preset.seeds[0],
                out,
                ws,
                data=Path(selection[sel]["file"]),
                tag=f"_{sel}",
                keep_checkpoints=args.keep_checkpoints,
            )
            groups.append(Group(sel, f"{SELECTION_METHOD.label}, {sel} 10%", [r]))
        timings["runs"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    results = {
        "preset": args.preset,
        "preset_values": dataclasses.asdict(preset),
        "argv": argv,
        "warm_start": warm,
        "groups": [dataclasses.asdict(g) for g in groups],
        "selection": selection,
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    readme = write_report(out, args.preset, preset, warm, groups, selection, timings, argv)
    print("\n" + results_table(groups, max(preset.eval_k)))
    print(f"\nstudy finished in {timings['total'] / 60:.1f} min: {readme}")
    return 0


def rewrite_report(out: Path) -> int:
    """README.md and plots again from ``out/results.json`` (same preset, commands and timings)."""
    results = json.loads((out / "results.json").read_text())
    pv = results["preset_values"]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in pv.items()}
    preset = Preset(**fields)
    groups = [Group(**g) for g in results["groups"]]
    readme = write_report(
        out,
        results["preset"],
        preset,
        results["warm_start"],
        groups,
        results["selection"],
        results["timings_s"],
        results["argv"],
    )
    print(f"rewrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
