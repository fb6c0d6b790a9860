"""The F-GRPO training loop, top to bottom.

    prompts -> generate (vLLM rollout workers) -> score (reward pool) -> group advantages with the
    focal weight (rlsys.algo, on [B, G] tensors here in the driver) -> train (DeepSpeed learners)
    -> sync weights to the rollout workers (and check them) -> log -> checkpoint

Each phase is timed (``time/<phase>``). Every remote call has a timeout and errors name the phase
and the actor. B = prompts per step, G = group size.

This module is the loop only. Its actors come from :func:`rlsys.build.start_actors` (the one place
config becomes objects) or are injected: :func:`train` runs on any :class:`~rlsys.build.Actors`
whose handles satisfy the Protocols of :mod:`rlsys.workers` (tests/unit/test_driver.py runs it on
in-process fakes). Phases hand each other records (:class:`StepGroups`, ``TrainStats``), and all the
loop carries from one step to the next, and through a checkpoint, is one :class:`LoopState`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsys import algo, build, cluster, signals
from rlsys import checkpoint as ckpt
from rlsys.build import Actors
from rlsys.config import (
    ConfigError,
    RLConfig,
    TrainerConfig,
    local_cluster_cpus,
    resolve,
    run_config,
    sync_bucket_bytes,
    sync_logprob_bound,
    validate,
)
from rlsys.data import PromptFormat, encode_prompt, load_eval_rows, load_train_rows, probe_tokens
from rlsys.eval import EvalResult, eval_metrics, plot_training_evals, run_evaluation
from rlsys.metrics import UPDATES_FILE, MetricsLogger
from rlsys.models import base_model_path, load_tokenizer
from rlsys.prefetch import Prefetcher
from rlsys.progress import Progress
from rlsys.records import (
    GRADE_STATUSES,
    Completion,
    Grade,
    GradeRequest,
    PromptRow,
    RolloutGroup,
    RolloutRequest,
    TrainBatch,
    TrainStats,
)
from rlsys.sampler import PromptSampler, sample_seed
from rlsys.workers import LearnerGroupLike, RewardGroupLike, RolloutGroupLike
from rlsys.workers.learner import LearnerError
from rlsys.workers.vllm_engine import GenerationStats
from rlsys.workers.weight_path import ObjectStorePath

log = logging.getLogger("rlsys.driver")


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports (and the quickstart prints)."""

    output_dir: str
    checkpoint: str
    steps: int
    first_reward: float  # mean train reward of the first / last step
    last_reward: float
    metrics_path: str
    eval_before: dict[int, float]  # held-out pass@k of the starting policy ({} when not evaluated)
    eval_after: dict[int, float]
    eval_plot: str = ""


@dataclass(frozen=True)
class RunInputs:
    """What the loop needs besides its actors, prepared before any actor starts."""

    resume: Path | None  # the checkpoint this run continues from; None: a fresh run
    saved: ckpt.DriverState | None  # that checkpoint's driver state
    model_path: str  # the policy a fresh run starts from
    tokenizer: Any  # the policy's Hugging Face tokenizer
    rows: list[PromptRow]  # the training prompts
    fmt: PromptFormat  # how prompts become tokens (data.prompt_format and friends)
    requests: dict[str, RolloutRequest]  # prompt id -> its rendered, tokenized prompt
    inflight: dict[int, StepGroups]  # off-policy modes: batches the checkpoint kept, by step ({}: none)


@dataclass(frozen=True)
class StepGroups:
    """What one step's generate and grade phases produced: the B' <= B groups it trains on.

    With DAPO dynamic sampling these are the mixed groups kept over every round (or, when no round
    produced one, the first round's groups); ``grades`` and ``gen_stats`` cover every round.
    """

    rows: list[PromptRow]  # [B'] the prompts of ``groups``, in the same order
    groups: list[RolloutGroup]  # [B']
    rewards: torch.Tensor  # [B', G] float32
    correct: torch.Tensor  # [B', G] bool, the verifier's success flag
    grades: list[Grade]  # every grade of every round (for the per-status counts)
    gen_stats: list[GenerationStats]  # one per busy rollout worker per round
    refill: dict[str, float]  # algo/sampling_rounds, algo/filtered_groups
    reward_seconds: float  # grading wall time over all rounds (time/reward)
    collect_seconds: float = 0.0  # wall time of the whole generate-and-grade phase (all rounds)


# The records a checkpoint's in-flight batches are made of (rlsys.checkpoint.load_inflight refuses others).
INFLIGHT_TYPES = (StepGroups, PromptRow, RolloutGroup, Completion, Grade, GenerationStats)


