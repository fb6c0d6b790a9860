"""Config -> objects: the ONLY module that reads ``cfg.rollout``, ``cfg.reward`` and ``cfg.learner`` to
build worker specs and start actor groups.

Every job (training, ``rlsys.eval``, ``rlsys.difficulty``, the SFT warm start and its evaluation)
builds its actors here, so a setting such as ``rollout.max_restarts`` cannot be honoured by one job
and dropped by another. Two kinds of functions:

* spec builders, pure: :func:`rollout_spec`, :func:`learner_spec`, :func:`sft_learner_spec`,
  :func:`reward_spec`, plus the resource helpers :func:`rollout_threads`, :func:`learner_actor_options`;
* group starters, which need a Ray connection: :func:`make_rollout_pool`, :func:`make_reward_pool`,
  :func:`make_learner_group`, and the context managers :func:`start_actors` (the training job's three
  groups) and :func:`eval_pools` (rollout + reward for evaluation). A context manager owns every
  actor it started: a start-up failure in a later group shuts the earlier ones down.

Imports: config, cluster, signals, models; the worker classes lazily (they pull in Ray, vLLM, torch).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlsys import signals
from rlsys.checkpoint import LEARNER_STATE_DIR
from rlsys.config import (
    ConfigError,
    RLConfig,
    importance_correction,
    rollout_executor,
    sync_bucket_bytes,
    sync_transport,
)
from rlsys.workers import LearnerGroupLike, RewardGroupLike, RolloutGroupLike  # Protocols only: no Ray

log = logging.getLogger("rlsys.build")


# ================================ specs ===============================================================


def _spec(cls: type, not_from_config: tuple[str, ...], **given: Any) -> Any:
    """``cls(**given)``, but every field of the spec must be given here unless it is listed in
    ``not_from_config`` (a worker's internal knob no config key sets). The specs keep defaults for
    tests and benchmarks that build them by hand; this check is what makes a field added to a spec
    and forgotten here fail at start-up (tests/unit/test_build.py builds every spec) instead of
    silently running on the spec's default."""
    missing = sorted({f.name for f in dataclasses.fields(cls)} - set(given) - set(not_from_config))
    if missing:
        raise TypeError(
            f"rlsys.build: {cls.__name__} fields {missing} are not set from the config; set them "
            f"in rlsys/build.py (or list them as not_from_config if no config key decides them)"
        )
    return cls(**given)


def rollout_spec(cfg: RLConfig, model_path: str) -> Any:
    """The :class:`rlsys.workers.rollout.RolloutSpec` of ``cfg.rollout`` for the checkpoint ``model_path``."""
    from rlsys.workers.vllm_engine import RolloutSpec

    r = cfg.rollout
    return _spec(
        RolloutSpec,
        ("max_model_len", "transport", "initial_version"),
        model_path=model_path,
        dtype=cfg.model.dtype,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        kv_cache_memory_bytes=r.kv_cache_memory_mb << 20,
        gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager,
        seed=cfg.trainer.seed,
        vllm_log_level=r.vllm_log_level,
        trust_remote_code=cfg.model.trust_remote_code,
        tensor_parallel_size=r.tensor_parallel_size,
        executor=rollout_executor(cfg),
        engine=r.engine,
    )


def learner_spec(cfg: RLConfig, model_path: str) -> Any:
    """The :class:`rlsys.workers.learner.LearnerSpec` of ``cfg.learner`` and ``cfg.algo`` for ``model_path``."""
    from rlsys.workers.learner import LearnerSpec

    a, lr = cfg.algo, cfg.learner
    correction, cap = importance_correction(cfg)
    return _spec(
        LearnerSpec,
        ("eps", "logprob_chunk_tokens", "logprob_micro_batch_size", "gather_bytes", "dist_timeout_s"),
        model_path=model_path,
        zero_stage=lr.zero_stage,
        dtype=cfg.model.dtype,
        lr=lr.lr,
        weight_decay=lr.weight_decay,
        betas=(lr.beta1, lr.beta2),
        warmup_steps=lr.warmup_steps,
        grad_clip=lr.grad_clip,
        micro_batch_size=lr.micro_batch_size,
        loss_type=a.loss_type,
        clip_low=a.clip_low,
        clip_high=a.clip_high,
        agg=a.agg,
        token_sum_constant=float(cfg.rollout.max_tokens),
        kl_coef=a.kl_coef,
        entropy_coef=a.entropy_coef,
        tis_cap=cap,
        tis_mode="mask" if correction == "mask" else "truncate",
        dual_clip=a.dual_clip,
        seed=cfg.trainer.seed,
        gradient_checkpointing=lr.gradient_checkpointing,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def sft_learner_spec(cfg: RLConfig, model_path: str, *, dtype: str, micro_batch_size: int) -> Any:
    """The learner spec of the SFT warm start (:mod:`rlsys.sft`): :func:`learner_spec` with the ``sft.*``
    optimizer settings and a plain token-mean GRPO objective with every RL term off, which with advantage
    1 and rollout log-probs 0 is the NLL (see rlsys.sft). ``dtype`` / ``micro_batch_size``: as
    ``rlsys.sft`` resolves them from ``sft.dtype`` / ``sft.micro_batch_size``."""
    s = cfg.sft
    return dataclasses.replace(
        learner_spec(cfg, model_path),
        dtype=dtype,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        loss_type="grpo",
        clip_low=None,
        clip_high=None,
        agg="token_mean",
        kl_coef=0.0,
        entropy_coef=0.0,
        tis_cap=None,  # SFT rows carry rollout log-probs 0 (see rlsys.sft): no IS correction
        dual_clip=None,
        seed=s.seed,
        micro_batch_size=micro_batch_size,
    )


def reward_spec(cfg: RLConfig) -> Any:
    """The :class:`rlsys.workers.reward.RewardSpec` of ``cfg.reward``."""
    from rlsys.workers.reward import RewardSpec

    w = cfg.reward
    return RewardSpec(
        num_workers=w.num_workers,
        procs_per_worker=w.procs_per_worker,
        timeout_s=w.timeout_s,
        success_threshold=w.success_threshold,
        memory_limit_mb=w.memory_limit_mb,
        allowed_functions=tuple(w.allowed_functions),
        num_cpus=w.num_cpus_per_worker,
        max_restarts=w.max_restarts,
    )


def rollout_threads(cfg: RLConfig, num_workers: int) -> int:
    """Compute threads per rollout engine (see :func:`rlsys.cluster.worker_threads`)."""
    from rlsys.cluster import worker_threads

    r = cfg.rollout
    return worker_threads(r.num_threads, num_workers, r.num_cpus_per_worker, core_share(cfg))


def core_share(cfg: RLConfig) -> float:
    """The fraction of a local machine's cores each role (rollout, learners) computes on: all of them
    when the phases take turns (``trainer.mode=sync``), half when generation overlaps training."""
    return 1.0 if cfg.trainer.mode == "sync" else 0.5


def learner_actor_options(cfg: RLConfig, num_workers: int) -> dict:
    """Ray options of a learner rank: resources and compute threads (``num_workers`` ranks share
    the machine's cores on a local cluster)."""
    from rlsys.cluster import actor_options, worker_threads

    lr = cfg.learner
    return actor_options(
        lr.num_cpus_per_worker,
        lr.num_gpus_per_worker,
        num_threads=worker_threads(lr.num_threads, num_workers, lr.num_cpus_per_worker, core_share(cfg)),
    )


# ================================ groups (Ray connected) ==============================================


def make_reward_pool(cfg: RLConfig) -> Any:
    """A started RewardGroup of ``cfg.reward`` (Ray must be connected)."""
    from rlsys.workers.reward import RewardGroup

    return RewardGroup(reward_spec(cfg))


def make_rollout_pool(
    cfg: RLConfig,
    model_path: str,
    *,
    num_workers: int | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    transport: str = "object_store",
    initial_version: int = 0,
) -> Any:
    """A started RolloutPool of ``cfg.rollout`` serving ``model_path`` (Ray must be connected), whose
    weights are version ``initial_version`` (a resumed run's checkpoint version).

    ``num_workers`` (None: ``rollout.num_workers``), ``temperature``, ``max_tokens`` and ``seed``
    (None: the spec's, from ``rollout.*`` / ``trainer.seed``) are what evaluation jobs change; the
    restart budget (``rollout.max_restarts``), call timeout and resources always come from the config.
    ``transport``: how weights will arrive (the training job passes the resolved ``sync.transport``;
    evaluation pools never take weights).
    """
    from rlsys.workers.rollout import RolloutPool

    r = cfg.rollout
    n = r.num_workers if num_workers is None else num_workers
    over = {
        k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens), ("seed", seed)) if v is not None
    }
    spec = dataclasses.replace(
        rollout_spec(cfg, model_path), transport=transport, initial_version=initial_version, **over
    )
    # sync.timeout_s is the deadline of a weight push; every other call is bounded by rollout.timeout_s.
    return RolloutPool(
        spec,
        n,
        num_cpus=r.num_cpus_per_worker,
        num_gpus=r.num_gpus_per_worker,
        timeout_s=r.timeout_s,
        max_restarts=r.max_restarts,
        num_threads=rollout_threads(cfg, n),
        sync_timeout_s=cfg.sync.timeout_s,
    )


