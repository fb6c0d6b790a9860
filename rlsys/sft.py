"""Warm start: supervised fine-tuning (SFT) on a built-in task's reference solutions.

``python -m rlsys.sft [overrides...]`` / :func:`warm_start` ``(cfg) -> str`` train the configured
base model (``model.*``, by default the built-in tiny model) on generated reference solutions of
``data.task`` (countdown by default), so that RL starts from a policy with a non-trivial pass@1 and
a higher pass@k. Examples::

    python -m rlsys.sft                              # countdown, tiny model, local Ray
    python -m rlsys.sft sft.steps=300                # a different (separately cached) warm start
    python -m rlsys.sft sft.num_workers=1            # one rank (default: 2 on CPU); same cache key
    python -m rlsys.sft data.task=sort

What it trains on. Prompts are the task's ``train`` split (``sft.num_examples`` rows, generated with
``sft.seed``), chat-templated exactly as the RL driver does (:func:`rlsys.data.encode_prompt`);
the response is ``tokenizer.encode(task.reference_solution(row, rng)) + [EOS]``. Every epoch (one
pass over the shuffled rows) draws FRESH reference solutions from the task's prior: for countdown
that prior is skewed (rank r among a prompt's solutions has probability ~ 1/r^2), so the warm-started
policy prefers the common solution and keeps the rare ones at low probability -- the modes RL can
keep or lose.

Where it trains. On the RL learner itself (:class:`rlsys.workers.learner.LearnerGroup`: DeepSpeed,
same actors, same ZeRO stage and data-parallel layout as ``learner.*``), with no SFT-specific
learner code: an NLL step IS a GRPO ``train_step`` with advantage 1 on every row.
The learner recomputes pi_old with the current weights before the step, so the ratio
``r = exp(log p - log p_old)`` is exactly 1 at the point where the gradient is taken; the PPO
surrogate ``-min(r * A, clip(r) * A)`` with A = 1 then has the gradient ``-grad log p`` per token,
and the token-mean aggregation with the global token count as normalizer makes the step's gradient
exactly that of the mean per-token NLL of the batch. Checked numerically:
``tests/integration/test_sft.py::test_nll_step_has_the_nll_gradient`` compares the learner's
reported (pre-clip) gradient norm with that of ``mean NLL`` computed by plain PyTorch on the same
batch (the measured differences: docs/lab-notes.md#sft), and
the learner's batch NLL (below) equals the reference NLL.

What it logs. The training NLL per token of every step comes for free: the batch is built with
rollout log-probs 0, so the learner's ``rollout_logprob_diff`` metric (mean |log p_old - 0|) is the
batch's NLL before the step. Every ``sft.log_every`` steps, and at the end, the NLL per token of a
fixed held-out batch (train rows with fixed solutions, and ``test``-split rows) is measured with
``compute_logprobs``. Between those points a progress line (the batch NLL, elapsed, ETA; at most one
every 15 s, :mod:`rlsys.progress`) or, on a terminal, a tqdm bar shows how far it got.

Caching. The result is a Hugging Face directory, by default
``<RLSYS_CACHE_DIR or ~/.cache/rlsys>/sft/<key>`` where ``key`` hashes everything that decides the
trained weights (:func:`sft_settings`: base model path and build record, task, the SFT settings,
learner dtype, format version), or ``sft.output_dir``. It is built in a temporary sibling and renamed
into place, with ``sft_report.json`` (settings, key, NLL curve, time, pass@k) written before the
rename, so a directory with a matching report is complete; a second call with the same settings
returns it at once and says so. Concurrent callers with the same key serialise on a lock file and
the later one reuses the first one's result.

Evaluation. After training (``sft.eval_prompts > 0``) the saved model is sampled with vLLM (one
:class:`rlsys.workers.rollout.RolloutPool` worker, ``rollout.*`` settings) ``sft.eval_samples`` times
on ``sft.eval_prompts`` prompts of the ``test`` and ``ood`` splits, graded with the task's
``verify``; the report holds pass@1 / pass@k and, per prompt, the number of distinct correct
canonical answers found vs the number that exist (:meth:`rlsys.tasks.base.Task.solutions`).

Measurements (speed, the NLL curve, pass@k of the defaults, the lr / batch / model-size / dtype
comparisons): docs/lab-notes.md#sft.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from rlsys import signals
from rlsys.build import make_learner_group, make_rollout_pool, sft_learner_spec
from rlsys.cli import hydra_entry
from rlsys.config import ConfigError, RLConfig, resolve, resolve_dtype, validate
from rlsys.data import PromptFormat, encode_prompt
from rlsys.fsutil import file_lock, replace_dir
from rlsys.progress import Progress
from rlsys.records import PromptRow

log = logging.getLogger("rlsys.sft")

# Bump whenever the data pipeline or the training recipe changes what a given config trains:
# cached directories are keyed by it, so stale warm starts are never reused.
FORMAT_VERSION = 1
REPORT_FILE = "sft_report.json"
# Held-out NLL batch: rows of the train split (with one fixed solution each) and of the test split.
HELDOUT_TRAIN_ROWS = 32
HELDOUT_TEST_ROWS = 32
# The warm start teaches the tiny model its answer format on bare task prompts in its own chat template: the
# job's data.system_prompt / prompt_format do not change what it trains (nor, so, its cache key).
SFT_PROMPT_FORMAT = PromptFormat()

__all__ = [
    "FORMAT_VERSION",
    "REPORT_FILE",
    "SFTBatches",
    "default_sft_dir",
    "evaluate_model",
    "sft_cache_key",
    "sft_settings",
    "train_sft",
    "validate_sft",
    "warm_start",
]


# ================================ cache key ==========================================================


def _model_identity(model_path: str) -> dict[str, Any]:
    """What identifies the base model's weights besides its path: the rlsys build record of a
    built tiny model (size, seed, format version), else the config.json text and the weight files'
    sizes and mtimes (a checkpoint rewritten in place gets a new key)."""
    p = Path(model_path)
    from rlsys.models import read_build_record

    rec = read_build_record(p)
    if rec is not None:
        return {"build_record": rec}
    ident: dict[str, Any] = {}
    cfg = p / "config.json"
    if cfg.is_file():
        ident["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    weights = sorted(f for f in p.glob("*.safetensors")) if p.is_dir() else []
    ident["weights"] = [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in weights]
    return ident


def sft_settings(cfg: RLConfig, base_model_path: str) -> dict[str, Any]:
    """Everything that decides the trained weights, as a JSON-able dict (the cache key's input).

    Included: the format version, the base model (absolute path plus :func:`_model_identity`), the
    task, the SFT recipe (steps, batch size, lr, warmup, number of examples, seed, response cap),
    and the optimiser settings taken from ``learner.*`` (weight decay, betas, grad clip)
    and the training dtype. Not included, because they change the result by floating-point rounding
    at most (the learner's gradient is exact for any layout) or only describe it: ``sft.output_dir``,
    ``sft.enabled``, the evaluation and logging settings, ``sft.micro_batch_size``, ``sft.num_workers``,
    ``learner.num_workers`` / ``zero_stage`` / ``micro_batch_size``, cluster, rollout and RL settings
    (so RL runs that differ only in those share one warm start).
    """
    s, lr = cfg.sft, cfg.learner
    return {
        "format_version": FORMAT_VERSION,
        "base_model": str(Path(base_model_path).resolve()),
        "base_model_identity": _model_identity(base_model_path),
        "task": cfg.data.task,
        "steps": s.steps,
        "batch_size": s.batch_size,
        "lr": float(s.lr),
        "warmup_steps": s.warmup_steps,
        "num_examples": s.num_examples,
        "seed": s.seed,
        "dtype": _train_dtype(cfg),
        "max_response_tokens": cfg.sft.max_response_tokens,
        "weight_decay": float(lr.weight_decay),
        "betas": [float(lr.beta1), float(lr.beta2)],
        "grad_clip": float(lr.grad_clip),
    }


def sft_cache_key(settings: dict[str, Any]) -> str:
    """A short, stable hex digest of ``settings`` (canonical JSON: sorted keys, no whitespace).

    Stable across processes and machines (no Python ``hash``); any change of any value changes it.
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_sft_dir(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/sft/<key>``; ``cache_dir`` defaults to ``$RLSYS_CACHE_DIR`` or ``~/.cache/rlsys``."""
    from rlsys.models import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "sft" / key


def _train_dtype(cfg: RLConfig) -> str:
    """``sft.dtype``, else ``model.dtype`` resolved for this hardware (``auto`` -> bf16 or fp32)."""
    return cfg.sft.dtype or resolve_dtype(cfg).model.dtype


def _micro_batch_size(cfg: RLConfig) -> int:
    # Built-in task rows are short (~60 tokens): one micro-batch per rank is fastest and fits easily.
    return cfg.sft.micro_batch_size or -(-cfg.sft.batch_size // cfg.learner.num_workers)


def validate_sft(cfg: RLConfig) -> None:
    """Check the ``sft.*`` values :func:`rlsys.config.validate` does not; raise ConfigError naming the key."""
    s = cfg.sft

    def bad(key: str, why: str) -> None:
        raise ConfigError(f"invalid config sft.{key}={getattr(s, key)!r}: {why}")

    if s.dtype is not None and s.dtype not in ("bfloat16", "float32"):
        bad("dtype", "choose bfloat16 or float32 (or null for model.dtype)")
    for key in ("micro_batch_size", "max_response_tokens", "num_workers"):
        v = getattr(s, key)
        if v is not None and v < 1:
            bad(key, "must be >= 1 (or null for the default)")
    if s.warmup_steps < 0:
        bad("warmup_steps", "must be >= 0")
    if s.log_every < 1:
        bad("log_every", "must be >= 1")
    if s.eval_prompts < 0:
        bad("eval_prompts", "must be >= 0 (0: no evaluation after SFT)")
    if s.eval_samples < 1:
        bad("eval_samples", "must be >= 1")


def read_report(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sft_report.json`` of ``out_dir``, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(out_dir) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, key: str) -> bool:
    rep = read_report(out_dir)
    return rep is not None and rep.get("key") == key and (out_dir / "config.json").is_file()


# ================================ data ===============================================================


class SFTBatches:
    """The SFT data stream: (prompt ids, response ids) batches, deterministic in ``seed``.

    ``rows`` are visited in a fresh seeded permutation every epoch, and each visit draws a fresh
    ``task.reference_solution`` (seeded per epoch), so a prompt's solutions over the epochs follow
    the task's prior. A batch never spans two epochs' permutations in a way that repeats a row
    within the batch (it is filled from the current epoch, then the next one's start).
    """

    def __init__(
        self,
        task,
        rows: list[PromptRow],
        prompt_ids: list[list[int]],
        tokenizer,
        eos_id: int,
        batch_size: int,
        seed: int,
        max_response_tokens: int | None = None,
    ) -> None:
        if not rows:
            raise ValueError("SFT needs at least one training row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task, self.rows, self.prompt_ids = task, rows, prompt_ids
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.batch_size, self.seed, self.max_response_tokens = batch_size, seed, max_response_tokens
        self.epoch = -1
        self._order: list[int] = []
        self._pos = 0
        self._rng = random.Random(0)
        self.num_truncated = 0
        self.longest_response = 0

    def _next_epoch(self) -> None:
        self.epoch += 1
        self._rng = random.Random(f"rlsys.sft/{self.seed}/epoch{self.epoch}")
        self._order = list(range(len(self.rows)))
        self._rng.shuffle(self._order)
        self._pos = 0

    def response_ids(self, row: PromptRow, rng: random.Random) -> list[int]:
        """One reference solution of ``row``, tokenized, plus EOS (cut at ``max_response_tokens`` if set)."""
        text = self.task.reference_solution(row, rng)
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.eos_id]
        if self.max_response_tokens is not None and len(ids) > self.max_response_tokens:
            self.num_truncated += 1
            ids = ids[: self.max_response_tokens]
        self.longest_response = max(self.longest_response, len(ids))
        return ids

    def next_batch(self) -> tuple[list[list[int]], list[list[int]]]:
        prompts: list[list[int]] = []
        responses: list[list[int]] = []
        while len(prompts) < self.batch_size:
            if self._pos >= len(self._order):
                self._next_epoch()
            i = self._order[self._pos]
            self._pos += 1
            prompts.append(self.prompt_ids[i])
            responses.append(self.response_ids(self.rows[i], self._rng))
        return prompts, responses


def _nll_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """A TrainBatch whose GRPO loss is the token-mean NLL: advantage 1 everywhere, rollout log-probs
    0 (so the learner's rollout_logprob_diff metric is the batch NLL), global token-count normalizer."""
    from rlsys.workers.batching import build_train_batch, loss_normalizer_for

    zeros = [np.zeros(len(r), np.float32) for r in responses]
    b = build_train_batch(prompts, responses, zeros, [1.0] * len(prompts), pad_token_id=pad_id, loss_normalizer=1.0)
    return dataclasses.replace(b, loss_normalizer=loss_normalizer_for("token_mean", b.response_mask))


def _nll_per_token(logprobs: np.ndarray, mask: np.ndarray) -> float:
    return float(-(logprobs * mask).sum() / max(1, int(mask.sum())))


# ================================ the public entry point =============================================


def warm_start(cfg: RLConfig) -> str:
    """Return a Hugging Face directory holding ``cfg``'s SFT warm start, training it if needed.

    The directory is ``cfg.sft.output_dir`` or the cache directory of the settings' key (see the
    module docstring); when it already holds a complete result for the same key it is returned
    without training (logged as reused). Otherwise trains on the learner actors of the Ray cluster
    ``cfg.cluster`` describes: an existing ``ray`` connection is reused, else this call starts or
    joins one with :func:`rlsys.cluster.connect` and shuts down only a local cluster it started.

    Raises :class:`ConfigError` for invalid settings (no built-in task, values out of range, an
    ``sft.output_dir`` that holds something else); learner failures propagate as raised by the
    learner group.
    """
    from rlsys.models import base_model_path

    cfg = resolve(cfg)  # absolute paths (actors have another cwd), model.dtype for this hardware
    validate(cfg)
    validate_sft(cfg)
    if cfg.data.task is None:
        raise ConfigError(
            "invalid config data.task=None: SFT warm start generates reference solutions, so it "
            "needs a built-in task (data.task=countdown or sort)"
        )
    from rlsys.tasks import get_task

    try:
        get_task(cfg.data.task)
    except ValueError as e:
        raise ConfigError(f"invalid config data.task={cfg.data.task!r}: {e}") from None
    base = base_model_path(cfg.model)
    settings = sft_settings(cfg, base)
    key = sft_cache_key(settings)
    out = Path(cfg.sft.output_dir).expanduser() if cfg.sft.output_dir else default_sft_dir(key)
    if _is_complete(out, key):
        _log_reuse(out)
        return str(out)
    if out.exists() and not (out.is_dir() and (read_report(out) is not None or not any(out.iterdir()))):
        raise ConfigError(
            f"invalid config sft.output_dir={str(out)!r}: it exists and is not an SFT result "
            f"(no {REPORT_FILE}); point sft.output_dir at a new directory or unset it to use the cache"
        )
    with file_lock(out.parent / f".{out.name}.lock"):
        if _is_complete(out, key):  # another process finished it while we waited
            _log_reuse(out)
            return str(out)
        if out.exists():
            log.info(
                "SFT warm start: %s holds a result for other settings (key %s, now %s); it will be replaced",
                out,
                (read_report(out) or {}).get("key"),
                key,
            )
        else:
            log.info("SFT warm start: training into %s (key %s)", out, key)
        from rlsys import cluster

        started = cluster.connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.namespace)
        try:
            cpus = cluster.available_cpus()
            cfg = with_sft_learners(cfg, cpus)
            _check_resources(cfg, cpus)
            _train_into(cfg, base, settings, key, out)
        finally:
            if started:
                import ray

                ray.shutdown()
    return str(out)


def sft_learner_count(cfg: RLConfig, cluster_cpus: int) -> int:
    """Learner ranks SFT trains on: ``sft.num_workers`` if set; else ``learner.num_workers``, raised to
    2 for CPU-only learners when ``cluster_cpus`` holds two of them (the RL actors do not exist yet
    while SFT runs, so a 2-core machine trains on both cores; same gradient; speed-up: docs/lab-notes.md#sft)."""
    if cfg.sft.num_workers is not None:
        return cfg.sft.num_workers
    lr = cfg.learner
    if lr.num_gpus_per_worker > 0:
        return lr.num_workers
    return max(lr.num_workers, min(2, cluster_cpus // max(1, lr.num_cpus_per_worker)))


def with_sft_learners(cfg: RLConfig, cluster_cpus: int) -> RLConfig:
    """``cfg`` with ``learner.num_workers`` set to :func:`sft_learner_count` (a copy; ``cfg`` is not changed)."""
    n = sft_learner_count(cfg, cluster_cpus)
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_workers=n))


def _check_resources(cfg: RLConfig, cpus: int) -> None:
    """SFT runs the learners, then one rollout worker (never together): each must fit on its own."""
    lr, r = cfg.learner, cfg.rollout
    if lr.num_workers * lr.num_cpus_per_worker > cpus:
        key = "sft.num_workers" if cfg.sft.num_workers is not None else "learner.num_workers"
        raise ConfigError(
            f"invalid config {key}={lr.num_workers}: {lr.num_workers} learners x "
            f"{lr.num_cpus_per_worker} CPUs exceed the {cpus} CPUs of the Ray cluster; lower "
            f"{key} or raise cluster.num_cpus"
        )
    if cfg.sft.eval_prompts > 0 and r.num_cpus_per_worker > cpus:
        raise ConfigError(
            f"invalid config rollout.num_cpus_per_worker={r.num_cpus_per_worker}: more than the "
            f"{cpus} CPUs of the Ray cluster (the SFT evaluation starts one rollout worker)"
        )


def _log_reuse(out: Path) -> None:
    rep = read_report(out) or {}
    ev = rep.get("eval", {}).get("test", {})
    log.info(
        "SFT warm start: reusing %s (trained %s steps in %.0f s; held-out NLL %.3f; test pass@1 %s)",
        out,
        rep.get("steps"),
        rep.get("train_seconds", float("nan")),
        rep.get("final_heldout_nll", {}).get("test", float("nan")),
        f"{ev['pass@1']:.3f}" if "pass@1" in ev else "n/a",
    )


def _train_into(cfg: RLConfig, base: str, settings: dict[str, Any], key: str, out: Path) -> None:
    """Train, evaluate, write the report, and move the result to ``out`` (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.staging-*"):  # a crashed earlier attempt (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        report = train_sft(cfg, base, str(staging))
        report.update(key=key, settings=settings)
        if cfg.sft.eval_prompts > 0:
            t0 = time.perf_counter()
            report["eval"] = evaluate_model(cfg, str(staging))
            report["eval_seconds"] = time.perf_counter() - t0
            _log_eval(report["eval"])
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        os.chmod(staging / REPORT_FILE, 0o644)
        replace_dir(staging, out)  # an explicit sft.output_dir may hold an older SFT result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("SFT warm start: wrote %s", out)


# ================================ training ===========================================================


def train_sft(cfg: RLConfig, base: str, save_dir: str) -> dict[str, Any]:
    """SFT ``base`` on ``cfg.data.task`` with a LearnerGroup on the connected Ray cluster and save the
    result as a Hugging Face directory at ``save_dir``. Returns the report (no evaluation).

    Needs a ``ray`` connection (see :func:`warm_start`, which also handles caching).
    """
    from rlsys.models import load_tokenizer
    from rlsys.tasks import get_task

    s = cfg.sft
    t_start = time.perf_counter()
    assert cfg.data.task is not None  # validate_sft: SFT needs a built-in task
    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(cfg.model, base)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None:
        raise ValueError(f"the tokenizer of {base} has no eos_token; SFT responses must end with it")
    pad_id = eos_id if pad_id is None else pad_id
    rows = task.generate("train", s.num_examples, seed=s.seed)
    stream = SFTBatches(
        task,
        rows,
        [encode_prompt(tokenizer, r, SFT_PROMPT_FORMAT) for r in rows],
        tokenizer,
        eos_id,
        s.batch_size,
        s.seed,
        s.max_response_tokens,
    )

    # Fixed held-out batch: the first train rows (solutions drawn once, with their own seed) and
    # test-split rows the model never trains on.
    held_rng = random.Random(f"rlsys.sft/{s.seed}/heldout")
    held_rows = {"train": rows[:HELDOUT_TRAIN_ROWS], "test": task.generate("test", HELDOUT_TEST_ROWS, seed=s.seed)}
    held = {
        name: _nll_batch(
            [encode_prompt(tokenizer, r, SFT_PROMPT_FORMAT) for r in rs],
            [stream.response_ids(r, held_rng) for r in rs],
            pad_id,
        )
        for name, rs in held_rows.items()
    }

    # The NLL as a GRPO step with every RL term off (rlsys.build.sft_learner_spec, the module docstring).
    spec = sft_learner_spec(cfg, base, dtype=_train_dtype(cfg), micro_batch_size=_micro_batch_size(cfg))
    t0 = time.perf_counter()
    learners = make_learner_group(cfg, spec)
    init_seconds = time.perf_counter() - t0
    log.info(
        "SFT: %d %s examples, %d steps x %d rows, lr %g (warmup %d), %s, %d learner(s) up in %.1f s",
        len(rows),
        cfg.data.task,
        s.steps,
        s.batch_size,
        s.lr,
        s.warmup_steps,
        spec.dtype,
        cfg.learner.num_workers,
        init_seconds,
    )

    def heldout() -> dict[str, float]:
        return {name: _nll_per_token(learners.compute_logprobs(b, pad_id), b.response_mask) for name, b in held.items()}

    curve: list[dict[str, Any]] = []
    train_nll: list[float] = []
    max_ratio_dev = 0.0
    skipped = 0
    step_seconds = old_seconds = 0.0
    progress: Progress | None = None
    try:
        first = heldout()
        curve.append({"step": 0, **first})
        log.info("SFT step 0: held-out NLL/token train %.3f test %.3f", first["train"], first["test"])
        t_train = time.perf_counter()
        # Between the log_every points a line with the ETA about every 15 s (RLSYS_PROGRESS_INTERVAL_S),
        # without extra held-out evaluations; a bar instead when stderr is a terminal.
        progress = Progress(s.steps, "SFT step", logger=log)
        for step in range(1, s.steps + 1):
            signals.set_phase("sft", step=step, total_steps=s.steps)  # named by the stop line on Ctrl-C
            batch = _nll_batch(*stream.next_batch(), pad_id)
            st = learners.train_step(learners.shard(batch, pad_id))
            skipped += int(st.skipped)
            step_seconds += st.seconds
            old_seconds += st.old_logprob_seconds or 0.0
            train_nll.append(st.rollout_logprob_diff)  # = batch NLL/token before the step (log-probs 0)
            max_ratio_dev = max(
                max_ratio_dev, abs(st.ratio_max - 1.0), abs((st.ratio_min if st.ratio_min is not None else 1.0) - 1.0)
            )
            if step % s.log_every == 0 or step == s.steps:
                h = heldout()
                recent = float(np.mean(train_nll[-s.log_every :]))
                curve.append({"step": step, "train_batch": recent, **h})
                progress.update(
                    step,
                    f"batch NLL/token {recent:.3f} (mean of {len(train_nll[-s.log_every :])}) | "
                    f"held-out train {h['train']:.3f} test {h['test']:.3f} | "
                    f"grad-norm {st.grad_norm:.2f} lr {st.lr:.2e}",
                    emit=True,
                )
            else:
                progress.update(step, f"batch NLL/token {st.rollout_logprob_diff:.3f}")
        progress.close()
        train_seconds = time.perf_counter() - t_train
        if max_ratio_dev > 1e-3:
            # pi_old is recomputed on the same weights, so the ratio should be 1 to float precision;
            # if not, the steps were not plain NLL steps (the PPO clip may have cut gradients).
            log.warning(
                "SFT: the PPO ratio strayed %.2e from 1 (nondeterministic forward?); the updates were "
                "not exact NLL steps",
                max_ratio_dev,
            )
        if stream.longest_response > cfg.rollout.max_tokens:
            # RL would cut such responses before their answer: the task's solutions do not fit.
            log.warning(
                "SFT: reference responses of up to %d tokens (EOS included) exceed rollout.max_tokens=%d; "
                "raise rollout.max_tokens for RL",
                stream.longest_response,
                cfg.rollout.max_tokens,
            )
        learners.save_hf(save_dir)
    finally:
        if progress is not None:
            progress.close()  # the bar, if any, before the shutdown's output
        learners.shutdown()
    final = curve[-1]
    return {
        "format_version": FORMAT_VERSION,
        "base_model": base,
        "task": cfg.data.task,
        "steps": s.steps,
        "epochs": s.steps * s.batch_size / len(rows),
        "skipped_steps": skipped,
        "truncated_responses": stream.num_truncated,
        "longest_response_tokens": stream.longest_response,
        "final_heldout_nll": {"train": final["train"], "test": final["test"]},
        "initial_heldout_nll": {"train": curve[0]["train"], "test": curve[0]["test"]},
        "final_train_batch_nll": float(np.mean(train_nll[-s.log_every :])),
        "nll_curve": curve,
        "max_ratio_deviation": max_ratio_dev,
        "learner_init_seconds": init_seconds,
        "train_seconds": train_seconds,
        # Share of the learner's step time spent recomputing pi_old (the price of the NLL-as-GRPO trick).
        "old_logprob_fraction": old_seconds / step_seconds if step_seconds > 0 else 0.0,
        "total_seconds": time.perf_counter() - t_start,
        "dtype": spec.dtype,
        "zero_stage": spec.zero_stage,
        "num_learners": cfg.learner.num_workers,
    }


# ================================ evaluation =========================================================


def evaluate_model(cfg: RLConfig, model_dir: str, splits: tuple[str, ...] = ("test", "ood")) -> dict[str, Any]:
    """Sample ``model_dir`` with one vLLM rollout worker and grade with the task's verifier.

    Per split: ``sft.eval_prompts`` prompts generated with ``sft.seed``, ``sft.eval_samples`` samples
    each at ``rollout.temperature`` / ``rollout.max_tokens``. Returns, per split, ``pass@k`` for
    k in {1, 2, 4, 8, 16, 32, 64} up to the sample count (unbiased estimator, :func:`rlsys.algo.pass_at_k`),
    ``distinct_correct_mean`` (distinct correct canonical answers found per prompt),
    ``solutions_mean`` (how many exist per prompt), ``distinct_fraction_mean`` (their ratio,
    averaged over prompts), ``format_rate`` (samples with an ``Answer:`` line and EOS), and a few
    decoded samples. Needs a ``ray`` connection.
    """
    from rlsys.algo import pass_at_k
    from rlsys.models import load_tokenizer
    from rlsys.records import RolloutRequest
    from rlsys.tasks import get_task

    s = cfg.sft
    assert cfg.data.task is not None  # validate_sft: SFT needs a built-in task
    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(cfg.model, model_dir)
    n = s.eval_samples
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    pool = make_rollout_pool(cfg, model_dir, num_workers=1, seed=s.seed)
    results: dict[str, Any] = {}
    progress = Progress(
        len(splits) * s.eval_prompts,
        "SFT eval: sampled",
        unit="prompt",
        bar=False,
        logger=log,
        counts_fmt="{done}/{total} prompts x " + str(n) + " ({pct}%)",
    )
    try:
        for split in splits:
            rows = task.generate(split, s.eval_prompts, seed=s.seed)
            reqs = [RolloutRequest(r.prompt_id, tuple(encode_prompt(tokenizer, r, SFT_PROMPT_FORMAT))) for r in rows]
            seeds = {r.prompt_id: (s.seed * 1_000_003 + i) % (2**31) for i, r in enumerate(rows)}
            log.info("SFT eval: sampling %d %s prompts x %d", len(rows), split, n)
            groups, _ = pool.generate(reqs, n, seeds)
            progress.advance(len(rows), split, emit=True)
            correct, distinct, n_sol, formatted = [], [], [], 0
            samples: list[dict[str, Any]] = []
            for row, g in zip(rows, groups):
                canon = [task.canonical_answer(c.text, row.answer) for c in g.completions]
                correct.append(sum(c is not None for c in canon))
                distinct.append(len({c for c in canon if c is not None}))
                n_sol.append(len(task.solutions(row)))
                formatted += sum(("Answer:" in c.text and c.finish_reason == "stop") for c in g.completions)
                if len(samples) < 4:
                    samples.append(
                        {
                            "prompt": row.messages[-1][1],
                            "completion": g.completions[0].text,
                            "correct": canon[0] is not None,
                        }
                    )
            c_arr, d_arr, s_arr = np.array(correct), np.array(distinct), np.array(n_sol)
            res: dict[str, Any] = {f"pass@{k}": float(np.mean(pass_at_k(n, c_arr, k))) for k in ks}
            res.update(
                num_prompts=len(rows),
                samples_per_prompt=n,
                distinct_correct_mean=float(d_arr.mean()),
                solutions_mean=float(s_arr.mean()),
                distinct_fraction_mean=float(np.mean(d_arr / np.maximum(s_arr, 1))),
                prompts_with_2plus_distinct=float(np.mean(d_arr >= 2)),
                format_rate=formatted / (n * len(rows)),
                samples=samples,
            )
            results[split] = res
    finally:
        pool.shutdown()
    return results


def _pass_at_k_text(r: dict[str, Any]) -> str:
    ks = sorted((int(k.split("@")[1]), v) for k, v in r.items() if k.startswith("pass@"))
    return " ".join(f"pass@{k} {v:.3f}" for k, v in ks)


def _log_eval(ev: dict[str, Any]) -> None:
    for split, r in ev.items():
        ks = _pass_at_k_text(r)
        log.info(
            "SFT eval %s (%d prompts x %d): %s | distinct correct/prompt %.2f of %.2f existing | format %.2f",
            split,
            r["num_prompts"],
            r["samples_per_prompt"],
            ks,
            r["distinct_correct_mean"],
            r["solutions_mean"],
            r["format_rate"],
        )


# ================================ CLI ================================================================


def _timed_warm_start(cfg: RLConfig) -> tuple[str, float]:
    signals.status.phase = "sft"
    t0 = time.perf_counter()
    return warm_start(cfg), time.perf_counter() - t0


def format_warm_start(result: tuple[str, float]) -> str:
    """What ``python -m rlsys.sft`` prints: where the warm start is, its NLL and its evaluation."""
    path, seconds = result
    rep = read_report(path) or {}
    lines = [
        f"\nrlsys: SFT warm start ready in {seconds:.1f} s: {path}",
        f"  trained {rep.get('steps')} steps in {rep.get('train_seconds', float('nan')):.0f} s; held-out "
        f"NLL/token {rep['initial_heldout_nll']['test']:.3f} -> {rep['final_heldout_nll']['test']:.3f} (test)",
    ]
    ev = rep.get("eval", {})
    for split in sorted(ev, key=lambda x: (x != "test", x)):
        r = ev[split]
        lines.append(
            f"  {split:5s} {_pass_at_k_text(r)}  distinct correct/prompt {r['distinct_correct_mean']:.2f} "
            f"of {r['solutions_mean']:.2f}"
        )
    lines.append(f"  report: {Path(path) / REPORT_FILE}")
    return "\n".join(lines)


# ``python -m rlsys.sft [overrides...]``: train (or reuse) the warm start, print where it is.
# SIGINT / SIGTERM: stop in seconds, exit 130 / 143.
main = hydra_entry("rlsys.sft", _timed_warm_start, format_warm_start)


if __name__ == "__main__":
    main()
