"""vLLM engines of the rollout workers, as plain classes (no Ray): what one rollout worker runs.

* :class:`RolloutEngine` - vLLM's offline ``LLM``: one blocking ``generate`` call at a time; the engine
  core runs in the caller's process.
* :class:`AsyncRolloutEngine` - vLLM's ``AsyncLLM``: requests in flight while a weight update pauses
  generation (``keep`` mode), transfers, and resumes; each completion records the weight versions
  that sampled its tokens (``Completion.version_spans``).

Both take weights through vLLM's weight-transfer protocol (``sync.transport=torchdist``,
:class:`rlsys.workers.vllm_ext.TorchDistTransferEngine`); :class:`RolloutEngine` also through the
in-process reload hook (``object_store``). The Ray actors around them are in :mod:`rlsys.workers.rollout`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlsys import records
from rlsys.records import Completion, RolloutRequest
from rlsys.workers.vllm_logging import drop_benign_reload_warning

log = logging.getLogger("rlsys.rollout")


@dataclass(frozen=True)
class RolloutSpec:
    """Everything a rollout engine needs; built by the driver from the config."""

    model_path: str
    dtype: str = "bfloat16"
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_model_len: int = 1024
    kv_cache_memory_bytes: int = 256 << 20  # CPU
    gpu_memory_utilization: float = 0.5  # GPU
    enforce_eager: bool = True
    seed: int = 0
    vllm_log_level: str = "WARNING"  # vLLM's own logger inside the worker (its INFO lines are per step)
    trust_remote_code: bool = False  # model.trust_remote_code: run the checkpoint's own modelling code
    # How weights arrive (sync.transport, resolved): "object_store" (rlsys_reload_weights with a lazy
    # iterator of Ray refs) or "torchdist" (vLLM's weight-transfer protocol, rlsys.workers.vllm_ext).
    transport: str = "object_store"
    tensor_parallel_size: int = 1
    # "uni": the model runs in this process (one rank); "mp": vLLM's multiprocessing executor, one
    # process per TP rank (weights then arrive only through "torchdist").
    executor: str = "uni"
    # "llm": vLLM's offline LLM, one blocking generate at a time (RolloutEngine); "async": AsyncLLM,
    # requests in flight across weight updates (AsyncRolloutEngine; torchdist transport only).
    engine: str = "llm"
    # The weight version ``model_path`` holds: 0 for the starting policy, a checkpoint's own when a run
    # resumes from it (every completion is labelled with the version that sampled it).
    initial_version: int = 0


def cpu_bind(tp: int, threads: int, cores: list[int], offset: int = 0) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for an engine of ``tp`` CPU ranks: "0|1" style, one core list per rank.

    The engine's ``threads`` are split evenly among its ranks (at least one core each), taken from
    ``cores`` (this process's affinity) from ``offset`` on, wrapping round: with more ranks than cores
    ranks share a core rather than fail. vLLM's own "auto" binds rank r to NUMA node r, which a
    one-node machine does not have for r > 0."""
    if tp < 1 or not cores:
        raise ValueError(f"cpu_bind needs tp >= 1 and some cores, got tp={tp}, cores={cores}")
    per = max(1, threads // tp)
    lists = []
    for r in range(tp):
        ids = sorted({cores[(offset + r * per + k) % len(cores)] for k in range(per)})
        lists.append(",".join(str(c) for c in ids))
    return "|".join(lists)


@dataclass(frozen=True)
class GenerationStats:
    """What one generate call did (for rollout/* metrics)."""

    num_tokens: int
    seconds: float
    worker_id: int
    restarts: int = 0  # times the pool replaced this worker while serving this call (pool-side)


def _configure_vllm_logging(level: str) -> None:
    """vLLM's logger at ``level`` (before vLLM's import, via its env var; after it, directly) and
    the benign reload warning dropped. Called in the process that owns the engine."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    logging.getLogger("vllm").setLevel(level)
    drop_benign_reload_warning()


def _engine_kwargs(spec: RolloutSpec, worker_id: int, model_elsewhere: bool) -> dict[str, Any]:
    """vLLM engine arguments of ``spec`` (shared by both engines), with the process environment set.

    ``model_elsewhere``: the model's ranks run in other processes than this one (the mp executor, or
    AsyncLLM's engine-core process); on CPU they are then bound to this worker's share of the cores
    (:func:`cpu_bind`), unless the user set ``VLLM_CPU_OMP_THREADS_BIND``."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", spec.vllm_log_level)
    import torch

    _configure_vllm_logging(spec.vllm_log_level)
    if spec.executor not in ("uni", "mp"):
        raise ValueError(f"rollout executor must be uni or mp, got {spec.executor!r}")
    if spec.executor == "uni" and spec.tensor_parallel_size != 1:
        raise ValueError(f"the uni executor runs one rank, got tensor_parallel_size={spec.tensor_parallel_size}")
    kwargs: dict[str, Any] = dict(
        model=spec.model_path,
        dtype=spec.dtype,
        seed=spec.seed,
        enforce_eager=spec.enforce_eager,
        max_model_len=spec.max_model_len,
        trust_remote_code=spec.trust_remote_code,
        worker_extension_cls="rlsys.workers.vllm_ext.WeightReloadExtension",
        distributed_executor_backend=spec.executor,
        tensor_parallel_size=spec.tensor_parallel_size,
        enable_prefix_caching=False,
        # No chunked prefill: vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when
        # a seeded request's prefill is split over scheduler steps, which happens as soon as one
        # call's prompts exceed the step budget (max_num_batched_tokens, 4096 on CPU): about 80
        # sequences of a countdown prompt, i.e. any eval at n >= 64 or G * B > ~80 in training.
        enable_chunked_prefill=False,
    )
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = spec.kv_cache_memory_bytes
        if model_elsewhere and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
            threads = torch.get_num_threads()
            bind = cpu_bind(spec.tensor_parallel_size, threads, cores, offset=worker_id * threads)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            # vLLM sizes each rank's OpenMP pool from its core list, but an inherited
            # MKL_NUM_THREADS (the actor's whole budget) would override it in the rank.
            os.environ["MKL_NUM_THREADS"] = str(len(bind.split("|")[0].split(",")))
            log.info("rollout worker %d: model ranks bound to cores %s", worker_id, bind)
    if spec.transport == "torchdist":
        from rlsys.workers.vllm_ext import TORCHDIST_BACKEND, register_engines

        register_engines()  # an in-process engine's worker is this process
        kwargs["weight_transfer_config"] = {"backend": TORCHDIST_BACKEND}
    elif spec.transport != "object_store":
        raise ValueError(f"rollout transport must be object_store or torchdist, got {spec.transport!r}")
    return kwargs