def make_learner_group(cfg: RLConfig, spec: Any, *, init_dir: str | None = None) -> Any:
    """A started LearnerGroup of ``cfg.learner.num_workers`` ranks running ``spec`` (Ray connected)."""
    from rlsys.workers.learner import LearnerGroup

    n = cfg.learner.num_workers
    return LearnerGroup(
        spec, n, actor_options=learner_actor_options(cfg, n), init_dir=init_dir, call_timeout_s=cfg.learner.timeout_s
    )


# ================================ the training job's actors ==========================================


@dataclass(frozen=True)
class Actors:
    """The three actor groups of a training job (each already started). The driver codes against the
    Protocols of rlsys.workers, so tests inject in-process fakes (tests/unit/test_driver.py)."""

    rollout: RolloutGroupLike  # RolloutPool
    reward: RewardGroupLike  # RewardGroup
    learners: LearnerGroupLike  # LearnerGroup
    # How a sync moves weights (rlsys.workers.weight_path); None: the object-store path over the
    # two groups' own calls (what the in-process fakes of the unit tests provide).
    weights: Any = None


def make_weight_path(cfg: RLConfig, learners: Any, rollout: Any) -> Any:
    """The started weight path of the resolved ``sync.transport`` between the two groups."""
    from rlsys.workers.weight_path import ObjectStorePath, TorchDistPath

    transport, backend = sync_transport(cfg)
    if transport == "object_store":
        return ObjectStorePath(learners, rollout, sync_bucket_bytes(cfg, transport))
    path = TorchDistPath(
        learners,
        rollout,
        backend=backend,
        bucket_bytes=sync_bucket_bytes(cfg, transport),
        piece_bytes=cfg.sync.piece_mb << 20,
        timeout_s=cfg.sync.timeout_s,
        tp_size=cfg.rollout.tensor_parallel_size,
    )
    path.start()
    return path