@dataclass
class LoopState:
    """Everything the loop carries from one step to the next; saved (as a ``DriverState``) with
    every checkpoint and restored from it. Driver-local, hence mutable; never sent to an actor."""

    next_step: int  # the step the loop runs next (1-based)
    weight_version: int  # version of the weights the rollout engines hold (0: the initial ones)
    skipped_in_a_row: int  # consecutive steps the learners skipped for a non-finite loss or gradient
    first_reward: float  # mean train reward of step 1 (nan until it ran)
    last_reward: float  # mean train reward of the latest step this process ran (nan until one did)
    checkpoint: str  # the newest complete checkpoint ("": none yet)
    eval_before: dict[int, float]  # held-out pass@k of the starting policy ({} when not evaluated)
    resumed: bool  # continued from a checkpoint: the starting policy is not evaluated again
    evals: dict[str, EvalResult] = field(default_factory=dict)  # "start" / "end" of this process

    @classmethod
    def restore(cls, saved: ckpt.DriverState | None, checkpoint: Path | None) -> LoopState:
        """The state after ``saved``'s step (a fresh run's first state when ``saved`` is None)."""
        if saved is None:
            return cls(
                next_step=1,
                weight_version=0,
                skipped_in_a_row=0,
                first_reward=float("nan"),
                last_reward=float("nan"),
                checkpoint="",
                eval_before={},
                resumed=False,
            )
        return cls(
            next_step=saved.step + 1,
            weight_version=saved.weight_version,
            skipped_in_a_row=saved.skipped_in_a_row,
            first_reward=saved.first_reward,
            last_reward=float("nan"),
            checkpoint=str(checkpoint),
            eval_before=dict(saved.eval_before),
            resumed=True,
        )

    def finish_step(self, step: int, reward: float) -> None:
        """Step ``step`` is logged, with mean train reward ``reward``."""
        self.last_reward = reward
        if step == 1:
            self.first_reward = reward
        self.next_step = step + 1

    def driver_state(self, sampler: PromptSampler, wandb_run_id: str | None, dtype: str) -> ckpt.DriverState:
        """What a checkpoint taken now (after step ``next_step - 1``) records for the driver."""
        return ckpt.DriverState(
            step=self.next_step - 1,
            sampler=sampler.state(),
            weight_version=self.weight_version,
            wandb_run_id=wandb_run_id,
            skipped_in_a_row=self.skipped_in_a_row,
            first_reward=self.first_reward,
            eval_before=self.eval_before,
            dtype=dtype,
        )


@contextmanager
def timed(times: dict[str, float], phase: str) -> Iterator[None]:
    """``time/<phase>``: wall seconds; ``cpu/<phase>``: the fraction of this machine's cores busy
    meanwhile (all processes; on a local cluster that is the job's actors; nan without /proc/stat)."""
    from rlsys.hardware import cpu_times, utilisation

    signals.set_phase(phase)  # named by the stop line if a signal arrives now
    t0, c0 = time.perf_counter(), cpu_times()
    try:
        yield
    finally:
        times[f"time/{phase}"] = time.perf_counter() - t0
        times[f"cpu/{phase}"] = utilisation(c0, cpu_times())


def train(cfg: RLConfig, actors: Actors | None = None) -> RunSummary:
    """Run one F-GRPO job.

    ``actors`` None: start them on the Ray cluster ``cfg.cluster`` describes (rlsys.build) and shut
    them down at the end, also on an error. Given: run on them as they are (any handles satisfying
    the Protocols of rlsys.workers, e.g. in-process fakes); no cluster is joined, and they are not
    shut down: the caller owns them.
    """
    cfg = resolve(cfg)  # absolute paths (actors have another cwd), model.dtype for this hardware
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg)  # values only; resources are checked once the cluster is known
    signals.set_phase("start-up", total_steps=cfg.trainer.total_steps)
    if actors is not None:
        return _train(cfg, out_dir, actors)
    with cluster.session(cfg.cluster.address, local_cluster_cpus(cfg), cfg.cluster.namespace) as cpus:
        validate(cfg, available_cpus=cpus)
        return _train(cfg, out_dir, None)


