"""The F-GRPO training loop, top to bottom.

    prompts -> generate (vLLM rollout workers) -> score (reward pool) -> group advantages with the
    focal weight (rlsys.algo, on [B, G] tensors here in the driver) -> train (DeepSpeed learners)
    -> sync weights to the rollout workers (and check them) -> log -> checkpoint

Each phase is timed (``time/<phase>``). Every remote call has a timeout and errors name the phase
and the actor. B = prompts per step, G = group size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from rlsys import algo
from rlsys import checkpoint as ckpt
from rlsys import signals
from rlsys.config import ConfigError, RLConfig, local_cluster_cpus, resolve, validate
from rlsys.eval import EvalResult, eval_metrics, load_eval_rows
from rlsys.progress import Progress
from rlsys.records import GRADE_STATUSES, GradeRequest, PromptRow, RolloutGroup, RolloutRequest, TrainBatch
from rlsys.sampler import PromptSampler, sample_seed

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


def train(cfg: RLConfig) -> RunSummary:
    """Run one F-GRPO job on the Ray cluster ``cfg.cluster`` describes."""
    from rlsys import cluster

    cfg = resolve(cfg)  # absolute paths (actors have another cwd), model.dtype for this hardware
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg)  # values only; resources are checked once the cluster is known
    signals.set_phase("start-up", total_steps=cfg.trainer.total_steps)
    with cluster.session(cfg.cluster.address, local_cluster_cpus(cfg), cfg.cluster.namespace) as cpus:
        validate(cfg, available_cpus=cpus)
        return _train(cfg, out_dir)


def _train(cfg: RLConfig, out_dir: Path) -> RunSummary:
    from transformers import AutoTokenizer

    from rlsys import cluster
    from rlsys.metrics import MetricsLogger
    from rlsys.rewards.pool import RewardPool
    from rlsys.workers.learner import LearnerError, LearnerGroup
    from rlsys.workers.rollout import RolloutPool

    a, t = cfg.algo, cfg.trainer
    resume = find_resume_point(cfg, out_dir)
    model_path = policy_model_path(cfg)
    state = ckpt.load_driver_state(resume) if resume else None
    if state and state.dtype and state.dtype != cfg.model.dtype:
        # The optimizer state is kept in the run's dtype; another CPU kind may resolve auto differently.
        raise ConfigError(f"invalid config model.dtype={cfg.model.dtype!r}: the run in {out_dir} was trained in "
                          f"{state.dtype} ({resume.name}); resume it with model.dtype={state.dtype}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = load_prompt_rows(cfg)
    if len(rows) < t.prompts_per_step:
        raise ValueError(f"trainer.prompts_per_step={t.prompts_per_step} exceeds the {len(rows)} training prompts")
    requests = {r.prompt_id: RolloutRequest(r.prompt_id, tuple(encode_prompt(tokenizer, r))) for r in rows}
    log.info("%d training prompts; model %s", len(rows), model_path)

    # ---- actors ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    reward_pool = RewardPool(
        num_workers=cfg.reward.num_workers, procs_per_worker=cfg.reward.procs_per_worker,
        timeout_s=cfg.reward.timeout_s, success_threshold=cfg.reward.success_threshold,
        memory_limit_mb=cfg.reward.memory_limit_mb, allowed_functions=tuple(cfg.reward.allowed_functions),
        num_cpus=cfg.reward.num_cpus_per_worker, max_restarts=cfg.reward.max_restarts)
    reward_pool.validate_specs(sorted({r.verifier for r in rows}))
    learners = LearnerGroup(learner_spec(cfg, model_path), cfg.learner.num_workers,
                            actor_options=learner_actor_options(cfg, cfg.learner.num_workers),
                            init_dir=str(out_dir / ".dist"), call_timeout_s=cfg.learner.timeout_s)
    if resume:
        # Optimizer state, fp32 master weights and RNG of every rank; the rollout engines start
        # from the checkpoint's Hugging Face weights, which equal the last pushed ones.
        learners.load_state(str(resume / ckpt.LEARNER_STATE_DIR))
    rollout = RolloutPool(rollout_spec(cfg, str(resume) if resume else model_path), cfg.rollout.num_workers,
                          num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker,
                          timeout_s=cfg.rollout.timeout_s, max_restarts=cfg.rollout.max_restarts,
                          num_threads=rollout_threads(cfg, cfg.rollout.num_workers))
    log.info("actors up in %.1f s: %d rollout, %d reward, %d learner workers", time.perf_counter() - t0,
             cfg.rollout.num_workers, cfg.reward.num_workers, cfg.learner.num_workers)
    log_compute(cfg, learners.ready_info, rollout.describe())

    if state:
        dropped = ckpt.truncate_metrics(out_dir / "metrics.jsonl", state.step)
        log.info("resuming from %s (step %d, weight version %d); dropped %d metrics rows written after it",
                 resume, state.step, state.weight_version, dropped)
    logger = MetricsLogger(out_dir, wandb_mode=cfg.logger.wandb_mode, project=cfg.logger.project,
                           entity=cfg.logger.entity, run_name=cfg.run.name or f"{a.name}-{out_dir.name}",
                           config=dataclasses.asdict(cfg), run_id=state.wandb_run_id if state else None)
    sampler = PromptSampler(len(rows), seed=t.seed, state=state.sampler if state else None)
    probe = probe_tokens(tokenizer, rows[0])
    eval_rows = load_eval_rows(cfg) if (t.eval_at_start_end or t.eval_every) else []
    evals: dict[str, EvalResult] = {}
    eval_before: dict[int, float] = dict(state.eval_before) if state else {}
    version = state.weight_version if state else 0
    skipped_in_a_row = state.skipped_in_a_row if state else 0
    first_reward = state.first_reward if state else float("nan")
    last_reward = float("nan")
    checkpoint = str(resume) if resume else ""
    start_step = state.step + 1 if state else 1
    try:
        if t.eval_at_start_end and not state:
            # Row step 0 of metrics.jsonl: the starting policy, before any update.
            signals.set_phase("eval", step=0)
            evals["start"] = run_evaluation(cfg, eval_rows, tokenizer, rollout, reward_pool, logger, 0, "start")
            eval_before = dict(evals["start"].pass_at_k)
            logger.log(0, eval_metrics(evals["start"]))

        progress = Progress(t.total_steps, "step", initial=start_step - 1, bar=False, logger=log)  # ETA in log_step
        for step in range(start_step, t.total_steps + 1):
            signals.status.step = step
            times: dict[str, float] = {}
            step_t0 = time.perf_counter()

            # ---- 1. generate: G completions per prompt (DAPO: keep mixed groups, refill) ---------
            with timed(times, "rollout"):
                batch_rows, groups, rewards, correct, grades, gen_stats, refill = collect_groups(
                    cfg, step, rows, requests, sampler, rollout, reward_pool, times)

            # ---- 2. advantages with the focal weight, on [B, G] ------------------------------------
            adv, gstats = algo.group_advantages(
                rewards, gamma=a.gamma, std_normalize=a.std_normalize, eps=a.adv_eps,
                success_threshold=a.success_threshold, correct=correct)

            # ---- 3. train ---------------------------------------------------------------------------
            with timed(times, "train"):
                batch = make_train_batch(groups, adv, tokenizer.pad_token_id, a.agg)
                parts = learners.shard(batch, tokenizer.pad_token_id)
                try:
                    tstats = learners.train_step(parts)
                except LearnerError as e:
                    raise RuntimeError(
                        f"{e}\nThe learner group cannot continue this run. Last good checkpoint: "
                        f"{checkpoint or '(none yet: set trainer.save_every)'}; continue from it with "
                        f"run.resume=auto run.output_dir={out_dir}") from e
            # A non-finite loss or gradient skips the optimizer step on every rank (learner side);
            # a few in a row mean the run has diverged: stop with a message rather than burn hours.
            skipped_in_a_row = skipped_in_a_row + 1 if tstats.skipped else 0
            if skipped_in_a_row >= t.max_nonfinite_steps:
                raise RuntimeError(
                    f"step {step}: {skipped_in_a_row} steps in a row had a non-finite loss or gradient and were "
                    f"skipped (trainer.max_nonfinite_steps={t.max_nonfinite_steps}); lower learner.lr, check "
                    f"the rewards, or resume from the last checkpoint {checkpoint or '(none yet)'}")

            # ---- 4. sync weights to every rollout worker, then check them ------------------------
            with timed(times, "sync"):
                version += 1
                refs = learners.export_weight_buckets(cfg.sync.bucket_mb << 20)
                # The pool keeps the refs (to re-push them into a worker it has to restart).
                rollout.load_weight_buckets(refs, version)
                del refs
                logprob_diff = check_sync(cfg, learners, rollout, probe, version) if cfg.sync.check else float("nan")

            # ---- 5. log (and evaluate every trainer.eval_every steps) ----------------------------------
            times["time/step"] = time.perf_counter() - step_t0
            metrics = step_metrics(rewards, correct, grades, gstats, tstats, gen_stats, groups, times,
                                   refill, logprob_diff, version, reward_pool, rollout)
            metrics["run/bf16"] = int(cfg.model.dtype == "bfloat16")  # the resolved compute dtype
            last = step == t.total_steps
            if (t.eval_every and step % t.eval_every == 0) or (last and t.eval_at_start_end):
                with timed(metrics, "eval"):
                    ev = run_evaluation(cfg, eval_rows, tokenizer, rollout, reward_pool, logger, step,
                                        "end" if last else f"step_{step:06d}")
                metrics.update(eval_metrics(ev))
                if last:
                    evals["end"] = ev
            logger.log(step, metrics)
            last_reward = metrics["reward/mean"]
            if step == 1:
                first_reward = last_reward
            log_step(step, t.total_steps, metrics, progress)
            log_samples(tokenizer, batch_rows, groups, rewards, t.log_samples, step, logger)

            # ---- 6. checkpoint ------------------------------------------------------------------------
            if (t.save_every and step % t.save_every == 0) or step == t.total_steps:
                signals.set_phase("checkpoint")
                state = ckpt.DriverState(step=step, sampler=sampler.state(), weight_version=version,
                                         wandb_run_id=logger.run_id, skipped_in_a_row=skipped_in_a_row,
                                         first_reward=first_reward, eval_before=eval_before,
                                         dtype=cfg.model.dtype)
                checkpoint = save_checkpoint(learners, out_dir, state, t.keep_checkpoints)
                log.info("step %d: checkpoint %s", step, checkpoint)
    finally:
        # Pools first: on a stop (rlsys.signals) they kill their actors at once, so nothing writes into
        # the checkpoint being removed; the metrics logger closes last. A stop keeps the phase it hit.
        if not signals.stopping():
            signals.set_phase("shut-down")
        rollout.shutdown()
        reward_pool.shutdown()
        learners.shutdown()
        logger.close()
    plot = ""
    if evals:
        from rlsys.eval import plot_pass_at_k

        plot = str(plot_pass_at_k({f"{name} of training": dict(e.pass_at_k) for name, e in evals.items()},
                                  out_dir / "eval" / "pass_at_k_start_vs_end.png",
                                  errors={f"{name} of training": dict(e.pass_at_k_stderr) for name, e in evals.items()},
                                  title=f"held-out pass@k ({len(eval_rows)} problems, n={cfg.eval.n})"))
    return RunSummary(output_dir=str(out_dir), checkpoint=checkpoint, steps=t.total_steps,
                      first_reward=first_reward, last_reward=last_reward,
                      metrics_path=str(out_dir / "metrics.jsonl"), eval_before=eval_before,
                      eval_after=dict(evals["end"].pass_at_k) if "end" in evals else {}, eval_plot=plot)


def run_evaluation(cfg: RLConfig, rows: list[PromptRow], tokenizer, rollout, reward_pool, logger, step: int,
                   label: str) -> "EvalResult":
    """Held-out pass@k of the rollout workers' current weights; writes JSON/CSV/PNG under eval/."""
    from rlsys.eval import evaluate, format_table, write_eval_outputs

    e = cfg.eval
    result = evaluate(rows, tokenizer, rollout, reward_pool, n=e.n, ks=list(e.k), seed=e.seed)
    paths = write_eval_outputs(result, Path(cfg.run.output_dir) / "eval", label)
    log.info("eval [%s]\n%s", label, format_table(result, f"held-out eval at step {step}"))
    logger.log_image(f"eval/plot_{label}", str(paths.png), step=step)
    return result