def log_compute(cfg: RLConfig, learner_info: list[dict], rollout_info: list[dict]) -> None:
    """One line: the dtype and threads every actor really runs with, and why that dtype."""
    log.info(
        "compute: learners %s, rollout engines %s (model.dtype %s: %s)",
        ", ".join(f"{i['dtype']} x{i['threads']} threads" for i in learner_info),
        ", ".join(f"{i['dtype']} x{i['threads']} threads" for i in rollout_info),
        cfg.model.dtype,
        cfg.model.dtype_reason,
    )


def _shutdown_in_order(started: dict[str, Any]) -> None:
    # Rollout first, then reward, then learners, whichever of them started (the order the driver
    # always used: on a stop the pools kill their actors at once, so nothing writes into a checkpoint
    # being removed). Each shutdown runs even if an earlier one raises.
    with ExitStack() as stack:
        for name in ("learners", "reward", "rollout"):  # ExitStack runs these last-in first-out
            if name in started:
                stack.callback(started[name].shutdown)


@contextmanager
def start_actors(
    cfg: RLConfig,
    model_path: str,
    resume: Path | None,
    out_dir: Path,
    *,
    verifiers: Sequence[str] = (),
    weight_version: int = 0,
) -> Iterator[Actors]:
    """Start the training job's reward pool, then its learner group and rollout pool side by side (the
    engines start on a thread while the learners start here: both take seconds); yield them; shut
    every one that started down on exit (rollout, reward, learners), also when another fails to start.

    ``model_path``: the policy's starting checkpoint. ``resume``: a checkpoint directory to continue
    from (the learners load its state; the rollout engines start from its Hugging Face weights, which
    equal the last pushed ones), or None. ``out_dir``: the run directory (the learners' process-group
    file lives under it). ``verifiers``: the data's verifier specs, checked by the reward pool before
    the learners start. ``weight_version``: the version the starting weights are (a resumed run's
    checkpoint version; completions are labelled with it). Ray must be connected.
    """
    started: dict[str, Any] = {}
    with ExitStack() as stack:
        stack.callback(_shutdown_in_order, started)
        t0 = time.perf_counter()
        started["reward"] = make_reward_pool(cfg)
        started["reward"].validate_specs(sorted(set(verifiers)))  # a bad spec fails before the heavy starts
        transport, _ = sync_transport(cfg)
        ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlsys-rollout-start")
        rollout_future = ex.submit(
            make_rollout_pool,
            cfg,
            str(resume) if resume else model_path,
            transport=transport,
            initial_version=weight_version,
        )
        try:
            try:
                started["learners"] = make_learner_group(
                    cfg, learner_spec(cfg, model_path), init_dir=str(out_dir / ".dist")
                )
                if resume:
                    # Optimizer state, fp32 master weights and RNG of every rank.
                    started["learners"].load_state(str(resume / LEARNER_STATE_DIR))
            except BaseException:
                if not signals.stopping():
                    _shutdown_once_started(rollout_future)
                raise
            started["rollout"] = rollout_future.result()
        finally:
            # On Ctrl-C / SIGTERM never wait for an engine still starting: the stop kills its actor.
            ex.shutdown(wait=not signals.stopping(), cancel_futures=True)
        weights = make_weight_path(cfg, started["learners"], started["rollout"])
        log.info(
            "actors up in %.1f s: %d rollout, %d reward, %d learner workers",
            time.perf_counter() - t0,
            cfg.rollout.num_workers,
            cfg.reward.num_workers,
            cfg.learner.num_workers,
        )
        actors = Actors(
            rollout=started["rollout"], reward=started["reward"], learners=started["learners"], weights=weights
        )
        log_compute(cfg, actors.learners.ready_info, actors.rollout.describe())
        yield actors