def _train(cfg: RLConfig, out_dir: Path, injected: Actors | None) -> RunSummary:
    a, t = cfg.algo, cfg.trainer
    run = prepare(cfg, out_dir)
    logger: MetricsLogger | None = None
    try:
        with actors_for(cfg, run, out_dir, injected) as actors, ExitStack() as stack:
            logger = open_metrics(cfg, out_dir, run)
            state = LoopState.restore(run.saved, run.resume)
            sampler = PromptSampler(len(run.rows), seed=t.seed, state=run.saved.sampler if run.saved else None)
            probe = probe_tokens(run.tokenizer, run.rows[0], run.fmt)
            pad = run.tokenizer.pad_token_id
            eval_rows = load_eval_rows(cfg) if (t.eval_at_start_end or t.eval_every) else []
            if t.eval_at_start_end and not state.resumed:
                evaluate_start(cfg, state, eval_rows, run.tokenizer, actors, logger)

            progress = Progress(t.total_steps, "step", initial=state.next_step - 1, bar=False, logger=log)
            bound = staleness_bound(t)
            source = stack.enter_context(batch_source(cfg, state.next_step, run, sampler, actors, bound, run.inflight))
            for step in range(state.next_step, t.total_steps + 1):
                signals.status.step = step
                times: dict[str, float] = {}
                step_t0 = time.perf_counter()

                # ---- 1. generate and grade: G completions per prompt (DAPO: keep mixed groups, refill);
                # off-policy modes: take the batch generated while earlier steps trained
                with timed(times, "rollout" if t.mode == "sync" else "wait_rollout"):
                    groups = source(step, times)
                times["time/reward"] = groups.reward_seconds
                groups, staleness = drop_stale(groups, state.weight_version, bound, step)

                # ---- 2. advantages with the focal weight, on [B, G] ----------------------------------
                adv, gstats = algo.group_advantages(
                    groups.rewards,
                    gamma=a.gamma,
                    std_normalize=a.std_normalize,
                    eps=a.adv_eps,
                    success_threshold=a.success_threshold,
                    correct=groups.correct,
                    estimator=a.advantage,
                    std=a.std,
                    std_scope=a.std_scope,
                )

                # ---- 3. train: trainer.mini_batches x trainer.epochs optimizer steps -----------------
                # (under the rollout group's weights lock: an engine replaced meanwhile on the prefetch
                # thread gets the weights before or after this phase, labelled with their version)
                with timed(times, "train"), actors.rollout.weights_lock:
                    updates = train_phase(
                        cfg,
                        actors.learners,
                        make_train_batch(groups.groups, adv, pad, a.agg),
                        pad,
                        step,
                        times,
                        state.checkpoint,
                        out_dir,
                    )
                    if actors.weights is not None:
                        actors.weights.trained(state.weight_version + 1)
                tstats = TrainStats.combine(updates)
                state.skipped_in_a_row = state.skipped_in_a_row + 1 if tstats.skipped else 0
                check_diverged(t, step, state)

                # ---- 4. sync weights to every rollout worker, then check them ------------------------
                source.before_push(step, t.total_steps, times)
                with timed(times, "sync"):
                    state.weight_version += 1
                    logprob_diff = sync_weights(cfg, actors, state.weight_version, probe)

                # ---- 5. log (and evaluate every trainer.eval_every steps) ----------------------------
                times["time/step"] = time.perf_counter() - step_t0
                metrics = collect_metrics(
                    cfg, groups, gstats, tstats, times, logprob_diff, state.weight_version, actors
                )
                metrics.update(staleness)
                maybe_evaluate(cfg, step, metrics, state, eval_rows, run.tokenizer, actors, logger)
                logger.log(step, metrics)
                logger.log_updates(step, [u.update_row() for u in updates])
                # W&B only: the distributions behind algo/success_rate_mean and algo/focal_weight_*.
                logger.log_histograms(
                    step,
                    {
                        "algo/group_success_rate": (gstats.success_rate.tolist(), a.group_size + 1),
                        "algo/group_focal_weight": (gstats.focal_weight.tolist(), 20),
                    },
                )
                state.finish_step(step, metrics["reward/mean"])
                log_step(step, t.total_steps, metrics, progress)
                log_samples(run.tokenizer, groups.rows, groups.groups, groups.rewards, t.log_samples, step, logger)

                # ---- 6. checkpoint -------------------------------------------------------------------
                if checkpoint_due(t, step):
                    signals.set_phase("checkpoint")
                    # Off-policy modes: wait for the batches in flight and keep them with the checkpoint,
                    # so a resumed run trains on exactly them (the sampler state then covers them too).
                    inflight = source.settle() if step < t.total_steps else {}
                    state.checkpoint = save_checkpoint(
                        actors.learners,
                        out_dir,
                        state.driver_state(sampler, logger.run_id, cfg.model.dtype),
                        t.keep_checkpoints,
                        inflight,
                    )
                    log.info("step %d: checkpoint %s", step, state.checkpoint)
    finally:
        # After the actors (actors_for): on a stop (rlsys.signals) they are killed at once, so nothing
        # writes into the checkpoint being removed; the metrics logger closes last.
        if logger is not None:
            logger.close()
    return summarize(cfg, out_dir, state, eval_rows)


# ================================ set-up ===============================================================


def prepare(cfg: RLConfig, out_dir: Path) -> RunInputs:
    """Find the resume point, the policy, its tokenizer and the training prompts (no actor yet)."""
    resume = find_resume_point(cfg, out_dir)
    model_path = policy_model_path(cfg)
    saved = ckpt.load_driver_state(resume) if resume else None
    if resume and saved and saved.dtype and saved.dtype != cfg.model.dtype:
        # The optimizer state is kept in the run's dtype; another CPU kind may resolve auto differently.
        raise ConfigError(
            f"invalid config model.dtype={cfg.model.dtype!r}: the run in {out_dir} was trained in "
            f"{saved.dtype} ({resume.name}); resume it with model.dtype={saved.dtype}"
        )
    tokenizer = load_tokenizer(cfg.model, model_path)
    rows = load_train_rows(cfg)
    if len(rows) < cfg.trainer.prompts_per_step:
        raise ValueError(
            f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} exceeds the {len(rows)} training prompts"
        )
    fmt = PromptFormat.from_config(cfg.data)
    requests = {r.prompt_id: RolloutRequest(r.prompt_id, tuple(encode_prompt(tokenizer, r, fmt))) for r in rows}
    log.info("%d training prompts; model %s", len(rows), model_path)
    log_prompt_once(tokenizer, rows[0], requests[rows[0].prompt_id].prompt_token_ids, fmt)
    inflight: dict[int, StepGroups] = ckpt.load_inflight(resume, INFLIGHT_TYPES) if resume else {}
    if inflight and cfg.trainer.mode == "sync":
        raise ConfigError(
            f"invalid config trainer.mode=sync: the run in {out_dir} was checkpointed in an off-policy mode "
            f"with {len(inflight)} generated batches not yet trained on ({resume}); resume it in the mode it ran in"
        )
    return RunInputs(
        resume=resume,
        saved=saved,
        model_path=model_path,
        tokenizer=tokenizer,
        rows=rows,
        fmt=fmt,
        requests=requests,
        inflight=inflight,
    )


