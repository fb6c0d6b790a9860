"""Per-prompt difficulty: ``python -m rlsys.difficulty [overrides...]`` (arXiv 2508.14094).

Every prompt of the pool gets K samples from the model (rollout workers, at the training sampling
settings ``rollout.temperature`` / ``rollout.max_tokens``), graded by the reward pool; its pass rate
is c / K. The outputs, under ``difficulty.output_dir`` (default ``<run.output_dir>/difficulty``):

* ``annotated.jsonl`` -- every prompt, in pool order, in :func:`rlsys.data.save_rows`'s schema plus
  top-level ``pass_rate``, ``num_correct``, ``num_samples`` (also copied into ``meta`` as strings, so
  they survive a ``load_rows`` round trip);
* ``selected.jsonl`` -- the chosen fraction (``difficulty.select`` = hardest | easiest | random,
  ``difficulty.fraction``), same schema, in selection order (hardest first for "hardest");
* ``summary.json`` -- histogram of pass rates (prompts per c = 0..K), learnable fraction
  (0 < pass rate < 1), all-wrong / all-correct fractions, what was selected;
* ``pass_rates.png`` -- the histogram.

Both JSONL files load back with ``load_rows(path, id_key="prompt_id")``; train on the selection with
``data=file data.path=<dir>/selected.jsonl data.id_key=prompt_id``.

Examples::

    python -m rlsys.difficulty difficulty.k=10                          # countdown train pool
    python -m rlsys.difficulty model=hf model.path=ckpt data=file data.path=train.jsonl \\
        difficulty.select=hardest difficulty.fraction=0.2
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlsys.build import eval_pools
from rlsys.choices import SELECT_MODES
from rlsys.cli import hydra_entry
from rlsys.config import RLConfig, resolve, run_config, validate
from rlsys.data import PromptFormat, load_pool_rows
from rlsys.eval import check_eval_resources, model_label, sample_and_grade
from rlsys.fsutil import write_jsonl
from rlsys.models import base_model_path, load_tokenizer
from rlsys.records import GRADE_ERROR, GRADE_TIMEOUT, PromptRow

log = logging.getLogger("rlsys.difficulty")


# ================================ pure selection logic ================================================


def num_to_select(num_prompts: int, fraction: float) -> int:
    """How many of ``num_prompts`` a ``fraction`` selects: round half up, at least 1, at most all.

    The tiny epsilon keeps float products such as ``0.1 * 30 = 3.0000000000000004`` or
    ``0.15 * 10 = 1.4999999999999998`` on the side a person expects.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, min(num_prompts, int(math.floor(fraction * num_prompts + 0.5 + 1e-9))))


def select_by_difficulty(
    pass_rates: Sequence[float] | np.ndarray, select: str, fraction: float, seed: int
) -> np.ndarray:
    """Indices of the selected prompts, in selection order: int64 array of length
    ``num_to_select(len(pass_rates), fraction)``.

    ``hardest``: lowest pass rates first; ``easiest``: highest first; ``random``: a uniform sample.
    Ties are broken by a shuffle seeded with ``seed`` (stable sort over a seeded permutation), so
    the result is a deterministic function of the arguments and no prompt position is favoured.
    Raises ValueError for an empty or non-1-d input, a NaN or a value outside [0, 1], an unknown
    ``select`` or a ``fraction`` outside (0, 1].
    """
    rates = np.asarray(pass_rates, dtype=np.float64)
    if rates.ndim != 1 or rates.size == 0:
        raise ValueError(f"pass_rates must be a non-empty 1-d sequence, got shape {rates.shape}")
    if not np.all(np.isfinite(rates)) or np.any(rates < 0) or np.any(rates > 1):
        raise ValueError("pass_rates must be finite values in [0, 1]")
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    m = num_to_select(rates.size, fraction)
    perm = np.random.default_rng(int(seed)).permutation(rates.size)
    if select == "random":
        return perm[:m].astype(np.int64)
    key = rates[perm] if select == "hardest" else -rates[perm]
    order = np.argsort(key, kind="stable")
    return perm[order[:m]].astype(np.int64)


def pass_rate_histogram(num_correct: Sequence[int] | np.ndarray, k: int) -> list[int]:
    """Prompts per number of correct samples c = 0..k: a list of k + 1 counts (pass rate c / k)."""
    c = np.asarray(num_correct, dtype=np.int64)
    if c.size and (c.min() < 0 or c.max() > k):
        raise ValueError(f"num_correct must lie in [0, {k}]")
    return np.bincount(c, minlength=k + 1).astype(int).tolist()


