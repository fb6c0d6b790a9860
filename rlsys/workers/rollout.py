"""Rollout workers: each owns one vLLM engine and samples G completions per prompt.

``RolloutEngine`` is a plain class (testable without Ray); ``RolloutWorker`` is its thin Ray actor;
``RolloutPool`` is the driver-side handle that spreads prompts over the workers and joins the
results back by prompt id.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from rlsys.records import Completion, RolloutGroup, RolloutRequest

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


@dataclass(frozen=True)
class GenerationStats:
    """What one generate call did (for rollout/* metrics)."""

    num_tokens: int
    seconds: float
    worker_id: int


class RolloutEngine:
    """One vLLM engine in this process.

    On CPU the engine runs in the caller's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
    ``distributed_executor_backend="uni"``): start-up takes seconds instead of a minute, and
    tensors can be handed to the worker extension directly.
    """

    def __init__(self, spec: RolloutSpec, worker_id: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        import torch
        from vllm import LLM

        self.spec = spec
        self.worker_id = worker_id
        self.weight_version = 0
        kwargs: dict[str, Any] = dict(
            model=spec.model_path,
            dtype=spec.dtype,
            seed=spec.seed,
            enforce_eager=spec.enforce_eager,
            max_model_len=spec.max_model_len,
            worker_extension_cls="rlsys.workers.vllm_ext.WeightReloadExtension",
            distributed_executor_backend="uni",
            enable_prefix_caching=False,
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = spec.kv_cache_memory_bytes
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        log.info("rollout worker %d: vLLM engine up in %.1f s (%s)", worker_id, time.perf_counter() - t0,
                 spec.model_path)

    def generate(self, requests: list[RolloutRequest], group_size: int, seeds: list[int]) -> tuple[
            list[RolloutGroup], GenerationStats]:
        """Sample ``group_size`` completions for each request.

        ``seeds[i]`` seeds request i's sampler, so a group is a function of (weights, prompt, seed):
        re-issuing a prompt after a worker restart reproduces it.
        """
        from vllm import SamplingParams

        if len(seeds) != len(requests):
            raise ValueError(f"got {len(seeds)} seeds for {len(requests)} requests")
        if not requests:
            return [], GenerationStats(0, 0.0, self.worker_id)
        params = [
            SamplingParams(n=group_size, max_tokens=self.spec.max_tokens, temperature=self.spec.temperature,
                           top_p=self.spec.top_p, logprobs=0, seed=seed)
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
                lps = np.asarray([next(iter(d.values())).logprob if len(d) == 1 else d[int(t)].logprob
                                  for d, t in zip(c.logprobs, ids)], dtype=np.float32)
                completions.append(Completion(token_ids=ids, logprobs=lps, text=c.text,
                                              finish_reason=c.finish_reason or "length"))
                num_tokens += len(ids)
            if len(completions) != group_size:
                raise RuntimeError(f"rollout worker {self.worker_id}: vLLM returned {len(completions)} "
                                   f"completions for prompt {req.prompt_id}, expected {group_size}")
            groups.append(RolloutGroup(prompt_id=req.prompt_id, prompt_token_ids=req.prompt_token_ids,
                                       completions=tuple(completions), weight_version=self.weight_version,
                                       worker_id=self.worker_id))
        return groups, GenerationStats(num_tokens, seconds, self.worker_id)

    def load_weights(self, weights: Iterable[tuple[str, Any]], version: int) -> int:
        """Load checkpoint-format weights (lazily iterated) and set the weight version.

        Returns the number of tensors loaded.
        """
        names = self.llm.collective_rpc("rlsys_reload_weights", args=(weights,))[0]
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return len(names)

    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log p(token_t | tokens_<t) for t = 1..L-1 under the engine's current weights: [L - 1]."""
        from vllm import SamplingParams

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


def _iter_bucket_refs(refs: list) -> Iterator[tuple[str, Any]]:
    """Pull weight buckets from Ray's object store one at a time (bounded memory)."""
    import ray

    from rlsys.workers.weight_sync import unpack_bucket

    for ref in refs:
        bucket = ray.get(ref)
        yield from unpack_bucket(bucket)
        del bucket


class RolloutWorkerActor:
    """Ray actor shell around RolloutEngine (heavy imports happen in the engine's constructor)."""

    def __init__(self, spec: RolloutSpec, worker_id: int):
        self.engine = RolloutEngine(spec, worker_id)

    def ready(self) -> int:
        return self.engine.worker_id

    def pid(self) -> int:
        return os.getpid()

    def generate(self, requests: list[RolloutRequest], group_size: int, seeds: list[int]):
        return self.engine.generate(requests, group_size, seeds)

    def load_weight_buckets(self, bucket_refs: list, version: int) -> int:
        # The refs arrive inside a list, so Ray does not resolve them eagerly: each bucket is
        # fetched only when the loader reaches it.
        return self.engine.load_weights(_iter_bucket_refs(bucket_refs), version)

    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        return self.engine.sequence_logprobs(token_ids)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutPool:
    """Driver-side handle over ``num_workers`` rollout actors."""

    def __init__(self, spec: RolloutSpec, num_workers: int, num_cpus: float, num_gpus: float = 0.0,
                 timeout_s: float = 600.0, ready_timeout_s: float = 600.0):
        import ray

        from rlsys.cluster import actor_options

        self.spec = spec
        self.timeout_s = timeout_s
        remote_cls = ray.remote(RolloutWorkerActor)
        self.workers = [
            remote_cls.options(**actor_options(num_cpus, num_gpus)).remote(spec, i) for i in range(num_workers)
        ]
        for i, w in enumerate(self.workers):
            try:
                ray.get(w.ready.remote(), timeout=ready_timeout_s)
            except Exception as e:  # noqa: BLE001 - re-raised with the actor named
                raise RuntimeError(f"rollout worker {i} failed to start its vLLM engine from "
                                   f"{spec.model_path}: {e}") from e

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def generate(self, requests: list[RolloutRequest], group_size: int, seeds: dict[str, int]) -> tuple[
            list[RolloutGroup], list[GenerationStats]]:
        """Spread requests over the workers; return one group per request, in request order.

        Results are joined by prompt id; a missing or duplicated group is an error, never a silent
        loss. ``seeds`` maps prompt id -> sampler seed.
        """
        import ray

        shards: list[list[RolloutRequest]] = [[] for _ in self.workers]
        for i, r in enumerate(requests):
            shards[i % len(self.workers)].append(r)
        pending = {}
        for i, (w, shard) in enumerate(zip(self.workers, shards)):
            if shard:
                pending[i] = w.generate.remote(shard, group_size, [seeds[r.prompt_id] for r in shard])
        by_id: dict[str, RolloutGroup] = {}
        stats = []
        for i, ref in pending.items():
            try:
                groups, st = ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                raise TimeoutError(f"phase rollout: worker {i} did not return {len(shards[i])} groups within "
                                   f"rollout.timeout_s={self.timeout_s:g} s") from e
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"phase rollout: worker {i} failed: {e}") from e
            stats.append(st)
            for g in groups:
                if g.prompt_id in by_id:
                    raise RuntimeError(f"phase rollout: prompt {g.prompt_id} came back twice")
                by_id[g.prompt_id] = g
        missing = [r.prompt_id for r in requests if r.prompt_id not in by_id]
        if missing:
            raise RuntimeError(f"phase rollout: no group came back for prompts {missing[:5]}")
        return [by_id[r.prompt_id] for r in requests], stats

    def load_weight_buckets(self, bucket_refs: list, version: int) -> list[int]:
        import ray

        refs = [w.load_weight_buckets.remote(bucket_refs, version) for w in self.workers]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=self.timeout_s))
            except Exception as e:  # noqa: BLE001 - re-raised with the actor named
                raise RuntimeError(f"phase sync: rollout worker {i} failed to load weights v{version}: {e}") from e
        return out

    def sequence_logprobs(self, token_ids: list[int], worker: Optional[int] = None) -> list[np.ndarray]:
        """Probe logprobs from every worker (or one): one [L - 1] array per worker."""
        import ray

        targets = self.workers if worker is None else [self.workers[worker]]
        return ray.get([w.sequence_logprobs.remote(token_ids) for w in targets], timeout=self.timeout_s)

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.get(w.shutdown.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - best effort at teardown, logged
                log.warning("rollout worker shutdown failed: %s", e)
            ray.kill(w)
        self.workers = []