def log_prompt_once(tokenizer: Any, row: PromptRow, ids: tuple[int, ...], fmt: PromptFormat) -> None:
    """Log the first training prompt exactly as the policy sees it: its token ids decoded with every special
    token kept, so a wrong template, a missing system prompt or a doubled BOS shows in the run's log."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    log.info(
        "the prompt as the model sees it (%s, %d tokens, data.prompt_format=%s):\n%s",
        row.prompt_id,
        len(ids),
        fmt.style,
        text,
    )


@contextmanager
def actors_for(cfg: RLConfig, run: RunInputs, out_dir: Path, injected: Actors | None) -> Iterator[Actors]:
    """The run's actors: ``injected`` as they are (their owner shuts them down; when resuming they
    must already hold the checkpoint's state), else started by :func:`rlsys.build.start_actors`
    and shut down on the way out, also when start-up or the loop fails."""
    verifiers = sorted({r.verifier for r in run.rows})
    with ExitStack() as stack:
        if injected is None:
            actors = stack.enter_context(
                build.start_actors(
                    cfg,
                    run.model_path,
                    run.resume,
                    out_dir,
                    verifiers=verifiers,
                    weight_version=run.saved.weight_version if run.saved else 0,
                )
            )
        else:
            actors = injected
            actors.reward.validate_specs(verifiers)
        try:
            yield actors
        finally:
            # The stop line names the phase a stop hit; otherwise the run is now shutting down.
            if not signals.stopping():
                signals.set_phase("shut-down")


def open_metrics(cfg: RLConfig, out_dir: Path, run: RunInputs) -> MetricsLogger:
    """The run's metrics sink; a resumed run first drops the rows written after its checkpoint."""
    saved = run.saved
    if saved:
        dropped = ckpt.truncate_metrics(out_dir / "metrics.jsonl", saved.step)
        ckpt.truncate_metrics(out_dir / UPDATES_FILE, saved.step)
        log.info(
            "resuming from %s (step %d, weight version %d); dropped %d metrics rows written after it",
            run.resume,
            saved.step,
            saved.weight_version,
            dropped,
        )
    return MetricsLogger(
        out_dir,
        wandb_mode=cfg.logger.wandb_mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        run_name=cfg.run.name or f"{cfg.algo.name}-{out_dir.name}",
        group=cfg.run.group,
        tags=cfg.run.tags,
        config=run_config(cfg),
        run_id=saved.wandb_run_id if saved else None,
    )


def find_resume_point(cfg: RLConfig, out_dir: Path) -> Path | None:
    """run.resume=auto: the newest complete checkpoint in run.output_dir (None: start fresh).
    run.resume=never refuses a directory that already holds checkpoints rather than mix two runs."""
    newest = ckpt.latest(out_dir)
    if cfg.run.resume == "auto":
        if newest is None:
            log.info("run.resume=auto: no complete checkpoint in %s, starting fresh", out_dir)
        return newest
    if newest is not None:
        raise ConfigError(
            f"invalid config run.output_dir={str(out_dir)!r}: it already holds checkpoints "
            f"({newest.name}); continue that run with run.resume=auto or choose a new output dir"
        )
    return None


def policy_model_path(cfg: RLConfig) -> str:
    """The policy RL starts from: ``model.path`` or ``model.builtin`` (a pretrained model) if set; else, for
    a built-in task with ``sft.enabled``, the SFT warm start of the built-in tiny model (trained once, then
    cached); else the randomly initialised tiny model."""
    tiny = cfg.model.path is None and cfg.model.builtin is None
    if tiny and cfg.sft.enabled and cfg.data.task is not None:
        from rlsys.sft import warm_start  # sft imports the learner stack; only this case needs it

        return warm_start(cfg)
    return base_model_path(cfg.model)


# ================================ phases ==============================================================


