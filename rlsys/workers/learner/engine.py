"""One data-parallel learner rank: DeepSpeed ZeRO 0-3 policy optimisation in one process.

:class:`Learner` loads the Hugging Face model, joins the process group (gloo on CPU, nccl on GPU,
selected by ``torch.cuda.is_available()``), wraps the model in a DeepSpeed engine, and runs
:meth:`Learner.train_step` / :meth:`Learner.compute_logprobs`. Weight export lives in
:mod:`.export` and the resumable state in :mod:`.state`; the Learner's methods of those names call them.

Exact gradients (the central contract). The loss of a micro-batch is
``policy_loss(..., normalizer=batch.loss_normalizer)``, i.e. "sum of its per-row terms / the
GLOBAL normalizer", so the micro-batch losses of all ranks sum to the full-batch loss. DeepSpeed
would (1) divide each micro-batch loss by ``gradient_accumulation_steps`` and (2) average the
gradients over data-parallel ranks. The learner neutralises both: the DeepSpeed config says
``gradient_accumulation_steps: 1`` and the accumulation boundary is set by hand
(``engine.set_gradient_accumulation_boundary``, True only on the last micro-batch), backward runs
with ``scale_wrt_gas=False``, and each micro-batch loss is multiplied by ``world_size`` before
backward, which the rank average divides out again. The gradient applied is therefore exactly the
gradient of the full global-batch loss, for any micro-batch size and any number of ranks
(``tests/integration/test_learner.py::test_gradient_exact_across_ranks_and_micro_batches`` checks
it against a single-process PyTorch reference step).

Lock-step: ZeRO reduces gradients (and ZeRO-3 gathers parameters) with one collective per
micro-batch, so every rank must run the same number of micro-batches; the learner checks that
with one small all-reduce before each phase and fails on every rank with the same message rather
than hanging. :func:`rlsys.workers.batching.shard_train_batch` produces such shards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlsys.algo.logprobs import LogprobHead, auto_chunk_tokens
from rlsys.algo.losses import policy_loss
from rlsys.records import TrainBatch, TrainStats
from rlsys.workers.batching import iter_micro_batches, num_micro_batches
from rlsys.workers.learner import export, state
from rlsys.workers.learner.errors import LearnerError
from rlsys.workers.learner.spec import LearnerSpec, _lr_factor
from rlsys.workers.torchdist import TensorMeta
from rlsys.workers.weight_sync import WeightBucket

log = logging.getLogger("rlsys.learner")

__all__ = ["Learner"]

# The per-rank sums one train step all-reduces (ONE collective), then reads back by name: token-weighted
# sums (value * tokens) of the per-micro-batch means, plain sums of the rest. Order is the wire layout.
_STEP_SUMS = (
    "loss",  # sum of the micro-batch losses = the global loss
    "tokens",  # response tokens
    "pg_loss",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "ratio_mean",
    "kl",  # k3 KL to the reference policy (0 without one)
    "rollout_logprob_diff",  # sum over response tokens of |pi_old - pi_rollout| (already per token)
    "nonfinite_loss",  # 1 on a rank whose loss was not finite
    "sequences",  # rows with at least one response token
    "tis_weight_mean",
    "tis_clip_fraction",
)
# Of those, the ones policy_loss reports as per-token means over a micro-batch (weighted by its tokens).
_TOKEN_WEIGHTED = (
    "pg_loss",
    "clip_fraction",
    "approx_kl",
    "entropy",
    "ratio_mean",
    "kl",
    "tis_weight_mean",
    "tis_clip_fraction",
)


class _PolicyModule(torch.nn.Module):
    """What DeepSpeed wraps: HF decoder -> chunked log-prob head (the HF ``forward`` is not used).

    ``forward(input_ids [B, L], attention_mask [B, L], response_mask [B, L], entropy_grad)`` ->
    ``(logprobs [B, L], entropy [B, L])`` float32, aligned with ``input_ids``, 0 off-response.
    The head (:class:`rlsys.algo.logprobs.LogprobHead`) holds the HF output embedding's own
    Parameter(s), so ZeRO-3 gathers them for its forward and backward through its module hooks.
    """

    def __init__(self, hf_model: Any, chunk_tokens: int) -> None:  # a transformers PreTrainedModel
        super().__init__()
        self.hf = hf_model
        # Gemma 2's final-logit soft-cap lives in the HF forward, which the head replaces: apply it here.
        softcap = getattr(hf_model.config, "final_logit_softcapping", None)
        self.head = LogprobHead(hf_model.get_output_embeddings(), chunk_tokens, softcap)

    def forward(self, input_ids, attention_mask, response_mask, entropy_grad: bool = False):
        decoder = getattr(self.hf, self.hf.base_model_prefix)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden, input_ids, response_mask, entropy_grad)


class Learner:
    """One data-parallel learner rank (see the module docstring for the gradient contract).

    ``spec`` must be identical on every rank; ``init_file`` is the ``file://`` rendezvous of the
    process group (a fresh absolute path every rank sees).

    Collectives (every rank must call them, in the same order, with the same number of
    micro-batches): the constructor, :meth:`train_step`, :meth:`compute_logprobs`,
    :meth:`iter_named_weights` (under ZeRO-3 it gathers), :meth:`save_hf`, :meth:`save_state`,
    :meth:`load_state`.
    """

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, init_file: str) -> None:
        t0 = time.perf_counter()
        spec.validate()
        if not (0 <= rank < world_size):
            raise ValueError(f"learner rank {rank} is outside [0, world_size={world_size})")
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self._deepspeed = deepspeed
        self.applied_steps = 0  # optimizer steps applied so far (skipped steps do not count); part of the state
        torch.manual_seed(spec.seed)
        self.device = self._init_distributed(init_file)
        self.torch_dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
        self.ds_config = self._ds_config()

        hf = self._load_model(spec.model_path, trainable=True)
        if spec.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf = hf
        chunk = spec.logprob_chunk_tokens or auto_chunk_tokens(hf.config.vocab_size)
        self.policy = _PolicyModule(hf, chunk)

        optimizer = torch.optim.AdamW(
            self._param_groups(self.policy),
            lr=spec.lr,
            betas=(spec.betas[0], spec.betas[1]),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
        warmup = spec.warmup_steps
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_factor(warmup, k)),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.ref_engine = self._init_reference() if spec.kl_coef > 0 else None
        self.init_seconds = time.perf_counter() - t0

    # ---- set-up ---------------------------------------------------------------------------------

    def _load_model(self, model_path: str, trainable: bool) -> Any:  # a transformers PreTrainedModel
        """The HF causal LM in the training dtype; under ZeRO-3 built already partitioned.

        ZeRO-3: the module is constructed inside ``deepspeed.zero.Init`` (each rank allocates only its
        partition) and the safetensors weights are streamed in one tensor at a time, rank 0 reading
        and scattering each (``GatheredParameters(modifier_rank=0)``), so no rank ever holds a full
        copy. (transformers' own route, ``HfDeepSpeedConfig``, needs ``accelerate``, which this
        stack does not install.) Other stages: plain ``from_pretrained``.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if not os.path.isdir(model_path):
            raise FileNotFoundError(
                f"learner rank {self.rank}: model path {model_path!r} is not a directory on "
                f"this node ({os.uname().nodename}); model.path must be a Hugging Face "
                "checkpoint directory visible to every learner"
            )
        try:
            if self.spec.zero_stage != 3:
                hf = AutoModelForCausalLM.from_pretrained(
                    model_path,
                    dtype=self.torch_dtype,
                    attn_implementation="sdpa",
                    trust_remote_code=self.spec.trust_remote_code,
                )
            else:
                from transformers.initialization import no_init_weights

                config = AutoConfig.from_pretrained(model_path, trust_remote_code=self.spec.trust_remote_code)
                # no_init_weights: random init would index into already-partitioned (empty) tensors, and
                # every weight is overwritten from the checkpoint anyway. No dtype= for zero.Init: in
                # DeepSpeed 0.19.8 an explicit dtype is overridden by bf16 on accelerators without fp16
                # (CPU); the dtype it derives from the config (bf16 enabled or not) is the right one.
                with no_init_weights(), self._deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                    hf = AutoModelForCausalLM.from_config(config, dtype=self.torch_dtype, attn_implementation="sdpa")
                # Construction under no_init_weights skips the tying of input/output embeddings; redo it
                # (a no-op for untied models) before loading, so the tied matrix is one parameter.
                hf.tie_weights()
                self._load_partitioned(hf, Path(model_path))
        except Exception as e:
            raise RuntimeError(
                f"learner rank {self.rank}: cannot load the model from {model_path!r} "
                f"({type(e).__name__}: {e}); model.path must be a Hugging Face checkpoint "
                "directory with safetensors weights"
            ) from e
        hf.config.use_cache = False
        if not trainable:
            hf.eval()
        return hf

    def _load_partitioned(self, hf: torch.nn.Module, model_dir: Path) -> None:
        """Copy safetensors weights into a ZeRO-3 partitioned model (collective)."""
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        params = dict(hf.named_parameters(remove_duplicate=False))
        loaded: set[int] = set()
        for fname in files:
            # Every rank walks the same key list (from the file), so the gathers line up.
            with safe_open(str(model_dir / fname), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    p = params.get(key)
                    if p is None:
                        continue  # e.g. buffers saved by older exporters
                    shape, expected = tuple(f.get_slice(key).get_shape()), tuple(getattr(p, "ds_shape", p.shape))
                    if shape != expected:  # checked on every rank before the gather: no rank left waiting
                        raise ValueError(f"checkpoint tensor {key} has shape {shape}, the model expects {expected}")
                    with self._deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if self.rank == 0:
                            p.data.copy_(f.get_tensor(key).to(p.dtype))
                    loaded.add(id(p))
        missing = sorted(n for n, p in params.items() if id(p) not in loaded)
        if missing:
            raise ValueError(
                f"checkpoint {model_dir} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )

    def _init_distributed(self, init_file: str) -> torch.device:
        """Join the process group through ``file://init_file``; return this rank's device."""
        import datetime

        import torch.distributed as dist

        if torch.cuda.is_available():
            backend = "nccl"
            # Under Ray each actor sees only its own GPU(s); without num_gpus it may see several.
            index = 0 if torch.cuda.device_count() == 1 else self.rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
        else:
            backend = "gloo"
            index = 0
            device = torch.device("cpu")
            # gloo picks an interface by resolving the hostname, which may not be reachable (and
            # may be a public interface); ranks share a file system, so they share a host: loopback.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # DeepSpeed reads these to place the engine; torch.distributed itself uses the file store.
        os.environ.setdefault("LOCAL_RANK", str(index))
        os.environ["RANK"] = str(self.rank)
        os.environ["WORLD_SIZE"] = str(self.world_size)
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    backend,
                    init_method=f"file://{init_file}",
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout=datetime.timedelta(seconds=self.spec.dist_timeout_s),
                )
            except Exception as e:
                parent = os.path.dirname(init_file)
                why = (
                    f"its directory {parent!r} does not exist here (cwd {os.getcwd()!r}): the init file must be "
                    "an absolute path on a file system every learner shares"
                    if not os.path.isdir(parent)
                    else "a stale init file from an earlier run makes ranks disagree: delete it, or give a fresh path"
                )
                raise RuntimeError(
                    f"learner rank {self.rank}/{self.world_size}: joining the {backend} process group via "
                    f"file://{init_file} failed ({type(e).__name__}: {e}); {why}"
                ) from e
        self._deepspeed.init_distributed(dist_backend=backend)
        return device

    def _ds_config(self) -> dict[str, Any]:
        spec = self.spec
        cfg: dict[str, Any] = {
            # GAS 1 + a hand-set boundary: DeepSpeed never divides by an accumulation count; the
            # number of micro-batches may change from step to step (see the module docstring).
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": spec.micro_batch_size * self.world_size,
            "gradient_clipping": float(spec.grad_clip),
            "zero_optimization": {"stage": spec.zero_stage},
            "zero_allow_untested_optimizer": True,  # torch.optim.AdamW (avoids FusedAdam's JIT build)
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if spec.dtype == "bfloat16":
            # check_grad_overflow: a non-finite gradient norm skips the step (and zeroes the grads)
            # in bf16 too; in fp32 ZeRO does it unconditionally.
            cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}
            if spec.zero_stage >= 1:
                # Accumulate micro-batch gradients in fp32 (bf16 sums lose low bits fast).
                cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        return cfg

    @staticmethod
    def _param_groups(module: torch.nn.Module) -> list[dict]:
        """AdamW groups: matrices decay, vectors (biases, norm weights) do not."""
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for _, p in module.named_parameters():
            if not p.requires_grad:
                continue
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions flatten the local tensor
            (decay if len(shape) >= 2 else no_decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def _init_reference(self) -> torch.nn.Module:
        """The frozen initial policy for the KL penalty (same forward signature as the engine).

        ZeRO-3: a second, optimizer-less engine, so the reference stays partitioned too. Stages 0-2
        hold full weights on every rank anyway: the plain module on this rank's device.
        """
        ref = self._load_model(self.spec.model_path, trainable=False)
        ref.requires_grad_(False)
        ref_policy = _PolicyModule(ref, self.policy.head.chunk_tokens).eval()
        if self.spec.zero_stage != 3:
            return ref_policy.to(self.device)
        cfg = {k: v for k, v in self.ds_config.items() if k not in ("gradient_clipping", "data_types")}
        engine, *_ = self._deepspeed.initialize(model=ref_policy, config=cfg, dist_init_required=False)
        engine.eval()
        return engine

    # ---- helpers ----------------------------------------------------------------------------------

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> np.ndarray:
        """All-reduce a small float64 vector across ranks ("sum" or "max"). Collective."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().numpy()

    @property
    def _logprob_mbs(self) -> int:
        return self.spec.logprob_micro_batch_size or self.spec.micro_batch_size

    def _check_lockstep(self, batch: TrainBatch, phase: str, sizes: Sequence[int]) -> list[int]:
        """Fail on every rank, with one message, if ranks would run different micro-batch counts.

        ``sizes``: the micro-batch sizes the phase will iterate with; returns the counts.
        """
        counts = [num_micro_batches(batch.num_rows, size) for size in sizes]
        ext = self.all_reduce([v for n in counts for v in (-n, n)], op="max")
        if any(-ext[2 * i] != ext[2 * i + 1] for i in range(len(counts))):
            raise ValueError(
                f"learner rank {self.rank}, {phase}: ranks hold different numbers of rows (this rank: "
                f"{batch.num_rows}), so they would run different numbers of micro-batches of {list(sizes)} rows "
                "and wait on each other forever; every rank must run the same number. Split the global batch "
                "with rlsys.workers.batching.shard_train_batch"
            )
        return counts

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        # A copy: arrays that arrive through Ray are read-only views of the object store.
        return torch.tensor(a, device=self.device)

    def _tensors(self, mb: TrainBatch):
        return self._tensor(mb.input_ids), self._tensor(mb.attention_mask), self._tensor(mb.response_mask)

    @torch.no_grad()
    def _token_logprobs(self, engine, batch: TrainBatch) -> np.ndarray:
        """Log-probs [N, L] (float32, 0 off-response) under ``engine``, micro-batch by micro-batch."""
        engine.eval()
        out = np.zeros(batch.input_ids.shape, dtype=np.float32)
        for rows, mb in iter_micro_batches(batch, self._logprob_mbs):
            ids, attn, resp = self._tensors(mb)
            lp, _ = engine(ids, attn, resp, False)
            out[rows, : mb.input_ids.shape[1]] = lp.float().cpu().numpy()
        return out

    # ---- public API --------------------------------------------------------------------------------

    def compute_logprobs(self, batch: TrainBatch) -> np.ndarray:
        """log pi(token t | tokens < t) at response positions, [N, L] float32 (0 elsewhere). No grad.

        Aligned with ``batch.input_ids`` like the batch's own arrays. Collective: all ranks call it
        with the same number of micro-batches (ZeRO-3 gathers parameters per forward).
        """
        self._check_lockstep(batch, "compute_logprobs", [self._logprob_mbs])
        return self._token_logprobs(self.engine, batch)

    def train_step(self, batch: TrainBatch) -> TrainStats:
        """One optimizer step on this rank's share of the global batch; returns GLOBAL stats.

        pi_old: ``batch.old_logprobs`` [N, L] if set (computed once with :meth:`compute_logprobs`
        before the first of several PPO mini-batches). Else pi_old is the current policy itself: each
        micro-batch's own forward pass, detached, so the ratio is exactly 1 (a single step per batch)
        and no separate no-grad pass over the batch is spent on it. The rollout engine's log-probs
        serve the ``rollout_logprob_diff`` metric and the importance correction (``is_correction``).

        Every micro-batch's loss uses ``batch.loss_normalizer``; with the scaling described in the
        module docstring the applied gradient is that of the full global-batch loss. A non-finite
        loss or gradient norm on any rank skips the optimizer step on all ranks (gradients are
        zeroed, the LR schedule does not advance) and returns ``skipped=True``.

        Returned stats are identical on every rank: ``loss`` is the global loss (sum of all
        micro-batch losses), per-token metrics are token-weighted means over all ranks' response
        tokens, ``ratio_max`` the global max.
        """
        t0 = time.perf_counter()
        spec = self.spec
        n_micro = self._check_lockstep(batch, "train_step", [spec.micro_batch_size, self._logprob_mbs])[0]
        ref = self._token_logprobs(self.ref_engine, batch) if self.ref_engine is not None else None
        old_seconds = time.perf_counter() - t0

        mask = batch.response_mask
        need_entropy_grad = spec.entropy_coef > 0
        # This rank's sums (see _STEP_SUMS) and ratio extremes across micro-batches, reduced across ranks below.
        sums = dict.fromkeys(_STEP_SUMS, 0.0)
        rmax, rmin = -math.inf, math.inf
        self.engine.train()
        for k, (rows, mb) in enumerate(iter_micro_batches(batch, spec.micro_batch_size)):
            width = mb.input_ids.shape[1]
            # Reduce/step only after the last micro-batch (set before its forward, as DeepSpeed asks).
            self.engine.set_gradient_accumulation_boundary(k == n_micro - 1)
            ids, attn, resp = self._tensors(mb)
            lp, entropy = self.engine(ids, attn, resp, need_entropy_grad)
            old_mb = lp.detach().float() if mb.old_logprobs is None else self._tensor(mb.old_logprobs)
            rollout_mb = self._tensor(batch.rollout_logprobs[rows, :width])
            sums["rollout_logprob_diff"] += float((old_mb - rollout_mb).abs()[resp].double().sum())
            loss, m = policy_loss(
                lp,
                old_mb,
                self._tensor(mb.advantages),
                resp,
                loss_type=spec.loss_type,
                clip_low=spec.clip_low,
                clip_high=spec.clip_high,
                ref_logprobs=self._tensor(ref[rows, :width]) if ref is not None else None,
                kl_coef=spec.kl_coef,
                entropy=entropy,
                entropy_coef=spec.entropy_coef,
                agg=spec.agg,
                normalizer=batch.loss_normalizer,
                token_sum_constant=spec.token_sum_constant,
                rollout_logprobs=rollout_mb if spec.tis_cap else None,
                tis_cap=spec.tis_cap,
                tis_mode=spec.tis_mode,
                dual_clip=spec.dual_clip,
            )
            value = float(loss.detach())
            if not math.isfinite(value):
                sums["nonfinite_loss"] = 1.0
                # Make every gradient this loss reaches NaN (even where its local derivative is 0), so
                # DeepSpeed's non-finite-norm check skips the step on all ranks after the reduction.
                loss = loss * float("nan")
            # x world_size: DeepSpeed averages gradients over ranks; we want their sum.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            n_tok = m["num_tokens"]
            sums["loss"] += value
            sums["tokens"] += n_tok
            for name in _TOKEN_WEIGHTED:  # kl / tis_* are absent when not computed: they add 0
                sums[name] += m.get(name, 0.0) * n_tok
            if n_tok > 0:
                rmax, rmin = max(rmax, m["ratio_max"]), min(rmin, m["ratio_min"])

        lr = float(self.engine.get_lr()[0])
        own_norm = self._stage0_grad_norm() if spec.zero_stage == 0 else None
        sums["sequences"] = float(mask.any(axis=1).sum())
        total = dict(zip(_STEP_SUMS, self.all_reduce([sums[name] for name in _STEP_SUMS])))
        ratio_max, neg_ratio_min = self.all_reduce([rmax, -rmin], op="max")
        any_nonfinite_loss = total["nonfinite_loss"] > 0
        skipped_before = self.engine.skipped_steps
        if own_norm is not None and (any_nonfinite_loss or not math.isfinite(own_norm)):
            # ZeRO-0 with an fp32 torch optimizer has no overflow check of its own.
            self.engine.zero_grad()
            skipped = True
            grad_norm = own_norm if not math.isfinite(own_norm) else float("nan")
        else:
            self.engine.step()
            skipped = self.engine.skipped_steps > skipped_before
            ds_norm = self.engine.get_global_grad_norm()
            norm = own_norm if ds_norm is None else ds_norm
            assert norm is not None, "DeepSpeed reported no gradient norm and the learner computed none"
            grad_norm = float(norm)
            if any_nonfinite_loss and not skipped:
                raise LearnerError(
                    f"learner rank {self.rank}, train_step: a non-finite loss did not produce a "
                    "skipped step; the optimizer state may be corrupted"
                )
        if not skipped:
            self.applied_steps += 1

        total_tok = total["tokens"]
        denom = max(total_tok, 1.0)

        def mean(name: str) -> float:  # token-weighted mean over all ranks' response tokens
            return float(total[name] / denom)

        return TrainStats(
            loss=float(total["loss"]),
            pg_loss=mean("pg_loss"),
            clip_fraction=mean("clip_fraction"),
            approx_kl=mean("approx_kl"),
            entropy=mean("entropy"),
            grad_norm=grad_norm,
            lr=lr,
            num_tokens=int(total_tok),
            rollout_logprob_diff=mean("rollout_logprob_diff"),
            ratio_max=float(ratio_max) if total_tok else 1.0,
            skipped=bool(skipped),
            seconds=time.perf_counter() - t0,
            ratio_mean=mean("ratio_mean") if total_tok else 1.0,
            ratio_min=float(-neg_ratio_min) if total_tok else 1.0,
            num_sequences=int(total["sequences"]),
            num_micro_batches=n_micro,
            old_logprob_seconds=old_seconds,
            applied_steps=self.applied_steps,
            kl=mean("kl") if ref is not None else None,
            tis_weight_mean=(mean("tis_weight_mean") if total_tok else 1.0) if spec.tis_cap is not None else None,
            tis_clip_fraction=mean("tis_clip_fraction") if spec.tis_cap is not None else None,
        )

    def _stage0_grad_norm(self) -> float:
        """Global L2 norm of the (already all-reduced) gradients when ZeRO is off (stage 0)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt())

    # ---- weight export (export.py) and training state (state.py) ------------------------------------

    def iter_named_weights(self, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF parameter as (checkpoint name, CPU copy); see :func:`.export.iter_named_weights`."""
        return export.iter_named_weights(self, copy)

    def weight_meta(self) -> list[TensorMeta]:
        """(name, dtype, shape) of what iter_named_weights yields, in order; see :func:`.export.weight_meta`."""
        return export.weight_meta(self)

    def iter_weight_buckets(self, bucket_bytes: int, dtype: str | None = None) -> Iterator[WeightBucket]:
        """Rank 0: the weights as buckets of ~``bucket_bytes``; see :func:`.export.iter_weight_buckets`."""
        return export.iter_weight_buckets(self, bucket_bytes, dtype)

    def save_hf(self, path: str, dtype: str | None = None, max_shard_bytes: int = 4 * 1024**3) -> str | None:
        """A Hugging Face checkpoint at ``path`` (rank 0 returns it); see :func:`.export.save_hf`."""
        return export.save_hf(self, path, dtype, max_shard_bytes)

    def save_state(self, path: str) -> None:
        """This rank's training state into ``path``; see :func:`.state.save_state`."""
        state.save_state(self, path)

    def load_state(self, path: str) -> None:
        """Restore the training state from ``path``, bit for bit; see :func:`.state.load_state`."""
        state.load_state(self, path)

    def close(self) -> None:
        """Leave the process group (best effort); the learner is unusable afterwards."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # teardown after a failed peer: nothing left to recover
                log.debug("destroy_process_group failed on rank %d", self.rank, exc_info=True)