# ================================ phases ==============================================================


def collect_groups(cfg: RLConfig, step: int, rows: list[PromptRow], requests: dict[str, RolloutRequest],
                   sampler: PromptSampler, rollout, reward_pool, times: dict[str, float]):
    """Generate and grade B groups. With dynamic sampling, keep only mixed groups and refill from
    fresh prompts for up to ``algo.max_refill_rounds`` extra rounds; train on what was kept (never
    crash when too few survive: if none does, the previous round's groups are used and it is logged).

    Returns (rows [B], groups [B], rewards [B, G], correct [B, G], grades, generation stats, refill info).
    """
    a, b = cfg.algo, cfg.trainer.prompts_per_step
    kept_rows: list[PromptRow] = []
    kept_groups: list[RolloutGroup] = []
    kept_rewards: list[np.ndarray] = []
    kept_correct: list[np.ndarray] = []
    all_grades = []
    gen_stats = []
    reward_seconds = 0.0
    rounds = 0
    filtered = 0
    fallback = None
    while len(kept_groups) < b:
        want = b - len(kept_groups)
        idx = sampler.take(want)
        chosen = [rows[i] for i in idx]
        seeds = {r.prompt_id: sample_seed(cfg.trainer.seed, step, r.prompt_id, rounds) for r in chosen}
        signals.set_phase("generate")
        groups, st = rollout.generate([requests[r.prompt_id] for r in chosen], a.group_size, seeds)
        gen_stats.extend(st)
        t0 = time.perf_counter()
        signals.set_phase("grade")
        grades = reward_pool.grade([
            GradeRequest(g.prompt_id, j, c.text, r.answer, r.verifier)
            for r, g in zip(chosen, groups) for j, c in enumerate(g.completions)])
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
            log.warning("step %d: dynamic sampling kept %d of %d groups after %d rounds; training on those",
                        step, len(kept_groups), b, rounds)
            break
    if not kept_groups:
        # Nothing mixed at all: train on the first round (its advantages are all zero, so the
        # update is a no-op apart from optional KL/entropy terms) rather than crash.
        log.warning("step %d: no mixed group in %d rounds; this step carries no policy-gradient signal", step,
                    rounds)
        chosen, groups, rew, cor = fallback
        kept_rows, kept_groups = list(chosen), list(groups)
        kept_rewards, kept_correct = list(rew), list(cor)
    times["time/reward"] = reward_seconds
    refill = {"algo/sampling_rounds": rounds, "algo/filtered_groups": filtered}
    return (kept_rows, kept_groups, torch.from_numpy(np.stack(kept_rewards)),
            torch.from_numpy(np.stack(kept_correct)), all_grades, gen_stats, refill)