def collect_groups(
    cfg: RLConfig,
    step: int,
    rows: list[PromptRow],
    requests: dict[str, RolloutRequest],
    sampler: PromptSampler,
    rollout: RolloutGroupLike,
    reward: RewardGroupLike,
    announce: bool = True,
) -> StepGroups:
    """Generate and grade B groups. With dynamic sampling, keep only mixed groups and refill from
    fresh prompts for up to ``algo.max_refill_rounds`` extra rounds; train on what was kept (never
    crash when too few survive: if none does, the first round's groups are used and it is logged).
    ``announce``: name the sub-phases for the stop line (not from the prefetch thread, where the
    loop's own phase is the one that matters)."""
    a, b = cfg.algo, cfg.trainer.prompts_per_step
    t_start = time.perf_counter()
    phase = signals.set_phase if announce else (lambda name: None)
    kept_rows: list[PromptRow] = []
    kept_groups: list[RolloutGroup] = []
    kept_rewards: list[np.ndarray] = []
    kept_correct: list[np.ndarray] = []
    all_grades: list[Grade] = []
    gen_stats: list[GenerationStats] = []
    reward_seconds = 0.0
    rounds = 0
    filtered = 0
    fallback = None
    while len(kept_groups) < b:
        want = b - len(kept_groups)
        idx = sampler.take(want)
        chosen = [rows[i] for i in idx]
        seeds = {r.prompt_id: sample_seed(cfg.trainer.seed, step, r.prompt_id, rounds) for r in chosen}
        phase("generate")
        groups, st = rollout.generate([requests[r.prompt_id] for r in chosen], a.group_size, seeds)
        gen_stats.extend(st)
        t0 = time.perf_counter()
        phase("grade")
        grades = reward.grade(
            [
                GradeRequest(g.prompt_id, j, c.text, r.answer, r.verifier)
                for r, g in zip(chosen, groups)
                for j, c in enumerate(g.completions)
            ]
        )
        reward_seconds += time.perf_counter() - t0
        all_grades.extend(grades)
        rew = np.array([gr.reward for gr in grades], dtype=np.float32).reshape(len(groups), a.group_size)
        cor = np.array([gr.correct for gr in grades], dtype=bool).reshape(len(groups), a.group_size)
        if a.dynamic_sampling:
            keep = algo.dynamic_sampling_mask(torch.from_numpy(rew), correct=torch.from_numpy(cor)).numpy()
            filtered += int((~keep).sum())
            if fallback is None:
                fallback = (chosen, groups, rew, cor)
        else:
            keep = np.ones(len(groups), dtype=bool)
        for i in np.flatnonzero(keep):
            kept_rows.append(chosen[i])
            kept_groups.append(groups[i])
            kept_rewards.append(rew[i])
            kept_correct.append(cor[i])
        rounds += 1
        if rounds > a.max_refill_rounds and len(kept_groups) < b:
            log.warning(
                "step %d: dynamic sampling kept %d of %d groups after %d rounds; training on those",
                step,
                len(kept_groups),
                b,
                rounds,
            )
            break
    if not kept_groups:
        # Nothing mixed at all: train on the first round (its advantages are all zero, so the
        # update is a no-op apart from optional KL/entropy terms) rather than crash.
        log.warning("step %d: no mixed group in %d rounds; this step carries no policy-gradient signal", step, rounds)
        assert fallback is not None  # only dynamic sampling drops groups, and it keeps the first round
        chosen, groups, rew, cor = fallback
        kept_rows, kept_groups = list(chosen), list(groups)
        kept_rewards, kept_correct = list(rew), list(cor)
    return StepGroups(
        rows=kept_rows,
        groups=kept_groups,
        rewards=torch.from_numpy(np.stack(kept_rewards)),
        correct=torch.from_numpy(np.stack(kept_correct)),
        grades=all_grades,
        gen_stats=gen_stats,
        refill={"algo/sampling_rounds": rounds, "algo/filtered_groups": filtered},
        reward_seconds=reward_seconds,
        collect_seconds=time.perf_counter() - t_start,
    )


def staleness_bound(t: TrainerConfig) -> int:
    """The most versions a trained-on group may lag the learners: 0 in sync, 1 one step off,
    ``trainer.max_staleness`` in async (also how many batches are generated ahead)."""
    return {"sync": 0, "one_step_off": 1}.get(t.mode, t.max_staleness)


class BatchSource:
    """Where each step's groups come from: collected on the spot (``trainer.mode=sync``), or taken from
    a :class:`~rlsys.prefetch.Prefetcher` that generates ``bound`` batches ahead on a background thread.

    Called as ``source(step, times)``; adds ``time/rollout_idle`` (the prefetch thread sat held back
    by the staleness bound before it started this batch) in the off-policy modes.
    """

    def __init__(
        self, collect: Callable[[int], StepGroups], prefetcher: Prefetcher[StepGroups] | None, hold: bool = False
    ) -> None:
        self._collect = collect
        self._prefetcher = prefetcher
        self._hold = hold

    def __call__(self, step: int, times: dict[str, float]) -> StepGroups:
        if self._prefetcher is None:
            return self._collect(step)
        got = self._prefetcher.take(step)
        times["time/rollout_idle"] = got.waited_s
        return got.value

    def before_push(self, step: int, last: int, times: dict[str, float]) -> None:
        """``one_step_off``: hold step ``step``'s weight push until the next batch is generated, so that
        batch is entirely the previous weights' samples (``time/push_wait``); the other modes push at once."""
        if self._prefetcher is None or not self._hold or step >= last:
            return
        t0 = time.perf_counter()
        self._prefetcher.wait(step + 1)
        times["time/push_wait"] = time.perf_counter() - t0

    def settle(self) -> dict[int, StepGroups]:
        """The batches generated for later steps and not yet trained on ({} in sync mode)."""
        return {} if self._prefetcher is None else self._prefetcher.settle()


@contextmanager
def batch_source(
    cfg: RLConfig,
    first: int,
    run: RunInputs,
    sampler: PromptSampler,
    actors: Actors,
    bound: int,
    inflight: dict[int, StepGroups],
) -> Iterator[BatchSource]:
    """The run's :class:`BatchSource` from step ``first`` on; in the off-policy modes its prefetch
    thread starts now (``inflight``: the batches a checkpoint kept) and is stopped on the way out."""
    mode = cfg.trainer.mode

    def collect(step: int) -> StepGroups:
        return collect_groups(
            cfg, step, run.rows, run.requests, sampler, actors.rollout, actors.reward, announce=mode == "sync"
        )

    if mode == "sync":
        yield BatchSource(collect, None)
        return
    prefetcher = Prefetcher(collect, first, cfg.trainer.total_steps, ahead=bound, preloaded=inflight)
    log.info("trainer.mode=%s: generating up to %d batch(es) ahead of training", mode, bound)
    if inflight:
        log.info(
            "resuming with %d batch(es) generated before the checkpoint (steps %s)", len(inflight), sorted(inflight)
        )
    try:
        yield BatchSource(collect, prefetcher, hold=mode == "one_step_off")
    finally:
        prefetcher.close()