def difficulty_summary(num_correct: Sequence[int] | np.ndarray, k: int, selected: np.ndarray) -> dict[str, Any]:
    """Pool statistics from c per prompt ([P]) with K = ``k`` samples, and the selected indices."""
    c = np.asarray(num_correct, dtype=np.int64)
    rates = c / k
    sel = rates[np.asarray(selected, dtype=np.int64)]
    return {
        "num_prompts": int(c.size),
        "k": int(k),
        "mean_pass_rate": float(rates.mean()),
        "learnable_fraction": float(((c > 0) & (c < k)).mean()),
        "all_wrong_fraction": float((c == 0).mean()),
        "all_correct_fraction": float((c == k).mean()),
        "histogram": {
            "pass_rate": [i / k for i in range(k + 1)],
            "num_correct": list(range(k + 1)),
            "prompts": pass_rate_histogram(c, k),
        },
        "num_selected": int(sel.size),
        "selected_pass_rate": {"min": float(sel.min()), "max": float(sel.max()), "mean": float(sel.mean())},
    }


# ================================ files ===============================================================


def annotated_record(row: PromptRow, num_correct: int, num_samples: int) -> dict[str, Any]:
    """``save_rows``'s JSON record of ``row`` plus ``pass_rate`` / ``num_correct`` / ``num_samples``
    (top level as numbers, and in ``meta`` as strings so ``load_rows`` keeps them in PromptRow.meta)."""
    from rlsys.data import _record  # the one definition of the save_rows schema

    rec = _record(row)
    rate = num_correct / num_samples
    rec["meta"] = {
        **rec["meta"],
        "pass_rate": repr(rate),
        "num_correct": str(num_correct),
        "num_samples": str(num_samples),
    }
    rec.update(pass_rate=rate, num_correct=int(num_correct), num_samples=int(num_samples))
    return rec


def load_pass_rates(path: str | Path) -> dict[str, float]:
    """``{prompt_id: pass_rate}`` from an ``annotated.jsonl`` / ``selected.jsonl`` written here."""
    out: dict[str, float] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "prompt_id" not in rec or "pass_rate" not in rec:
                raise ValueError(f"{path}: line {lineno} has no prompt_id/pass_rate: not a difficulty file")
            out[str(rec["prompt_id"])] = float(rec["pass_rate"])
    return out


