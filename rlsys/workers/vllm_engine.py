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


class _DropBenignReloadWarning(logging.Filter):
    """Drops vLLM's per-sync "RotaryEmbedding: Failed to load weights" warning.

    On a weight reload vLLM 0.32 warns for every layer that has loadable tensors but got none from
    the checkpoint; for RotaryEmbedding that tensor is the derived cos/sin cache, never in a
    checkpoint, and vLLM puts the original back. So the warning fires on every sync and means
    nothing; a real failure still shows for any other layer, and the per-sync probe check
    (``sync/logprob_diff``) fails the run if the weights did not land.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


# The vLLM module that logs the warning above. A filter on a logger sees the records created on that
# logger (not those of its children), and vLLM attaches its handlers only when the engine starts, so
# the filter sits here. If vLLM moves the module the warning simply reappears.
_VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _configure_vllm_logging(level: str) -> None:
    """vLLM's logger at ``level`` (before vLLM's import, via its env var; after it, directly) and
    the benign reload warning dropped. Called in the process that owns the engine."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    logging.getLogger("vllm").setLevel(level)
    reload_log = logging.getLogger(_VLLM_RELOAD_LOGGER)
    if not any(isinstance(f, _DropBenignReloadWarning) for f in reload_log.filters):
        reload_log.addFilter(_DropBenignReloadWarning())


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
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", spec.vllm_log_level)
        import torch
        from vllm import LLM

        _configure_vllm_logging(spec.vllm_log_level)

        self.spec = spec
        self.worker_id = worker_id
        self.weight_version = 0
        # Set when a weight transfer failed part-way: vLLM's layerwise reload has then moved layers off
        # the model and nothing restores them, so the engine must not sample again (the pool replaces it).
        self.broken: str | None = None
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
        if spec.executor not in ("uni", "mp"):
            raise ValueError(f"rollout executor must be uni or mp, got {spec.executor!r}")
        if spec.executor == "uni" and spec.tensor_parallel_size != 1:
            raise ValueError(f"the uni executor runs one rank, got tensor_parallel_size={spec.tensor_parallel_size}")
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = spec.kv_cache_memory_bytes
            if spec.executor == "mp" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
                threads = torch.get_num_threads()
                bind = cpu_bind(spec.tensor_parallel_size, threads, cores, offset=worker_id * threads)
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
                # vLLM sizes each rank's OpenMP pool from its core list, but an inherited
                # MKL_NUM_THREADS (the actor's whole budget) would override it in the rank.
                os.environ["MKL_NUM_THREADS"] = str(len(bind.split("|")[0].split(",")))
                log.info("rollout worker %d: TP ranks bound to cores %s", worker_id, bind)
        if spec.transport == "torchdist":
            from rlsys.workers.vllm_ext import TORCHDIST_BACKEND, register_engines

            register_engines()  # the in-process engine's worker is this process
            kwargs["weight_transfer_config"] = {"backend": TORCHDIST_BACKEND}
        elif spec.transport != "object_store":
            raise ValueError(f"rollout transport must be object_store or torchdist, got {spec.transport!r}")
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
        from vllm import SamplingParams

        self._check_usable()
        if len(seeds) != len(requests):
            raise ValueError(f"got {len(seeds)} seeds for {len(requests)} requests")
        if not requests:
            return [], GenerationStats(0, 0.0, self.worker_id)
        params = [
            SamplingParams(
                n=group_size,
                max_tokens=self.spec.max_tokens,
                temperature=self.spec.temperature,
                top_p=self.spec.top_p,
                logprobs=0,
                seed=seed,
            )
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        t0 = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        groups = []
        num_tokens = 0
        for req, out in zip(requests, outputs):
            completions = []
            for c in out.outputs:
                ids = np.asarray(c.token_ids, dtype=np.int32)
                # logprobs=0 returns exactly the sampled token's logprob at each position.
                lps = np.asarray(
                    [
                        next(iter(d.values())).logprob if len(d) == 1 else d[int(t)].logprob
                        for d, t in zip(c.logprobs, ids)
                    ],
                    dtype=np.float32,
                )
                completions.append(
                    Completion(token_ids=ids, logprobs=lps, text=c.text, finish_reason=c.finish_reason or "length")
                )
                num_tokens += len(ids)
            if len(completions) != group_size:
                raise RuntimeError(
                    f"rollout worker {self.worker_id}: vLLM returned {len(completions)} "
                    f"completions for prompt {req.prompt_id}, expected {group_size}"
                )
            groups.append(
                records.RolloutGroup(
                    prompt_id=req.prompt_id,
                    prompt_token_ids=req.prompt_token_ids,
                    completions=tuple(completions),
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
        info = {
            "host": addr.host,
            "port": addr.port,
            "world_size": addr.world_size,
            "name": addr.name,
            "backend": backend,
            "timeout_s": timeout_s,
        }
        self.llm.init_weight_transfer_engine({"init_info": info})

    def receive_weights(self, meta: list, version: int, bucket_bytes: int, piece_bytes: int) -> list[dict]:
        """Take one weight stream from the transfer group as ``version`` (vLLM's start / update /
        finish sequence); return each TP rank's ``{"version", "digest", "nbytes"}`` of what it received.

        On a failure part-way the engine is marked broken (it holds half-updated weights) and raises."""
        self._check_usable()
        info = {
            "names": [m.name for m in meta],
            "dtypes": [m.dtype for m in meta],
            "shapes": [list(m.shape) for m in meta],
            "version": int(version),
            "bucket_bytes": int(bucket_bytes),
            "piece_bytes": int(piece_bytes),
        }
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