def _sampling_params(spec: RolloutSpec, group_size: int, seed: int, **extra: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        n=group_size,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        logprobs=0,
        seed=seed,
        **extra,
    )


def _completion(c: Any, spans: tuple[tuple[int, int, int], ...]) -> Completion:
    """A vLLM ``CompletionOutput`` requested with ``logprobs=0`` as a :class:`Completion`."""
    ids = np.asarray(c.token_ids, dtype=np.int32)
    # logprobs=0 returns exactly the sampled token's logprob at each position.
    lps = np.asarray(
        [next(iter(d.values())).logprob if len(d) == 1 else d[int(t)].logprob for d, t in zip(c.logprobs, ids)],
        dtype=np.float32,
    )
    return Completion(
        token_ids=ids, logprobs=lps, text=c.text, finish_reason=c.finish_reason or "length", version_spans=spans
    )


def _check_group_size(worker_id: int, prompt_id: str, got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(
            f"rollout worker {worker_id}: vLLM returned {got} completions for prompt {prompt_id}, expected {want}"
        )


def _init_info(addr: Any, backend: str, timeout_s: float) -> dict[str, Any]:
    """The ``init_info`` of vLLM's ``init_weight_transfer_engine`` (a ``TorchDistInitInfo``)."""
    return {
        "host": addr.host,
        "port": addr.port,
        "world_size": addr.world_size,
        "name": addr.name,
        "backend": backend,
        "timeout_s": timeout_s,
    }


def _update_info(meta: list, version: int, bucket_bytes: int, piece_bytes: int) -> dict[str, Any]:
    """The ``update_info`` of vLLM's ``update_weights`` (a ``TorchDistUpdateInfo``)."""
    return {
        "names": [m.name for m in meta],
        "dtypes": [m.dtype for m in meta],
        "shapes": [list(m.shape) for m in meta],
        "version": int(version),
        "bucket_bytes": int(bucket_bytes),
        "piece_bytes": int(piece_bytes),
    }


def version_spans(weight_versions: Any, num_tokens: int, initial: int = 0) -> tuple[tuple[int, int, int], ...]:
    """vLLM's ``CompletionOutput.weight_versions`` (spans labelled with the string given to
    ``finish_weight_update``) as ``((version, start, end), ...)`` over token indexes [start, end).

    A label that is not an integer (vLLM's "default" before the first update) is ``initial``; None
    (no spans recorded) is one span of ``initial`` over all ``num_tokens``."""
    if not weight_versions:
        return ((initial, 0, num_tokens),) if num_tokens else ()
    out = []
    for span in weight_versions:
        label = str(span.version)
        out.append((int(label) if label.lstrip("-").isdigit() else initial, int(span.start), int(span.end)))
    return tuple(out)


class RolloutEngine:
    """One vLLM engine in this process.

    The engine core always runs in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). With
    ``spec.executor == "uni"`` so does the model (``distributed_executor_backend="uni"``): start-up
    takes seconds, and tensors can be handed to the worker extension directly. With ``"mp"`` each of
    ``spec.tensor_parallel_size`` ranks is a vLLM worker process (on CPU bound to its share of this
    worker's threads, :func:`cpu_bind`); weights then arrive through ``receive_weights`` only.
    """

    def __init__(self, spec: RolloutSpec, worker_id: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.spec = spec
        self.worker_id = worker_id
        self.weight_version = spec.initial_version
        # Set when a weight transfer failed part-way: vLLM's layerwise reload has then moved layers off
        # the model and nothing restores them, so the engine must not sample again (the pool replaces it).
        self.broken: str | None = None
        kwargs = _engine_kwargs(spec, worker_id, model_elsewhere=spec.executor == "mp")
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        log.info(
            "rollout worker %d: vLLM engine up in %.1f s (%s)", worker_id, time.perf_counter() - t0, spec.model_path
        )

    def generate(
        self, requests: list[RolloutRequest], group_size: int, seeds: list[int]
    ) -> tuple[list[records.RolloutGroup], GenerationStats]:
        """Sample ``group_size`` completions for each request.

        ``seeds[i]`` seeds request i's sampler, so a group is a function of (weights, prompt, seed):
        re-issuing a prompt after a worker restart reproduces it.
        """
        self._check_usable()
        if len(seeds) != len(requests):
            raise ValueError(f"got {len(seeds)} seeds for {len(requests)} requests")
        if not requests:
            return [], GenerationStats(0, 0.0, self.worker_id)
        params = [_sampling_params(self.spec, group_size, seed) for seed in seeds]
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        t0 = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        groups = []
        num_tokens = 0
        for req, out in zip(requests, outputs):
            # One blocking call samples every token under the current weights.
            completions = tuple(
                _completion(c, ((self.weight_version, 0, len(c.token_ids)),) if len(c.token_ids) else ())
                for c in out.outputs
            )
            num_tokens += sum(len(c.token_ids) for c in completions)
            _check_group_size(self.worker_id, req.prompt_id, len(completions), group_size)
            groups.append(
                records.RolloutGroup(
                    prompt_id=req.prompt_id,
                    prompt_token_ids=req.prompt_token_ids,
                    completions=completions,
                    weight_version=self.weight_version,
                    worker_id=self.worker_id,
                )
            )
        return groups, GenerationStats(num_tokens, seconds, self.worker_id)

    def load_weights(self, weights: Iterable[tuple[str, Any]], version: int) -> int:
        """Load checkpoint-format weights (lazily iterated) and set the weight version.

        Returns the number of tensors loaded. In-process (uni executor) engines only: the iterator
        cannot cross into a worker process.
        """
        if self.spec.executor != "uni":
            raise RuntimeError(
                f"rollout worker {self.worker_id}: its {self.spec.executor} executor runs the model in other "
                "processes; weights reach it through sync.transport=torchdist only"
            )
        names = self.llm.collective_rpc("rlsys_reload_weights", args=(weights,))[0]
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return len(names)

    def join_weight_group(self, addr: Any, backend: str, timeout_s: float) -> None:
        """Join the transfer group at ``addr`` (a :class:`rlsys.workers.torchdist.GroupAddress`), every TP
        rank at once; blocks until the learner's end has joined too."""
        info = _init_info(addr, backend, timeout_s)
        self.llm.init_weight_transfer_engine({"init_info": info})

    def receive_weights(self, meta: list, version: int, bucket_bytes: int, piece_bytes: int) -> list[dict]:
        """Take one weight stream from the transfer group as ``version`` (vLLM's start / update /
        finish sequence); return each TP rank's ``{"version", "digest", "nbytes"}`` of what it received.

        On a failure part-way the engine is marked broken (it holds half-updated weights) and raises."""
        self._check_usable()
        info = _update_info(meta, version, bucket_bytes, piece_bytes)
        try:
            self.llm.start_weight_update()
            self.llm.update_weights({"update_info": info})
            self.llm.finish_weight_update(weight_version=str(version))
        except BaseException as exc:
            self.broken = f"weight transfer v{version} failed part-way: {type(exc).__name__}: {exc}"
            raise
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        return list(self.llm.collective_rpc("rlsys_transfer_state"))

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"rollout worker {self.worker_id} must be restarted before it samples again: {self.broken}"
            )

    def describe(self) -> dict:
        """``{"dtype": the engine's model dtype, "threads": compute threads of all its ranks, "pid",
        "ranks": [{"threads", "pid"} per TP rank]}`` (with the uni executor the one rank is this process)."""
        dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        ranks = list(self.llm.collective_rpc("rlsys_describe"))
        return {"dtype": dtype, "threads": sum(r["threads"] for r in ranks), "pid": os.getpid(), "ranks": ranks}

    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log p(token_t | tokens_<t) for t = 1..L-1 under the engine's current weights: [L - 1]."""
        from vllm import SamplingParams

        self._check_usable()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self.llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)[0]
        lps = []
        for tok, d in zip(token_ids[1:], out.prompt_logprobs[1:]):
            lps.append(d[int(tok)].logprob)
        return np.asarray(lps, dtype=np.float32)

    def shutdown(self) -> None:
        """Release the engine (vLLM leaks shared-memory segments if an actor dies holding one)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except AttributeError:
            pass
        del llm
        import gc

        gc.collect()


class AsyncRolloutEngine:
    """One vLLM ``AsyncLLM``: generate calls overlap each other and weight updates (issue 13, item 6).

    Call every method from one asyncio event loop (a Ray async actor's). The engine core runs in a
    process of its own (``AsyncLLM`` always does), holding the model in-process (``uni``) or over TP
    rank processes (``mp``); on CPU those are bound to this worker's cores. Weights arrive only
    through ``receive_weights`` (vLLM's weight-transfer protocol, ``sync.transport=torchdist``):

    1. ``pause_generation(mode="keep")`` freezes the requests in flight where they are (their KV cache
       is kept; nothing is aborted or lost);
    2. ``start_weight_update`` / ``update_weights`` / ``finish_weight_update(version)`` replace the weights;
    3. ``resume_generation`` lets the frozen requests continue under the new weights.

    So one completion may hold tokens of two versions; its ``version_spans`` (from vLLM's per-token
    ``weight_versions``) say which. Weight updates are serialised; a failed one leaves the engine
    paused and marked broken (half-updated weights must never sample): the caller replaces it.
    """

    def __init__(self, spec: RolloutSpec, worker_id: int = 0):
        import asyncio

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.spec = spec
        self.worker_id = worker_id
        self.weight_version = spec.initial_version  # the latest received (in-flight requests may hold older tokens)
        self.broken: str | None = None
        self._requests = 0
        self._update_lock = asyncio.Lock()
        self.last_pause_s = 0.0  # how long the latest update kept generation paused
        t0 = time.perf_counter()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**_engine_kwargs(spec, worker_id, model_elsewhere=True)))
        log.info(
            "rollout worker %d: vLLM AsyncLLM up in %.1f s (%s)", worker_id, time.perf_counter() - t0, spec.model_path
        )

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"rollout worker {self.worker_id} must be restarted before it samples again: {self.broken}"
            )

    async def _sample(self, request: RolloutRequest, params: Any) -> Any:
        self._requests += 1
        final = None
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        async for out in self.llm.generate(prompt, params, request_id=f"{request.prompt_id}#{self._requests}"):
            final = out
        if final is None:
            raise RuntimeError(f"rollout worker {self.worker_id}: vLLM returned nothing for {request.prompt_id}")
        return final

    async def generate(
        self, requests: list[RolloutRequest], group_size: int, seeds: list[int]
    ) -> tuple[list[records.RolloutGroup], GenerationStats]:
        """Like :meth:`RolloutEngine.generate`, but other calls (more prompts, a weight update) may run
        meanwhile; each group's ``weight_version`` is the oldest version among its tokens."""
        import asyncio

        from vllm.sampling_params import RequestOutputKind

        self._check_usable()
        if len(seeds) != len(requests):
            raise ValueError(f"got {len(seeds)} seeds for {len(requests)} requests")
        t0 = time.perf_counter()
        start_version = self.weight_version
        outs = await asyncio.gather(
            *(
                self._sample(r, _sampling_params(self.spec, group_size, s, output_kind=RequestOutputKind.FINAL_ONLY))
                for r, s in zip(requests, seeds)
            )
        )
        seconds = time.perf_counter() - t0
        groups, num_tokens = [], 0
        for req, out in zip(requests, outs):
            completions = tuple(
                _completion(c, version_spans(c.weight_versions, len(c.token_ids), start_version)) for c in out.outputs
            )
            _check_group_size(self.worker_id, req.prompt_id, len(completions), group_size)
            num_tokens += sum(len(c.token_ids) for c in completions)
            versions = [v for c in completions for v, _, _ in c.version_spans]
            groups.append(
                records.RolloutGroup(
                    prompt_id=req.prompt_id,
                    prompt_token_ids=req.prompt_token_ids,
                    completions=completions,
                    weight_version=min(versions, default=start_version),
                    worker_id=self.worker_id,
                )
            )
        return groups, GenerationStats(num_tokens, seconds, self.worker_id)

    async def join_weight_group(self, addr: Any, backend: str, timeout_s: float) -> None:
        """As :meth:`RolloutEngine.join_weight_group`."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        info = _init_info(addr, backend, timeout_s)
        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=info))

    async def receive_weights(self, meta: list, version: int, bucket_bytes: int, piece_bytes: int) -> list[dict]:
        """Pause (keep), take one weight stream as ``version``, resume; returns each TP rank's transfer
        state, with ``pause_s`` (how long generation was frozen) added."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self._check_usable()
        info = _update_info(meta, version, bucket_bytes, piece_bytes)
        async with self._update_lock:
            t0 = time.perf_counter()
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            try:
                await self.llm.start_weight_update()
                await self.llm.update_weights(WeightTransferUpdateRequest(update_info=info))
                await self.llm.finish_weight_update(weight_version=str(version))
            except BaseException as exc:
                # Stays paused: the frozen requests must not continue on half-updated weights.
                self.broken = f"weight transfer v{version} failed part-way: {type(exc).__name__}: {exc}"
                raise
            self.weight_version = int(version)
            await self.llm.resume_generation()
            self.last_pause_s = time.perf_counter() - t0
        states = list(await self.llm.collective_rpc("rlsys_transfer_state"))
        return [{**s, "pause_s": self.last_pause_s} for s in states]

    async def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """As :meth:`RolloutEngine.sequence_logprobs`, under the latest weights received."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_usable()
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, temperature=1.0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        out = await self._sample(RolloutRequest("probe", tuple(token_ids)), params)
        return np.asarray([d[int(t)].logprob for t, d in zip(token_ids[1:], out.prompt_logprobs[1:])], np.float32)

    async def describe(self) -> dict:
        """As :meth:`RolloutEngine.describe` (the ranks live in the engine-core process or its workers)."""
        dtype = str(self.llm.model_config.dtype).removeprefix("torch.")
        ranks = list(await self.llm.collective_rpc("rlsys_describe"))
        return {"dtype": dtype, "threads": sum(r["threads"] for r in ranks), "pid": os.getpid(), "ranks": ranks}

    async def vllm_weight_version(self) -> str:
        return str(await self.llm.get_weight_version())

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()