def plot_pass_rate_histogram(histogram: Sequence[int], k: int, path: str | Path, title: str = "") -> Path:
    """Bar chart of prompts per pass rate c / k (learnable bars, 0 < c < k, in a second colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=150)
    try:
        xs = np.arange(k + 1)
        colours = ["#1f77b4" if 0 < c < k else "#9e9e9e" for c in xs]
        bars = ax.bar(xs, histogram, color=colours, edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fontsize=7, padding=2)
        step = max(1, math.ceil((k + 1) / 11))
        ax.set_xticks(xs[::step])
        ax.set_xticklabels([f"{c / k:.2g}" for c in xs[::step]])
        from matplotlib.patches import Patch

        ax.legend(
            handles=[
                Patch(color="#1f77b4", label="learnable (0 < rate < 1)"),
                Patch(color="#9e9e9e", label="all wrong / all correct"),
            ],
            fontsize=8,
            loc="best",
        )
        ax.set_xlabel(f"pass rate (correct of K={k} samples)")
        ax.set_ylabel("prompts")
        ax.margins(y=0.12)
        ax.grid(True, axis="y", alpha=0.35)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def format_summary(summary: dict[str, Any], select: str, title: str = "") -> str:
    """A small text histogram and the headline fractions."""
    lines = [title] if title else []
    h = summary["histogram"]
    peak = max(h["prompts"]) or 1
    lines.append(f"{'pass rate':>9}  {'prompts':>7}")
    for rate, count in zip(h["pass_rate"], h["prompts"]):
        lines.append(f"{rate:>9.2f}  {count:>7d}  {'#' * round(30 * count / peak)}")
    s = summary["selected_pass_rate"]
    lines.append(
        f"mean pass rate {summary['mean_pass_rate']:.3f}; learnable (0 < rate < 1) "
        f"{summary['learnable_fraction']:.3f}, all wrong {summary['all_wrong_fraction']:.3f}, "
        f"all correct {summary['all_correct_fraction']:.3f}"
    )
    lines.append(
        f"selected {summary['num_selected']} {select} prompts (pass rate {s['min']:.2f}..{s['max']:.2f}, "
        f"mean {s['mean']:.3f})"
    )
    return "\n".join(lines)


# ================================ the CLI =============================================================


# load_pool_rows (the prompts to estimate) lives in rlsys.data, with the other row loaders.


@dataclass(frozen=True)
class DifficultyRun:
    """What ``python -m rlsys.difficulty`` produced."""

    annotated: Path
    selected: Path
    summary_path: Path
    histogram_png: Path
    summary: dict[str, Any]
    text: str


def run_difficulty(cfg: RLConfig) -> DifficultyRun:
    """The difficulty CLI's work: validate, connect to Ray, sample K per prompt, grade, select, write.

    Shuts down only a Ray cluster it started itself; ConfigError before any actor for a bad config.
    """
    from rlsys import cluster

    cfg = resolve(cfg)  # absolute paths (actors have another cwd), model.dtype for this hardware
    validate(cfg)
    with cluster.session(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.namespace) as cpus:
        check_eval_resources(cfg, cpus)
        return _run_difficulty(cfg)


def _run_difficulty(cfg: RLConfig) -> DifficultyRun:
    df = cfg.difficulty
    out_dir = Path(df.output_dir or Path(cfg.run.output_dir) / "difficulty")
    model_path = base_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    rows = load_pool_rows(cfg)
    log.info(
        "difficulty: %d prompts x K=%d samples (temperature %g, max_tokens %d); model %s",
        len(rows),
        df.k,
        cfg.rollout.temperature,
        cfg.rollout.max_tokens,
        model_path,
    )

    with eval_pools(cfg, model_path, rows, temperature=cfg.rollout.temperature, max_tokens=cfg.rollout.max_tokens) as (
        rollout_pool,
        reward_pool,
    ):
        sg = sample_and_grade(
            rows,
            tokenizer,
            rollout_pool,
            reward_pool,
            fmt=PromptFormat.from_config(cfg.data),
            n=df.k,
            seed=df.seed,
            label="difficulty",
        )

    c = sg.num_correct
    selected = select_by_difficulty(c / df.k, df.select, df.fraction, df.seed)
    records = [annotated_record(r, int(ci), df.k) for r, ci in zip(rows, c)]
    annotated = write_jsonl(records, out_dir / "annotated.jsonl")
    selected_path = write_jsonl([records[i] for i in selected], out_dir / "selected.jsonl")

    summary = difficulty_summary(c, df.k, selected)
    summary.update(
        select=df.select,
        fraction=df.fraction,
        seed=df.seed,
        model_path=model_path,
        temperature=cfg.rollout.temperature,
        max_tokens=cfg.rollout.max_tokens,
        reward_timeouts=sg.status_counts.get(GRADE_TIMEOUT, 0),
        reward_errors=sg.status_counts.get(GRADE_ERROR, 0),
        generate_seconds=sg.generate_seconds,
        grade_seconds=sg.grade_seconds,
        files={"annotated": str(annotated), "selected": str(selected_path)},
        config=run_config(cfg),
    )
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    label = model_label(cfg, model_path)
    png = plot_pass_rate_histogram(
        summary["histogram"]["prompts"],
        df.k,
        out_dir / "pass_rates.png",
        title=f"{label}: pass rates of {len(rows)} prompts (K={df.k})",
    )
    text = format_summary(
        summary,
        df.select,
        title=f"rlsys difficulty: {label} | {len(rows)} prompts x K={df.k} "
        f"samples | temperature {cfg.rollout.temperature:g}",
    )
    return DifficultyRun(
        annotated=annotated,
        selected=selected_path,
        summary_path=summary_path,
        histogram_png=png,
        summary=summary,
        text=text,
    )


def format_run(run: DifficultyRun) -> str:
    """What ``python -m rlsys.difficulty`` prints at the end: the summary and where the files are."""
    return (
        f"\n{run.text}\n"
        f"  annotated: {run.annotated}\n  selected:  {run.selected}\n  summary:   {run.summary_path}\n"
        f"  histogram: {run.histogram_png}"
    )


# Console entry point (``python -m rlsys.difficulty``); SIGINT / SIGTERM: stop in seconds, exit 130 / 143.
main = hydra_entry("rlsys.difficulty", run_difficulty, format_run, phase="difficulty")


if __name__ == "__main__":
    main()