def drop_stale(groups: StepGroups, version: int, bound: int, step: int) -> tuple[StepGroups, dict[str, float]]:
    """Leave out groups sampled more than ``bound`` versions before ``version`` (the learners' now);
    return the rest and ``rollout/staleness_{mean,max}`` (of the kept groups, in versions) and
    ``rollout/dropped_stale_groups``. A group's version is the oldest that sampled any of its tokens.
    Sync mode (``bound`` 0) samples with the learners' own weights: its lags are reported, never acted on."""
    lag = np.array([version - g.weight_version for g in groups.groups], dtype=np.int64)
    keep = (lag <= bound) | (bound == 0)
    dropped = int((~keep).sum())
    if dropped == len(lag):
        raise RuntimeError(
            f"step {step}: every group of the batch was sampled more than {bound} versions ago "
            f"(lags {sorted(set(lag.tolist()))}); the prefetch bound should make this impossible"
        )
    if dropped:
        log.warning("step %d: %d group(s) older than %d versions left out (counted)", step, dropped, bound)
        idx = np.flatnonzero(keep)
        groups = dataclasses.replace(
            groups,
            rows=[groups.rows[i] for i in idx],
            groups=[groups.groups[i] for i in idx],
            rewards=groups.rewards[torch.from_numpy(idx)],
            correct=groups.correct[torch.from_numpy(idx)],
        )
    kept = lag[keep]
    return groups, {
        "rollout/staleness_mean": float(kept.mean()),
        "rollout/staleness_max": int(kept.max()),
        "rollout/dropped_stale_groups": dropped,
    }


def make_train_batch(groups: list[RolloutGroup], advantages: torch.Tensor, pad_token_id: int, agg: str) -> TrainBatch:
    """Flatten [B, G] groups into one TrainBatch (rows in group-major order) carrying the global
    loss normalizer of ``agg`` (total response tokens, or number of non-empty responses)."""
    from rlsys.workers.batching import build_train_batch, loss_normalizer_for

    prompts, responses, logprobs, advs = [], [], [], []
    for gi, g in enumerate(groups):
        for j, c in enumerate(g.completions):
            prompts.append(g.prompt_token_ids)
            responses.append(c.token_ids)
            logprobs.append(c.logprobs)
            advs.append(float(advantages[gi, j]))
    batch = build_train_batch(prompts, responses, logprobs, advs, pad_token_id=pad_token_id, loss_normalizer=1.0)
    return dataclasses.replace(batch, loss_normalizer=loss_normalizer_for(agg, batch.response_mask))


def train_phase(
    cfg: RLConfig,
    learners: LearnerGroupLike,
    batch: TrainBatch,
    pad: int,
    step: int,
    times: dict[str, float],
    checkpoint: str,
    out_dir: Path,
) -> list[TrainStats]:
    """``trainer.mini_batches x trainer.epochs`` optimizer steps on ``batch``, each split over the ranks;
    the stats of each, in order.

    One step (the default): pi_old is the step's own forward (ratio exactly 1, no extra pass). More:
    pi_old is computed once, before the first update (``time/pi_old``), and every epoch deals the
    batch's groups, in an order seeded by (trainer.seed, step, epoch), into mini-batches that each
    carry their own loss normalizer (:func:`rlsys.workers.batching.split_mini_batches`). A learner
    failure ends the run with the way to continue it (``checkpoint``: the last good one, "" for none).
    """
    from rlsys.workers.batching import split_mini_batches

    t, a = cfg.trainer, cfg.algo
    try:
        if t.mini_batches * t.epochs == 1:
            return [learners.train_step(learners.shard(batch, pad))]
        t0 = time.perf_counter()
        batch = dataclasses.replace(batch, old_logprobs=np.asarray(learners.compute_logprobs(batch, pad)))
        times["time/pi_old"] = time.perf_counter() - t0
        updates = []
        num_groups = batch.num_rows // a.group_size
        for epoch in range(t.epochs):
            order = np.random.default_rng([t.seed, step, epoch]).permutation(num_groups)
            for mini in split_mini_batches(batch, a.group_size, t.mini_batches, a.agg, order):
                updates.append(learners.train_step(learners.shard(mini, pad)))
        return updates
    except LearnerError as e:
        raise RuntimeError(
            f"{e}\nThe learner group cannot continue this run. Last good checkpoint: "
            f"{checkpoint or '(none yet: set trainer.save_every)'}; continue from it with "
            f"run.resume=auto run.output_dir={out_dir}"
        ) from e


def check_diverged(t: TrainerConfig, step: int, state: LoopState) -> None:
    """A non-finite loss or gradient skips the optimizer step on every rank (learner side); a few
    in a row (``trainer.max_nonfinite_steps``) mean the run has diverged: stop with a message rather
    than burn hours."""
    if state.skipped_in_a_row >= t.max_nonfinite_steps:
        raise RuntimeError(
            f"step {step}: {state.skipped_in_a_row} steps in a row had a non-finite loss or gradient and were "
            f"skipped (trainer.max_nonfinite_steps={t.max_nonfinite_steps}); lower learner.lr, check "
            f"the rewards, or resume from the last checkpoint {state.checkpoint or '(none yet)'}"
        )