# ================================ evaluation actors ===================================================


@contextmanager
def eval_pools(
    cfg: RLConfig, model_path: str, rows: Sequence[Any], *, temperature: float, max_tokens: int
) -> Iterator[tuple[Any, Any]]:
    """Start a RolloutPool and a RewardPool side by side (Ray connected); yield ``(rollout, reward)``;
    shut both down on exit, also when either fails to start.

    The rows' verifier specs are checked against ``reward.allowed_functions`` before anything
    starts and resolved inside the reward actors before the pools are handed out.
    """
    from rlsys.rewards.verifiers import check_spec_allowed

    specs = sorted({r.verifier for r in rows})
    for spec in specs:
        try:
            check_spec_allowed(spec, tuple(cfg.reward.allowed_functions))
        except ValueError as err:
            raise ConfigError(
                f"invalid config reward.allowed_functions={list(cfg.reward.allowed_functions)!r}: {err}"
            ) from None
    t0 = time.perf_counter()
    # The vLLM engine and the verifier sandboxes take seconds each to start: overlap them.
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlsys-rollout-start")
    try:
        rollout_future = ex.submit(make_rollout_pool, cfg, model_path, temperature=temperature, max_tokens=max_tokens)
        reward_pool = None
        try:
            reward_pool = make_reward_pool(cfg)
            reward_pool.validate_specs(specs)
        except BaseException:
            if reward_pool is not None:
                reward_pool.shutdown()
            if not signals.stopping():
                _shutdown_once_started(rollout_future)
            raise
        try:
            rollout_pool = rollout_future.result()
        except BaseException:
            reward_pool.shutdown()
            raise
    finally:
        # On Ctrl-C / SIGTERM never wait for an engine still starting: the stop kills its actor.
        ex.shutdown(wait=not signals.stopping(), cancel_futures=True)
    log.info(
        "actors up in %.1f s: %d rollout, %d reward workers",
        time.perf_counter() - t0,
        rollout_pool.num_workers,
        reward_pool.num_workers,
    )
    try:
        yield rollout_pool, reward_pool
    finally:
        rollout_pool.shutdown()
        reward_pool.shutdown()


def _shutdown_once_started(future: Future) -> None:
    """Wait for a pool that is still starting and shut it down (its own start error is secondary)."""
    try:
        future.result().shutdown()
    except Exception as err:  # noqa: BLE001 - the caller is already raising the primary error
        log.warning("while cleaning up, the rollout pool failed to start or stop: %s", err)


__all__ = [
    "Actors",
    "start_actors",
    "eval_pools",
    "rollout_spec",
    "learner_spec",
    "sft_learner_spec",
    "reward_spec",
    "rollout_threads",
    "learner_actor_options",
    "make_rollout_pool",
    "make_reward_pool",
    "make_learner_group",
    "log_compute",
]