def make_train_batch(groups: list[RolloutGroup], advantages: torch.Tensor, pad_token_id: int,
                     agg: str) -> TrainBatch:
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


def check_sync(cfg: RLConfig, learners, rollout, probe: list[int], version: int) -> float:
    """Score a fixed probe sequence with every rollout engine and the learner; return the largest
    mean |logprob difference|. Above ``sync.max_logprob_diff`` the weights did not arrive intact."""
    from rlsys.workers.batching import build_train_batch

    pb = build_train_batch([probe[:1]], [probe[1:]], [np.zeros(len(probe) - 1, np.float32)], [0.0],
                           pad_token_id=0, loss_normalizer=1.0)
    learner_lp = np.asarray(learners.compute_logprobs(pb))[0, 1:len(probe)]
    worst = 0.0
    for wid, lp in enumerate(rollout.sequence_logprobs(probe)):
        diff = float(np.abs(lp - learner_lp).mean())
        worst = max(worst, diff)
        if not diff <= cfg.sync.max_logprob_diff:
            raise RuntimeError(
                f"phase sync: after pushing weights v{version}, rollout worker {wid} scores the probe "
                f"sequence {diff:.4f} nats/token away from the learner (bound sync.max_logprob_diff="
                f"{cfg.sync.max_logprob_diff}); the rollout engine is not sampling from the trained weights")
    return worst