def sync_weights(cfg: RLConfig, actors: Actors, version: int, probe: list[int]) -> float:
    """Push the learners' weights to every rollout engine as ``version`` through the job's weight path
    (``sync.transport``; it verifies the bytes and replaces an engine whose transfer failed); with
    ``sync.check``, return the probe's largest logprob difference (:func:`check_sync`), else nan."""
    path = actors.weights or ObjectStorePath(actors.learners, actors.rollout, sync_bucket_bytes(cfg, "object_store"))
    path.push(version)
    return check_sync(cfg, actors.learners, actors.rollout, probe, version) if cfg.sync.check else float("nan")


def check_sync(
    cfg: RLConfig, learners: LearnerGroupLike, rollout: RolloutGroupLike, probe: list[int], version: int
) -> float:
    """Score a fixed probe sequence with every rollout engine and the learner; return the largest
    mean |logprob difference|. Above the bound (:func:`rlsys.config.sync_logprob_bound`) the weights
    did not arrive intact."""
    from rlsys.workers.batching import build_train_batch

    pb = build_train_batch(
        [probe[:1]], [probe[1:]], [np.zeros(len(probe) - 1, np.float32)], [0.0], pad_token_id=0, loss_normalizer=1.0
    )
    learner_lp = np.asarray(learners.compute_logprobs(pb))[0, 1 : len(probe)]
    bound = sync_logprob_bound(cfg)
    which = "" if cfg.sync.max_logprob_diff is not None else f", the {cfg.model.dtype} default"
    worst = 0.0
    for wid, lp in enumerate(rollout.sequence_logprobs(probe)):
        diff = float(np.abs(lp - learner_lp).mean())
        worst = max(worst, diff)
        if not diff <= bound:
            raise RuntimeError(
                f"phase sync: after pushing weights v{version}, rollout worker {wid} scores the probe "
                f"sequence {diff:.4f} nats/token away from the learner (bound sync.max_logprob_diff="
                f"{bound:g}{which}); the rollout engine is not sampling from the trained weights"
            )
    return worst


def evaluate_start(
    cfg: RLConfig, state: LoopState, eval_rows: list[PromptRow], tokenizer: Any, actors: Actors, logger: MetricsLogger
) -> None:
    """Row step 0 of metrics.jsonl: held-out pass@k of the starting policy, before any update."""
    signals.set_phase("eval", step=0)
    state.evals["start"] = run_evaluation(cfg, eval_rows, tokenizer, actors.rollout, actors.reward, logger, 0, "start")
    state.eval_before = dict(state.evals["start"].pass_at_k)
    logger.log(0, eval_metrics(state.evals["start"]))


def maybe_evaluate(
    cfg: RLConfig,
    step: int,
    metrics: dict[str, float],
    state: LoopState,
    eval_rows: list[PromptRow],
    tokenizer: Any,
    actors: Actors,
    logger: MetricsLogger,
) -> None:
    """Every ``trainer.eval_every`` steps, and after the last with ``trainer.eval_at_start_end``:
    evaluate the just-synced weights into this step's ``metrics`` (``time/eval``, ``eval/*``)."""
    t = cfg.trainer
    last = step == t.total_steps
    if (t.eval_every and step % t.eval_every == 0) or (last and t.eval_at_start_end):
        with timed(metrics, "eval"):
            ev = run_evaluation(
                cfg,
                eval_rows,
                tokenizer,
                actors.rollout,
                actors.reward,
                logger,
                step,
                "end" if last else f"step_{step:06d}",
            )
        metrics.update(eval_metrics(ev))
        if last:
            state.evals["end"] = ev


def checkpoint_due(t: TrainerConfig, step: int) -> bool:
    """Every ``trainer.save_every`` steps (0: never) and after the last step."""
    return bool(t.save_every and step % t.save_every == 0) or step == t.total_steps


def save_checkpoint(
    learners: LearnerGroupLike,
    out_dir: Path,
    state: ckpt.DriverState,
    keep: int,
    inflight: dict[int, StepGroups] | None = None,
) -> str:
    """checkpoints/step_NNNNNN: HF weights + learner state + driver state (+ the off-policy modes'
    batches in flight), renamed into place only when complete (rlsys.checkpoint); the newest ``keep``
    are kept."""
    tmp = ckpt.begin(out_dir, state.step)
    learners.save_hf(str(tmp))
    learners.save_state(str(tmp / ckpt.LEARNER_STATE_DIR))
    if inflight:
        ckpt.save_inflight(tmp, dict(inflight))
    return str(ckpt.commit(tmp, state, keep))


def summarize(cfg: RLConfig, out_dir: Path, state: LoopState, eval_rows: list[PromptRow]) -> RunSummary:
    """The run's summary, and the start-vs-end pass@k plot when both ends were evaluated here."""
    plot = plot_training_evals(cfg, state.evals, len(eval_rows)) if state.evals else ""
    return RunSummary(
        output_dir=str(out_dir),
        checkpoint=state.checkpoint,
        steps=cfg.trainer.total_steps,
        first_reward=state.first_reward,
        last_reward=state.last_reward,
        metrics_path=str(out_dir / "metrics.jsonl"),
        eval_before=state.eval_before,
        eval_after=dict(state.evals["end"].pass_at_k) if "end" in state.evals else {},
        eval_plot=plot,
    )


# ================================ logging =============================================================


