"""pass@k evaluation: ``python -m rlsys.eval [overrides...]`` and the library calls behind it.

Examples::

    python -m rlsys.eval                                             # the tiny model on countdown/test
    python -m rlsys.eval model=hf model.path=outputs/run/checkpoints/step_000020 eval.n=256 \\
        eval.k=[1,4,16,64,256]
    python -m rlsys.eval data=file data.path=test.jsonl data.verifier=math eval.num_prompts=200

Library use (the training driver, with pools that are already running)::

    result = run_evaluation(cfg, rows, tokenizer, rollout_pool, reward_pool, logger, step, f"step_{step:06d}")
    logger.log(step, eval_metrics(result))

which is :func:`evaluate` with ``cfg.eval``'s n, k, seed and chunking, plus :func:`write_eval_outputs`
under :func:`eval_output_dir`.

Pieces:

* :func:`sample_and_grade` draws n completions per prompt with the rollout workers (vLLM) and grades
  them with the reward pool; :mod:`rlsys.difficulty` reuses it with n = K.
* :func:`evaluate` turns the grades into per-problem (n, c) counts and the unbiased pass@k
  (:func:`rlsys.algo.pass_at_k`), averaged over problems with a standard error across problems.
* :func:`write_eval_outputs` writes ``<label>.json`` (full result + config), ``<label>.csv``
  (k, pass@k, stderr) and ``<label>.png`` (:func:`plot_pass_at_k`, also used by the F-GRPO study).

Names: P prompts (problems), n samples per prompt, K the list of k values.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlsys.algo import pass_at_k

# Re-exported: callers and scripts/study_fgrpo.py use rlsys.eval.eval_pools / make_*_pool.
from rlsys.build import eval_pools, make_reward_pool, make_rollout_pool  # noqa: F401
from rlsys.cli import hydra_entry
from rlsys.config import ConfigError, RLConfig, resolve, run_config, validate
from rlsys.data import PromptFormat, encode_prompt, load_eval_rows
from rlsys.models import base_model_path, load_tokenizer
from rlsys.progress import Progress
from rlsys.records import (
    GRADE_ERROR,
    GRADE_INVALID,
    GRADE_STATUSES,
    GRADE_TIMEOUT,
    GradeRequest,
    PromptRow,
    RolloutRequest,
)

log = logging.getLogger("rlsys.eval")

# Samples per rollout worker per generate call when max_prompts_per_call is not given: large enough
# that vLLM batches well, small enough that one call stays far inside rollout.timeout_s and the
# driver never holds more than a few thousand completions at once.
SAMPLES_PER_WORKER_CALL = 4096


# ================================ sampling + grading ==================================================


@dataclass(frozen=True)
class SampleGrades:
    """n graded samples of each of P prompts (row order = the ``rows`` given).

    Arrays are [P, n] unless noted. ``distinct_correct`` [P] counts distinct canonical correct
    answers per prompt; None when some row's task offers no ``canonical_answer`` (files with a
    user verifier). ``status_counts`` maps every grade status to its count over all P * n samples.
    """

    prompt_ids: tuple[str, ...]
    correct: np.ndarray  # [P, n] bool
    rewards: np.ndarray  # [P, n] float32
    lengths: np.ndarray  # [P, n] int32, response tokens
    truncated: np.ndarray  # [P, n] bool, hit max_tokens
    status_counts: dict[str, int]
    distinct_correct: np.ndarray | None  # [P] int64, or None
    generate_seconds: float
    grade_seconds: float

    @property
    def num_correct(self) -> np.ndarray:
        """c per prompt: [P] int64."""
        return self.correct.sum(axis=1).astype(np.int64)

    @property
    def pass_rate(self) -> np.ndarray:
        """c / n per prompt: [P] float64."""
        return self.correct.mean(axis=1, dtype=np.float64)


def eval_seed(seed: int, prompt_id: str) -> int:
    """A stable 31-bit sampler seed for one prompt in an evaluation (independent of worker placement,
    chunking and of the training run's per-step seeds)."""
    return zlib.crc32(f"eval/{int(seed)}/{prompt_id}".encode()) & 0x7FFFFFFF


def default_prompts_per_call(n: int, num_workers: int) -> int:
    """Prompts per generate call so each worker gets about :data:`SAMPLES_PER_WORKER_CALL` samples."""
    return max(1, (SAMPLES_PER_WORKER_CALL * max(1, num_workers)) // max(1, n))


def canonicalizer_for(rows: Sequence[PromptRow]) -> Callable[[int, str], str | None] | None:
    """``f(row_index, completion) -> canonical correct answer or None`` when every row is graded by a
    built-in task's own verifier (so its ``canonical_answer`` agrees with the grade), else None."""
    from rlsys.tasks import TASKS

    tasks = []
    for r in rows:
        task = TASKS.get(r.task)
        if task is None or r.verifier != task.verifier:
            return None
        tasks.append(task)
    return lambda i, completion: tasks[i].canonical_answer(completion, rows[i].answer)


def sample_and_grade(
    rows: Sequence[PromptRow],
    tokenizer,
    rollout_pool,
    reward_pool,
    *,
    fmt: PromptFormat,
    n: int,
    seed: int,
    max_prompts_per_call: int | None = None,
    label: str = "eval",
) -> SampleGrades:
    """Sample ``n`` completions for every row with ``rollout_pool`` and grade them with ``reward_pool``.

    Prompts are encoded in format ``fmt`` (:class:`rlsys.data.PromptFormat`), as the training job encodes them.

    Sampling uses the pool's own settings (temperature, top_p, max_tokens of its RolloutSpec) and
    per-prompt seeds from :func:`eval_seed`, so the samples are a function of (weights, prompt, seed,
    n). Prompts go out in chunks of ``max_prompts_per_call`` (None: :func:`default_prompts_per_call`);
    chunk i is graded in a background thread while chunk i + 1 is generated. Every verifier spec is
    checked before any sampling, so a bad spec fails in seconds.

    Raises ValueError for no rows, duplicate prompt ids, ``n < 1`` or ``max_prompts_per_call < 1``;
    rollout/reward failures propagate with the phase and actor named.
    """
    if not rows:
        raise ValueError(f"{label}: no prompts to sample")
    if n < 1:
        raise ValueError(f"{label}: n must be >= 1, got {n}")
    ids = [r.prompt_id for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{label}: duplicate prompt ids {dup}; every prompt needs a unique prompt_id")
    per_call = (
        default_prompts_per_call(n, rollout_pool.num_workers) if max_prompts_per_call is None else max_prompts_per_call
    )
    if per_call < 1:
        raise ValueError(f"{label}: max_prompts_per_call must be >= 1, got {max_prompts_per_call}")
    reward_pool.validate_specs(sorted({r.verifier for r in rows}))
    canon = canonicalizer_for(rows)

    p = len(rows)
    correct = np.zeros((p, n), dtype=bool)
    rewards = np.zeros((p, n), dtype=np.float32)
    lengths = np.zeros((p, n), dtype=np.int32)
    truncated = np.zeros((p, n), dtype=bool)
    distinct = np.zeros(p, dtype=np.int64) if canon is not None else None
    counts = dict.fromkeys(GRADE_STATUSES, 0)
    gen_seconds = 0.0
    grade_seconds = 0.0

    def grade_chunk(lo: int, groups: list) -> float:
        # Runs in the grading thread; writes only rows lo..lo+len(groups) of the arrays above.
        t0 = time.perf_counter()
        grades = reward_pool.grade(
            [
                GradeRequest(g.prompt_id, j, c.text, rows[lo + i].answer, rows[lo + i].verifier)
                for i, g in enumerate(groups)
                for j, c in enumerate(g.completions)
            ]
        )
        for idx, gr in enumerate(grades):
            i, j = divmod(idx, n)
            if (gr.prompt_id, gr.sample_index) != (groups[i].prompt_id, j):
                # The pool promises request order; a mismatch would silently mis-score problems.
                raise RuntimeError(
                    f"{label}: grade {idx} of a chunk is for ({gr.prompt_id!r}, {gr.sample_index}), "
                    f"expected ({groups[i].prompt_id!r}, {j})"
                )
            rewards[lo + i, j] = gr.reward
            correct[lo + i, j] = gr.correct
            counts[gr.status] += 1
        for i, g in enumerate(groups):
            for j, c in enumerate(g.completions):
                lengths[lo + i, j] = len(c.token_ids)
                truncated[lo + i, j] = c.finish_reason == "length"
            if distinct is not None and canon is not None:
                answers = {canon(lo + i, c.text) for j, c in enumerate(g.completions) if correct[lo + i, j]}
                answers.discard(None)
                distinct[lo + i] = len(answers)
        return time.perf_counter() - t0

    # Progress per chunk: the first, then at most one line every ~15 s, and the last (one line for a
    # single chunk); a tqdm bar instead when stderr is a terminal (rlsys.progress).
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rlsys-{label}-grade") as pool,
        Progress(
            p,
            f"{label}: sampled",
            unit="prompt",
            logger=log,
            counts_fmt="{done}/{total} prompts x " + str(n) + " ({pct}%)",
        ) as progress,
    ):
        pending: Future | None = None
        for lo in range(0, p, per_call):
            chunk = rows[lo : lo + per_call]
            requests = [RolloutRequest(r.prompt_id, tuple(encode_prompt(tokenizer, r, fmt))) for r in chunk]
            t0 = time.perf_counter()
            groups, _ = rollout_pool.generate(requests, n, {r.prompt_id: eval_seed(seed, r.prompt_id) for r in chunk})
            gen_seconds += time.perf_counter() - t0
            if pending is not None:
                grade_seconds += pending.result()
            pending = pool.submit(grade_chunk, lo, groups)
            progress.update(lo + len(chunk))
        if pending is not None:
            grade_seconds += pending.result()
    return SampleGrades(
        prompt_ids=tuple(ids),
        correct=correct,
        rewards=rewards,
        lengths=lengths,
        truncated=truncated,
        status_counts=counts,
        distinct_correct=distinct,
        generate_seconds=gen_seconds,
        grade_seconds=grade_seconds,
    )


# ================================ pass@k ==============================================================


def pass_at_k_table(n: Any, c: Any, ks: Sequence[int]) -> tuple[dict[int, float], dict[int, float]]:
    """Mean unbiased pass@k over problems and its standard error across problems, for each k.

    ``n``, ``c``: [P] samples and correct samples per problem; every k must satisfy 1 <= k <= n.
    Returns ``(mean, stderr)``, two ``{k: float}`` dicts in the order of ``ks``. The standard error is
    ``std(pass@k per problem, ddof=1) / sqrt(P)`` (the spread of problem difficulty, given these
    samples); NaN when P = 1. Raises ValueError on empty input or an invalid k (see ``pass_at_k``).
    """
    n_arr, c_arr = np.asarray(n), np.asarray(c)
    if n_arr.ndim != 1 or n_arr.size == 0 or c_arr.shape != n_arr.shape:
        raise ValueError(f"n and c must be non-empty 1-d arrays of equal shape, got {n_arr.shape} and {c_arr.shape}")
    if not ks:
        raise ValueError("ks must contain at least one k")
    mean: dict[int, float] = {}
    stderr: dict[int, float] = {}
    for k in ks:
        per_problem = np.asarray(pass_at_k(n_arr, c_arr, int(k)), dtype=np.float64)
        mean[int(k)] = float(per_problem.mean())
        stderr[int(k)] = (
            float(per_problem.std(ddof=1) / math.sqrt(per_problem.size)) if per_problem.size > 1 else float("nan")
        )
    return mean, stderr


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured. Arrays are per problem, [P], in the order of the rows given.

    ``pass_at_k`` / ``pass_at_k_stderr``: ``{k: float}`` (mean over problems / standard error across
    problems, NaN for one problem). ``distinct_correct``: distinct canonical correct answers per
    problem, None when the task has no ``canonical_answer``. ``num_timeouts`` / ``num_errors`` /
    ``num_invalid``: grades with that status (each scored 0, so they lower pass@k).
    """

    prompt_ids: tuple[str, ...]
    n: np.ndarray  # [P] int64
    c: np.ndarray  # [P] int64
    ks: tuple[int, ...]
    pass_at_k: dict[int, float]
    pass_at_k_stderr: dict[int, float]
    mean_reward: float
    mean_response_length: float  # tokens, over all P * n samples
    truncated_fraction: float
    distinct_correct: np.ndarray | None  # [P] int64
    num_timeouts: int
    num_errors: int
    num_invalid: int
    seed: int
    generate_seconds: float
    grade_seconds: float

    @property
    def num_problems(self) -> int:
        return len(self.prompt_ids)

    @property
    def mean_distinct_correct(self) -> float | None:
        """Mean distinct correct answers per problem (None without ``canonical_answer``)."""
        return None if self.distinct_correct is None else float(self.distinct_correct.mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None; k keys become strings as JSON requires)."""
        problems = []
        for i, pid in enumerate(self.prompt_ids):
            row: dict[str, Any] = {"prompt_id": pid, "n": int(self.n[i]), "c": int(self.c[i])}
            if self.distinct_correct is not None:
                row["distinct_correct"] = int(self.distinct_correct[i])
            problems.append(row)
        return {
            "num_problems": self.num_problems,
            "ks": list(self.ks),
            "pass_at_k": {str(k): _finite_or_none(v) for k, v in self.pass_at_k.items()},
            "pass_at_k_stderr": {str(k): _finite_or_none(v) for k, v in self.pass_at_k_stderr.items()},
            "mean_reward": _finite_or_none(self.mean_reward),
            "mean_response_length": _finite_or_none(self.mean_response_length),
            "truncated_fraction": _finite_or_none(self.truncated_fraction),
            "mean_distinct_correct": self.mean_distinct_correct,
            "num_timeouts": self.num_timeouts,
            "num_errors": self.num_errors,
            "num_invalid": self.num_invalid,
            "seed": self.seed,
            "generate_seconds": self.generate_seconds,
            "grade_seconds": self.grade_seconds,
            "problems": problems,
        }


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def result_from_grades(sg: SampleGrades, ks: Sequence[int], seed: int) -> EvalResult:
    """Build an EvalResult from graded samples (pure; what :func:`evaluate` does after sampling)."""
    c = sg.num_correct
    n = np.full(c.shape, sg.correct.shape[1], dtype=np.int64)
    mean, stderr = pass_at_k_table(n, c, ks)
    return EvalResult(
        prompt_ids=sg.prompt_ids,
        n=n,
        c=c,
        ks=tuple(int(k) for k in ks),
        pass_at_k=mean,
        pass_at_k_stderr=stderr,
        mean_reward=float(sg.rewards.mean()),
        mean_response_length=float(sg.lengths.mean()),
        truncated_fraction=float(sg.truncated.mean()),
        distinct_correct=sg.distinct_correct,
        num_timeouts=sg.status_counts.get(GRADE_TIMEOUT, 0),
        num_errors=sg.status_counts.get(GRADE_ERROR, 0),
        num_invalid=sg.status_counts.get(GRADE_INVALID, 0),
        seed=int(seed),
        generate_seconds=sg.generate_seconds,
        grade_seconds=sg.grade_seconds,
    )


def check_ks(ks: Sequence[int], n: int) -> tuple[int, ...]:
    """Validate and normalise the k list: non-empty, integers, 1 <= k <= n; sorted, de-duplicated."""
    if not ks:
        raise ValueError("ks must contain at least one k")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n:
            raise ValueError(
                f"every k must be an integer with 1 <= k <= n={n} (pass@k needs n >= k samples), got {k!r}"
            )
        out.append(int(k))
    return tuple(sorted(set(out)))


def evaluate(
    rows: Sequence[PromptRow],
    tokenizer,
    rollout_pool,
    reward_pool,
    *,
    fmt: PromptFormat,
    n: int,
    ks: Sequence[int],
    seed: int,
    max_prompts_per_call: int | None = None,
) -> EvalResult:
    """pass@k of the rollout pool's current weights on ``rows``, with pools that are already running.

    Draws ``n`` samples per row at the pool's sampling settings (see :func:`sample_and_grade`),
    grades them, and computes the unbiased pass@k for each k in ``ks`` (sorted, de-duplicated;
    each 1 <= k <= n) averaged over the P rows. Deterministic given (weights, rows, n, seed).
    Raises ValueError for a bad k, no rows or duplicate prompt ids, before any sampling.
    """
    ks_t = check_ks(ks, n)
    sg = sample_and_grade(
        rows,
        tokenizer,
        rollout_pool,
        reward_pool,
        fmt=fmt,
        n=n,
        seed=seed,
        max_prompts_per_call=max_prompts_per_call,
        label="eval",
    )
    return result_from_grades(sg, ks_t, seed)


def eval_metrics(result: EvalResult, prefix: str = "eval") -> dict[str, float]:
    """Flat metrics for MetricsLogger: ``<prefix>/pass@k``, ``<prefix>/pass@k_stderr``, lengths, counts."""
    m: dict[str, float] = {}
    for k in result.ks:
        m[f"{prefix}/pass@{k}"] = result.pass_at_k[k]
        m[f"{prefix}/pass@{k}_stderr"] = result.pass_at_k_stderr[k]
    m[f"{prefix}/mean_reward"] = result.mean_reward
    m[f"{prefix}/response_length"] = result.mean_response_length
    m[f"{prefix}/truncated_fraction"] = result.truncated_fraction
    m[f"{prefix}/reward_timeouts"] = result.num_timeouts
    m[f"{prefix}/reward_errors"] = result.num_errors
    m[f"{prefix}/num_problems"] = result.num_problems
    if result.distinct_correct is not None:
        m[f"{prefix}/distinct_correct"] = float(result.distinct_correct.mean())
    return m


def format_table(result: EvalResult, title: str = "") -> str:
    """A small fixed-width table: one line per k, then lengths, distinct answers and grader failures."""
    lines = [title] if title else []
    lines.append(f"{'k':>6}  {'pass@k':>8}  {'± s.e.':>8}")
    for k in result.ks:
        se = result.pass_at_k_stderr[k]
        lines.append(
            f"{k:>6}  {result.pass_at_k[k]:>8.4f}  {se:>8.4f}"
            if math.isfinite(se)
            else f"{k:>6}  {result.pass_at_k[k]:>8.4f}  {'-':>8}"
        )
    extra = [
        f"mean response length {result.mean_response_length:.1f} tokens "
        f"({100 * result.truncated_fraction:.0f}% truncated)"
    ]
    if result.distinct_correct is not None:
        extra.append(f"distinct correct answers/problem {result.mean_distinct_correct:.2f}")
    extra.append(f"reward timeouts {result.num_timeouts}, errors {result.num_errors}, invalid {result.num_invalid}")
    lines.append("; ".join(extra))
    return "\n".join(lines)


# ================================ outputs =============================================================


@dataclass(frozen=True)
class EvalPaths:
    json: Path
    csv: Path
    png: Path


def safe_label(label: str) -> str:
    """``label`` reduced to a file-name-safe stem (letters, digits, ``._-``; others become ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    return stem or "eval"


def plot_pass_at_k(
    curves: Mapping[str, Mapping[int, float]],
    path: str | Path,
    *,
    errors: Mapping[str, Mapping[int, float]] | None = None,
    title: str = "",
) -> Path:
    """Plot pass@k against k (log2 x axis, y in [0, 1]) for one or more labelled curves; write ``path``.

    ``curves``: ``{label: {k: pass@k}}``; ``errors``: optional ``{label: {k: standard error}}`` drawn
    as error bars (NaN/missing entries get none). Every k tick that any curve has is labelled.
    A single curve also gets its values written next to the points. Returns the path (PNG, 150 dpi).
    Raises ValueError when there is no curve or a curve has no points.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers / CI
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("plot_pass_at_k: no curves to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    all_ks: set[int] = set()
    try:
        for label, curve in curves.items():
            if not curve:
                raise ValueError(f"plot_pass_at_k: curve {label!r} has no points")
            ks = sorted(int(k) for k in curve)
            all_ks.update(ks)
            ys = np.array([curve[k] for k in ks], dtype=np.float64)
            err = None
            if errors is not None and label in errors:
                err = np.array([errors[label].get(k, float("nan")) for k in ks], dtype=np.float64)
                err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(ks, ys, yerr=err, marker="o", markersize=4, capsize=3, linewidth=1.6, label=label)
            if len(curves) == 1:
                for k, y in zip(ks, ys):
                    # Below-right of the point: clear of the error bar and of a rising curve.
                    ax.annotate(
                        f"{y:.3f}",
                        (k, y),
                        textcoords="offset points",
                        xytext=(6, -6),
                        ha="left",
                        va="top",
                        fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8),
                    )
        ax.set_xscale("log", base=2)
        ticks = sorted(all_ks)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(k) for k in ticks])
        ax.minorticks_off()
        lo, hi = min(ticks), max(ticks)
        # A little room on both sides of the outermost k (a single k still gets a visible span).
        ax.set_xlim(lo / 1.4, hi * 1.6)
        ax.set_ylim(0.0, 1.05)
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("pass@k")
        ax.grid(True, which="major", alpha=0.35)
        if title:
            ax.set_title(title, fontsize=10)
        ax.legend(loc="lower right", fontsize=8, frameon=True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_eval_outputs(
    result: EvalResult, out_dir: str | Path, label: str, *, config: Mapping[str, Any] | None = None
) -> EvalPaths:
    """Write ``<label>.json`` (``{"label", "config", "result": EvalResult.to_dict()}``), ``<label>.csv``
    (columns k, pass_at_k, stderr; stderr empty when undefined) and ``<label>.png`` (pass@k vs k with
    error bars) under ``out_dir``; ``label`` is made file-name safe. Returns the three paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_label(label)
    paths = EvalPaths(json=out / f"{stem}.json", csv=out / f"{stem}.csv", png=out / f"{stem}.png")
    payload = {"label": label, "config": dict(config) if config is not None else None, "result": result.to_dict()}
    paths.json.write_text(
        json.dumps(payload, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )
    with open(paths.csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["k", "pass_at_k", "stderr"])
        for k in result.ks:
            se = result.pass_at_k_stderr[k]
            w.writerow([k, f"{result.pass_at_k[k]:.6f}", f"{se:.6f}" if math.isfinite(se) else ""])
    title = f"{label}: {result.num_problems} problems, n={int(result.n.max())} samples each"
    plot_pass_at_k({label: result.pass_at_k}, paths.png, errors={label: result.pass_at_k_stderr}, title=title)
    return paths


def _json_default(x: Any) -> Any:
    # Config dicts may carry numpy scalars or paths; anything else is a bug worth seeing.
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


# ================================ evaluation inside a training run ====================================


def eval_output_dir(cfg: RLConfig) -> Path:
    """Where evaluations write their files: ``eval.output_dir``, else ``<run.output_dir>/eval``."""
    return Path(cfg.eval.output_dir or Path(cfg.run.output_dir) / "eval")


def run_evaluation(
    cfg: RLConfig, rows: list[PromptRow], tokenizer, rollout, reward_pool, logger, step: int, label: str
) -> EvalResult:
    """Held-out pass@k of the training rollout engines' current weights, for the training loop.

    Takes from ``cfg.eval``: ``n``, ``k``, ``seed``, ``max_prompts_per_call`` and ``output_dir`` (files
    ``<label>.json|csv|png`` under :func:`eval_output_dir`). The samples come from the training
    engines, so they are drawn at ``rollout.temperature`` / ``rollout.max_tokens``: ``eval.temperature``
    and ``eval.max_tokens`` apply to ``python -m rlsys.eval`` only (logged once when they differ).
    Logs the table and the plot (``eval/plot_<label>``) through ``logger``.
    """
    e = cfg.eval
    _warn_sampling_differs(cfg)
    result = evaluate(
        rows,
        tokenizer,
        rollout,
        reward_pool,
        fmt=PromptFormat.from_config(cfg.data),
        n=e.n,
        ks=list(e.k),
        seed=e.seed,
        max_prompts_per_call=e.max_prompts_per_call,
    )
    paths = write_eval_outputs(result, eval_output_dir(cfg), label)
    log.info("eval [%s]\n%s", label, format_table(result, f"held-out eval at step {step}"))
    logger.log_image(f"eval/plot_{label}", str(paths.png), step=step)
    logger.log_pass_at_k(label, step, result.pass_at_k)
    return result


_warned_sampling: set[tuple[Any, ...]] = set()


def _warn_sampling_differs(cfg: RLConfig) -> None:
    e, r = cfg.eval, cfg.rollout
    key = (e.temperature, e.max_tokens, r.temperature, r.max_tokens)
    if key in _warned_sampling or (e.temperature == r.temperature and e.max_tokens in (None, r.max_tokens)):
        return
    _warned_sampling.add(key)
    log.warning(
        "in-training evaluation samples with the training engines (rollout.temperature=%g, "
        "rollout.max_tokens=%d); eval.temperature=%g / eval.max_tokens=%s apply to python -m rlsys.eval "
        "only",
        r.temperature,
        r.max_tokens,
        e.temperature,
        e.max_tokens,
    )


def plot_training_evals(cfg: RLConfig, evals: Mapping[str, EvalResult], num_problems: int) -> str:
    """The training run's pass@k curves (``{"start": ..., "end": ...}``) in one plot,
    ``pass_at_k_start_vs_end.png`` under :func:`eval_output_dir`; returns its path."""
    return str(
        plot_pass_at_k(
            {f"{name} of training": dict(e.pass_at_k) for name, e in evals.items()},
            eval_output_dir(cfg) / "pass_at_k_start_vs_end.png",
            errors={f"{name} of training": dict(e.pass_at_k_stderr) for name, e in evals.items()},
            title=f"held-out pass@k ({num_problems} problems, n={cfg.eval.n})",
        )
    )


# ================================ the CLI =============================================================


def check_eval_resources(cfg: RLConfig, available: int) -> None:
    """Eval/difficulty start rollout + reward actors only (no learners): check those against the cluster."""
    if cfg.cluster.address is not None:
        return
    need = (
        cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker
        + cfg.reward.num_workers * cfg.reward.num_cpus_per_worker
    )
    if need > available:
        raise ConfigError(
            f"invalid config cluster.num_cpus={available!r}: the rollout and reward workers ask for "
            f"{need:g} CPUs; raise cluster.num_cpus (oversubscribing is fine) or lower "
            "rollout.num_cpus_per_worker / reward.num_cpus_per_worker"
        )


# make_reward_pool, make_rollout_pool, eval_pools: moved to rlsys.build (imported above, so
# ``rlsys.eval.eval_pools`` keeps working); load_eval_rows: moved to rlsys.data.


def model_label(cfg: RLConfig, model_path: str) -> str:
    """A short name for the evaluated model: run.name, else the checkpoint directory's name."""
    return cfg.run.name or Path(model_path).name or "model"


@dataclass(frozen=True)
class EvalRun:
    """What ``python -m rlsys.eval`` produced."""

    result: EvalResult
    paths: EvalPaths
    label: str
    table: str


def run_eval(cfg: RLConfig) -> EvalRun:
    """The eval CLI's work: validate, connect to Ray, start pools, evaluate, write outputs and metrics.

    Shuts down only a Ray cluster it started itself. Raises ConfigError for a bad config before any
    actor starts.
    """
    from rlsys import cluster

    cfg = resolve(cfg)  # absolute paths (actors have another cwd), model.dtype for this hardware
    validate(cfg)  # includes 1 <= k <= eval.n for every eval.k, eval.max_tokens, eval.max_prompts_per_call
    with cluster.session(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.namespace) as cpus:
        check_eval_resources(cfg, cpus)
        return _run_eval(cfg)


def _run_eval(cfg: RLConfig) -> EvalRun:
    from rlsys.metrics import MetricsLogger

    e = cfg.eval
    out_dir = eval_output_dir(cfg)
    model_path = base_model_path(cfg.model)
    label = model_label(cfg, model_path)
    tokenizer = load_tokenizer(cfg.model, model_path)
    rows = load_eval_rows(cfg)
    max_tokens = e.max_tokens or cfg.rollout.max_tokens
    log.info(
        "eval: %d problems x %d samples, k=%s, temperature %g, max_tokens %d; model %s",
        len(rows),
        e.n,
        list(e.k),
        e.temperature,
        max_tokens,
        model_path,
    )

    with eval_pools(cfg, model_path, rows, temperature=e.temperature, max_tokens=max_tokens) as (
        rollout_pool,
        reward_pool,
    ):
        result = evaluate(
            rows,
            tokenizer,
            rollout_pool,
            reward_pool,
            fmt=PromptFormat.from_config(cfg.data),
            n=e.n,
            ks=e.k,
            seed=e.seed,
            max_prompts_per_call=e.max_prompts_per_call,
        )

    config = run_config(cfg)
    config["model_path_resolved"] = model_path
    paths = write_eval_outputs(result, out_dir, label, config=config)
    logger = MetricsLogger(
        out_dir,
        wandb_mode=cfg.logger.wandb_mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        run_name=cfg.run.name or f"eval-{label}",
        group=cfg.run.group,
        tags=cfg.run.tags,
        config=config,
    )
    try:
        logger.log(0, eval_metrics(result))
        logger.log_image("eval/pass_at_k", str(paths.png), step=0)
        logger.log_pass_at_k(label, 0, result.pass_at_k)
    finally:
        logger.close()
    title = (
        f"rlsys eval: {label} | {result.num_problems} problems x {e.n} samples | "
        f"temperature {e.temperature:g}, max_tokens {max_tokens}"
    )
    return EvalRun(result=result, paths=paths, label=label, table=format_table(result, title))


def format_run(run: EvalRun) -> str:
    """What ``python -m rlsys.eval`` prints at the end: the table and where the outputs are."""
    return f"\n{run.table}\n  json: {run.paths.json}\n  csv:  {run.paths.csv}\n  plot: {run.paths.png}"


# Console entry point (``python -m rlsys.eval``); SIGINT / SIGTERM: stop in seconds, exit 130 / 143.
main = hydra_entry("rlsys.eval", run_eval, format_run, phase="eval")


if __name__ == "__main__":
    main()