def save_checkpoint(learners, out_dir: Path, state: "ckpt.DriverState", keep: int) -> str:
    """checkpoints/step_NNNNNN: HF weights + learner state + driver state, renamed into place only
    when complete (rlsys.checkpoint); the newest ``keep`` are kept."""
    tmp = ckpt.begin(out_dir, state.step)
    learners.save_hf(str(tmp))
    learners.save_state(str(tmp / ckpt.LEARNER_STATE_DIR))
    return str(ckpt.commit(tmp, state, keep))


def find_resume_point(cfg: RLConfig, out_dir: Path) -> Optional[Path]:
    """run.resume=auto: the newest complete checkpoint in run.output_dir (None: start fresh).
    run.resume=never refuses a directory that already holds checkpoints rather than mix two runs."""
    newest = ckpt.latest(out_dir)
    if cfg.run.resume == "auto":
        if newest is None:
            log.info("run.resume=auto: no complete checkpoint in %s, starting fresh", out_dir)
        return newest
    if newest is not None:
        raise ConfigError(f"invalid config run.output_dir={str(out_dir)!r}: it already holds checkpoints "
                          f"({newest.name}); continue that run with run.resume=auto or choose a new output dir")
    return None


# ================================ set-up helpers ======================================================


def policy_model_path(cfg: RLConfig) -> str:
    """The policy RL starts from: ``model.path`` if set; else, for a built-in task with
    ``sft.enabled``, the SFT warm start of the built-in tiny model (trained once, then cached);
    else the randomly initialised tiny model."""
    if cfg.model.path is None and cfg.sft.enabled and cfg.data.task is not None:
        from rlsys.sft import warm_start

        return warm_start(cfg)
    return resolve_model_path(cfg)