def collect_metrics(
    cfg: RLConfig,
    groups: StepGroups,
    gstats: Any,
    tstats: TrainStats,
    times: dict[str, float],
    logprob_diff: float,
    version: int,
    actors: Actors,
) -> dict[str, float]:
    """This step's metrics row (docs/metrics.md), from the phases' records."""
    m = step_metrics(
        groups.rewards,
        groups.correct,
        groups.grades,
        gstats,
        tstats,
        groups.gen_stats,
        groups.groups,
        {**times, **_generation_seconds(groups, times)},
        groups.refill,
        logprob_diff,
        version,
        actors.reward,
        actors.rollout,
    )
    m["run/bf16"] = int(cfg.model.dtype == "bfloat16")  # the resolved compute dtype
    return m


def step_metrics(
    rewards,
    correct,
    grades,
    gstats,
    tstats,
    gen_stats,
    groups,
    times,
    refill,
    logprob_diff,
    version,
    reward_pool,
    rollout=None,
) -> dict[str, float]:
    lengths = np.array([len(c.token_ids) for g in groups for c in g.completions])
    truncated = np.array([c.finish_reason == "length" for g in groups for c in g.completions])
    gen_tokens = sum(s.num_tokens for s in gen_stats)
    gen_seconds = max((s.seconds for s in gen_stats), default=0.0)
    status_counts = {s: 0 for s in GRADE_STATUSES}
    for gr in grades:
        status_counts[gr.status] += 1
    m: dict[str, float] = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "reward/success_rate": float(correct.float().mean()),
        "reward/timeouts": status_counts["timeout"],
        "reward/errors": status_counts["error"],
        "reward/invalid": status_counts["invalid"],
        "rollout/response_length": float(lengths.mean()),
        "rollout/truncated_fraction": float(truncated.mean()),
        "rollout/tokens_per_s": gen_tokens / gen_seconds if gen_seconds > 0 else 0.0,
        **tstats.metrics(),  # train/*
        "sync/seconds": times["time/sync"],
        "time/learner": tstats.seconds,  # inside time/train: the learners' own step(s), rank 0
        "sync/logprob_diff": logprob_diff,
        "weight_version": version,
        # Worker replacements since the pools started (cumulative; see rlsys.workers.supervision).
        "rollout/restarts": rollout.restarts if rollout is not None else 0,
        "reward/worker_restarts": getattr(reward_pool, "restarts", 0),
    }
    for k, v in gstats.as_dict().items():
        m[f"algo/{k}"] = v
    m.update(refill)
    m.update(times)
    m["time/rollout"] = m["time/rollout"] - times.get("time/reward", 0.0)  # generation only
    return m


def _generation_seconds(groups: StepGroups, times: dict[str, float]) -> dict[str, float]:
    """``time/rollout`` (before grading is subtracted): the loop's own rollout phase in sync mode; in the
    off-policy modes, where the loop only waits (``time/wait_rollout``), the prefetch thread's phase."""
    return {} if "time/rollout" in times else {"time/rollout": groups.collect_seconds}


def log_step(step: int, total: int, m: dict[str, float], progress: Progress | None = None) -> None:
    """One line per RL step: the step's numbers, its phase times, and (with ``progress``) the run's
    elapsed time and ETA."""
    timing = ""
    if progress is not None:
        progress.update(step, emit=False)
        timing = f" | {progress.timing()}"
    log.info(
        "step %d/%d  reward %.3f  success %.3f  mixed %.2f  focal %.3f  loss %+.4f  kl %.2e  "
        "len %.1f  | rollout %.2fs reward %.2fs train %.2fs sync %.2fs (diff %.4f) | cpu rollout %.0f%% "
        "train %.0f%%%s",
        step,
        total,
        m["reward/mean"],
        m["reward/success_rate"],
        m["algo/mixed_group_fraction"],
        m["algo/focal_weight_mean"],
        m["train/loss"],
        m["train/approx_kl"],
        m["rollout/response_length"],
        m["time/rollout"],
        m["time/reward"],
        m["time/train"],
        m["time/sync"],
        m["sync/logprob_diff"],
        100 * m.get("cpu/rollout", float("nan")),
        100 * m.get("cpu/train", float("nan")),
        timing,
    )


def log_samples(tokenizer, rows, groups, rewards, n: int, step: int, logger) -> None:
    table = []
    for i in range(min(n, len(groups))):
        prompt = rows[i].messages[-1][1]
        text = groups[i].completions[0].text
        r = float(rewards[i, 0])
        log.info("  sample [%s] reward %.2f | %s -> %r", groups[i].prompt_id, r, _short(prompt), _short(text))
        table.append([step, groups[i].prompt_id, prompt, text, r])
    if table:
        logger.log_table("samples", ["step", "prompt_id", "prompt", "completion", "reward"], table, step)


def _short(s: str, n: int = 120) -> str:
    s = s.replace("\n", " | ")
    return s if len(s) <= n else s[: n - 3] + "..."


# ================================ old names ===========================================================
# Moved out of the loop (to rlsys.data and rlsys.build); kept importable from here because
# scripts/bench_learner.py still imports them from rlsys.driver.
learner_spec = build.learner_spec

__all__ = [
    "train",
    "RunSummary",
    "LoopState",
    "StepGroups",
    "collect_groups",
    "make_train_batch",
    "check_sync",
    "encode_prompt",
    "learner_spec",
    "policy_model_path",
]