def resolve_model_path(cfg: RLConfig) -> str:
    """The base checkpoint: ``model.path``, or the built-in tiny model (built on first use)."""
    if cfg.model.path:
        return cfg.model.path
    from rlsys.models import ensure_tiny_model

    return str(ensure_tiny_model(size=cfg.model.tiny_size, seed=cfg.model.tiny_seed))


def load_prompt_rows(cfg: RLConfig) -> list[PromptRow]:
    d = cfg.data
    if d.task is not None:
        from rlsys.tasks import get_task

        rows = get_task(d.task).generate("train", d.num_train, seed=cfg.trainer.seed)
    else:
        from rlsys.data import load_rows

        rows, report = load_rows(d.path, prompt_key=d.prompt_key, answer_key=d.answer_key, id_key=d.id_key,
                                 verifier=d.verifier, system_prompt=d.system_prompt, on_bad_row=d.on_bad_row,
                                 answer_after=d.answer_after)
        if report.num_skipped:
            log.warning("data: skipped %d malformed rows of %s: %s", report.num_skipped, d.path, report.reasons)
    return rows[: d.limit] if d.limit else rows


def encode_prompt(tokenizer, row: PromptRow) -> list[int]:
    """Chat-template the row's messages (with the assistant generation prompt) and tokenize once."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"invalid config model.path={tokenizer.name_or_path!r}: its tokenizer has no "
                          "chat_template, and rlsys formats prompts as chats; use an instruct/chat checkpoint or "
                          "add a chat_template (tokenizer_config.json or chat_template.jinja)")
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in row.messages],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def probe_tokens(tokenizer, row: PromptRow) -> list[int]:
    """A fixed sequence (a prompt plus a short answer) both sides score after every sync."""
    return encode_prompt(tokenizer, row) + tokenizer.encode("Answer: 42", add_special_tokens=False)


def rollout_spec(cfg: RLConfig, model_path: str):
    from rlsys.workers.rollout import RolloutSpec

    r = cfg.rollout
    return RolloutSpec(model_path=model_path, dtype=cfg.model.dtype, max_tokens=r.max_tokens,
                       temperature=r.temperature, top_p=r.top_p, kv_cache_memory_bytes=r.kv_cache_memory_mb << 20,
                       gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
                       seed=cfg.trainer.seed, vllm_log_level=r.vllm_log_level)


def rollout_threads(cfg: RLConfig, num_workers: int) -> int:
    """Compute threads per rollout engine (see :func:`rlsys.cluster.worker_threads`)."""
    from rlsys.cluster import worker_threads

    r = cfg.rollout
    return worker_threads(r.num_threads, num_workers, r.num_cpus_per_worker)


def learner_actor_options(cfg: RLConfig, num_workers: int) -> dict:
    """Ray options of a learner rank: resources and compute threads (``num_workers`` ranks share
    the machine's cores on a local cluster)."""
    from rlsys.cluster import actor_options, worker_threads

    lr = cfg.learner
    return actor_options(lr.num_cpus_per_worker, lr.num_gpus_per_worker,
                         num_threads=worker_threads(lr.num_threads, num_workers, lr.num_cpus_per_worker))


def log_compute(cfg: RLConfig, learner_info: list[dict], rollout_info: list[dict]) -> None:
    """One line: the dtype and threads every actor really runs with, and why that dtype."""
    log.info("compute: learners %s, rollout engines %s (model.dtype %s: %s)",
             ", ".join(f"{i['dtype']} x{i['threads']} threads" for i in learner_info),
             ", ".join(f"{i['dtype']} x{i['threads']} threads" for i in rollout_info),
             cfg.model.dtype, cfg.model.dtype_reason)


def learner_spec(cfg: RLConfig, model_path: str):
    from rlsys.workers.learner import LearnerSpec

    a, lr = cfg.algo, cfg.learner
    return LearnerSpec(model_path=model_path, zero_stage=lr.zero_stage, dtype=cfg.model.dtype, lr=lr.lr,
                       weight_decay=lr.weight_decay, betas=(lr.beta1, lr.beta2), warmup_steps=lr.warmup_steps,
                       grad_clip=lr.grad_clip, micro_batch_size=lr.micro_batch_size, loss_type=a.loss_type,
                       clip_low=a.clip_low, clip_high=a.clip_high, agg=a.agg,
                       token_sum_constant=float(cfg.rollout.max_tokens), kl_coef=a.kl_coef,
                       entropy_coef=a.entropy_coef, tis_cap=a.tis_cap, seed=cfg.trainer.seed,
                       gradient_checkpointing=lr.gradient_checkpointing)


# ================================ logging =============================================================


def step_metrics(rewards, correct, grades, gstats, tstats, gen_stats, groups, times, refill, logprob_diff,
                 version, reward_pool, rollout=None) -> dict[str, float]:
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
        "train/loss": tstats.loss,
        "train/pg_loss": tstats.pg_loss,
        "train/clip_fraction": tstats.clip_fraction,
        "train/grad_norm": tstats.grad_norm,
        "train/entropy": tstats.entropy,
        "train/approx_kl": tstats.approx_kl,
        "train/lr": tstats.lr,
        "train/ratio_max": tstats.ratio_max,
        "train/rollout_logprob_diff": tstats.rollout_logprob_diff,
        "train/tokens": tstats.num_tokens,
        "train/skipped": int(tstats.skipped),
        **{f"train/{k}": tstats.extra[k] for k in ("tis_weight_mean", "tis_clip_fraction") if k in tstats.extra},
        "sync/seconds": times["time/sync"],
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


def log_step(step: int, total: int, m: dict[str, float], progress: Optional[Progress] = None) -> None:
    """One line per RL step: the step's numbers, its phase times, and (with ``progress``) the run's
    elapsed time and ETA."""
    timing = ""
    if progress is not None:
        progress.update(step, emit=False)
        timing = f" | {progress.timing()}"
    log.info("step %d/%d  reward %.3f  success %.3f  mixed %.2f  focal %.3f  loss %+.4f  kl %.2e  "
             "len %.1f  | rollout %.2fs reward %.2fs train %.2fs sync %.2fs (diff %.4f) | cpu rollout %.0f%% "
             "train %.0f%%%s",
             step, total, m["reward/mean"], m["reward/success_rate"], m["algo/mixed_group_fraction"],
             m["algo/focal_weight_mean"], m["train/loss"], m["train/approx_kl"], m["rollout/response_length"],
             m["time/rollout"], m["time/reward"], m["time/train"], m["time/sync"], m["sync/logprob_diff"],
             100 * m.get("cpu/rollout", float("nan")), 100 * m.get("cpu/train", float("nan")), timing)


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


__all__ = ["train", "RunSummary", "collect_groups", "make_train_batch", "check_sync"]
