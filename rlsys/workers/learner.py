"""The learner: DeepSpeed ZeRO 0-3 data-parallel policy optimisation, as plain class and Ray actor.

Three layers:

* :class:`Learner` — one data-parallel rank in one process: loads the Hugging Face model, joins the
  process group (gloo on CPU, nccl on GPU, selected by ``torch.cuda.is_available()``), wraps the
  model in a DeepSpeed engine, and runs :meth:`Learner.train_step` /
  :meth:`Learner.compute_logprobs` / :meth:`Learner.iter_named_weights` / :meth:`Learner.save_hf` /
  :meth:`Learner.save_state` / :meth:`Learner.load_state`.
* :class:`LearnerWorker` — a thin Ray actor around one Learner (``num_cpus``/``num_gpus`` are set
  by the caller through ``.options``).
* :class:`LearnerGroup` — the driver's handle on ``num_workers`` actors; every call fans out to all
  ranks (they are collectives) and errors name the rank and the phase.

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

Training state (resume). :meth:`Learner.save_state` / :meth:`Learner.load_state` write and read
everything a rank needs to continue bit for bit: its fp32 master weights (its ZeRO partition; the
low-precision model weights are re-derived from them exactly as DeepSpeed's own step does), the
AdamW moments and step counts, the LR schedule position and applied-step counter, the engine's
step counters, and the torch / numpy / Python RNG states. Format (no pickle anywhere, so a state
from an untrusted source cannot execute code on load): ``rank{r}.safetensors`` (tensors) and
``rank{r}.json`` (scalars) per rank, then ``learner_state.json``, the manifest, written by rank 0
last; a directory without a manifest is incomplete and is refused. DeepSpeed's own
``save_checkpoint`` is not used: its files are ``torch.save`` pickles that need
``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rlsys.algo.losses import AGG_MODES, LOSS_TYPES, policy_loss
from rlsys.fsutil import replace_dir
from rlsys.records import TrainBatch, TrainStats
from rlsys.workers.batching import iter_micro_batches, num_micro_batches, plan_shards, take_rows
from rlsys.workers.weight_sync import WeightBucket, iter_buckets, unpack_bucket

log = logging.getLogger("rlsys.learner")

__all__ = [
    "Learner",
    "LearnerError",
    "LearnerGroup",
    "LearnerSpec",
    "LearnerStateError",
    "LearnerWorker",
    "read_learner_state_manifest",
    "unpack_weight_bucket",
]

DTYPES = ("bfloat16", "float32")
# Auto chunk size for the log-prob head: ~256 MiB of float32 logits per chunk.
_LOGITS_CHUNK_BYTES = 256 * 1024 * 1024
# Files of a source checkpoint that save_hf does NOT copy: weights (rewritten), config (rewritten),
# and rlsys' tiny-model build marker (it describes the untrained weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "rlsys_model.json"}


class LearnerError(RuntimeError):
    """A learner rank failed or timed out; the message names the rank and the phase."""


class LearnerStateError(ValueError):
    """A learner state directory is incomplete, damaged, or does not fit this learner layout."""


# ---- training-state format (see the module docstring) ------------------------------------------------

LEARNER_STATE_MANIFEST = "learner_state.json"
LEARNER_STATE_FORMAT = "rlsys-learner-state"
LEARNER_STATE_VERSION = 1
# What must match between the run that saved a state and the one loading it: ZeRO partitions
# (hence the per-rank files) depend on all three.
_LAYOUT_KEYS = ("world_size", "zero_stage", "dtype")
# Loss-scaler fields DeepSpeed updates during training (static for bf16/fp32, kept for completeness).
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
# Engine counters (they do not change the numbers, but a resumed engine should report the same).
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


# Ends the error of a rank that stopped only because another rank failed (LearnerGroup reports the other).
_PEER_FAILED = "this rank stopped with them"


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank{rank}.safetensors", f"rank{rank}.json"


def read_learner_state_manifest(path: str) -> dict[str, Any]:
    """The manifest of a COMPLETE learner state directory; raises :class:`LearnerStateError` otherwise.

    Complete means: ``learner_state.json`` exists and parses, has this format and version, and
    every file it lists exists with the size it records (a truncated or missing rank file is caught
    here). Reads JSON only; cheap enough for the driver to call before starting any learner.
    """
    root = Path(path)
    mpath = root / LEARNER_STATE_MANIFEST
    if not mpath.is_file():
        what = "does not exist" if not root.exists() else f"has no {LEARNER_STATE_MANIFEST}"
        raise LearnerStateError(
            f"learner state {str(root)!r} {what}: it is not a complete learner state (the manifest is written "
            "last, so a directory without it was never finished, e.g. a run killed while saving)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise LearnerStateError(f"learner state manifest {str(mpath)!r} is unreadable ({type(e).__name__}: {e})") \
            from e
    if not isinstance(manifest, dict) or manifest.get("format") != LEARNER_STATE_FORMAT:
        raise LearnerStateError(f"{str(mpath)!r} is not an rlsys learner state manifest")
    if manifest.get("version") != LEARNER_STATE_VERSION:
        raise LearnerStateError(f"learner state {str(root)!r} has format version {manifest.get('version')!r}; this "
                                f"rlsys reads version {LEARNER_STATE_VERSION}")
    for name, size in sorted(manifest.get("files", {}).items()):
        f = root / name
        if not f.is_file():
            raise LearnerStateError(f"learner state {str(root)!r}: {name} is listed in the manifest but missing")
        if f.stat().st_size != size:
            raise LearnerStateError(f"learner state {str(root)!r}: {name} has {f.stat().st_size} bytes, the "
                                    f"manifest records {size} (truncated or overwritten)")
    return manifest


def _layout_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> Optional[str]:
    """None if the saved layout fits the current one, else a sentence saying what differs."""
    diffs = [f"{k} {saved.get(k)!r} (saved) vs {current[k]!r} (this learner)" for k in _LAYOUT_KEYS
             if saved.get(k) != current[k]]
    if not diffs:
        return None
    return ("the learner state was saved with a different learner layout: " + "; ".join(diffs) + ". Resuming "
            "with a different number of learners, ZeRO stage or dtype is not supported (the optimizer state is "
            "partitioned per rank); resume with the settings of the run that saved it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OptimizerLayout:
    """Where one rank's trainable state lives inside DeepSpeed's optimizer wrapper.

    ``masters``: the fp32 tensors the base ``torch.optim.AdamW`` updates (this rank's flat
    partition(s) under ZeRO, per-parameter copies for bf16 without ZeRO, the model parameters
    themselves for fp32 without ZeRO); ``base.state[master]`` holds their moments. ``sync()``
    rewrites the model's low-precision weights from the masters with the same copies (and, where
    the weights are replicated or persistent, the same all-gathers) that DeepSpeed's ``step`` runs
    after an update, so the model ends up exactly as it was when the state was saved. Relies on
    internals of DeepSpeed 0.19.8 (the pinned version); an unknown wrapper is refused by name.
    """

    def __init__(self, engine) -> None:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = engine.optimizer
        self.opt = opt
        self.kind = type(opt).__name__
        self.scalers = [o for o in (getattr(opt, "loss_scaler", None), getattr(opt, "loss_scale_config", None))
                        if o is not None]
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            if opt.offload_optimizer or opt.offload_param:
                raise LearnerStateError("learner state with ZeRO-3 offloading is not supported")
            self.masters = list(opt.fp32_partitioned_groups_flat)
            self.base = opt.optimizer
            self._sync = self._sync_stage3
        elif isinstance(opt, DeepSpeedZeroOptimizer):
            if opt.cpu_offload:
                raise LearnerStateError("learner state with ZeRO-1/2 CPU offloading is not supported")
            self.masters = list(opt.single_partition_of_fp32_groups)
            self.base = opt.optimizer
            self._sync = opt.update_lp_params
        elif isinstance(opt, BF16_Optimizer):
            self.masters = list(opt.fp32_groups_flat_partition)
            self.base = opt.optimizer
            self._sync = opt.update_lp_params
        elif isinstance(opt, FP16_UnfusedOptimizer):
            self.masters = [p for group in opt.fp32_groups for p in group]
            self.base = opt.optimizer
            self._sync = self._sync_unfused
        elif type(opt) is torch.optim.AdamW:
            self.masters = [p for group in opt.param_groups for p in group["params"]]
            self.base = opt
            self._sync = lambda: None  # the masters ARE the model's parameters
        else:
            raise LearnerStateError(f"learner state: DeepSpeed optimizer wrapper {self.kind} is not supported")

    def _sync_stage3(self) -> None:
        opt = self.opt
        opt._partition_all_parameters()  # release gathered (persistent) parameters, as step() does first
        for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)  # fp32 partition -> model partition
        if opt.persistent_parameters:  # small parameters stay gathered on every rank (collective)
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
        opt.invalidate_secondary_tensor()

    def _sync_unfused(self) -> None:
        for fp32_group, lp_group in zip(self.opt.fp32_groups, self.opt.fp16_groups):
            for fp32_param, lp_param in zip(fp32_group, lp_group):
                lp_param.data.copy_(fp32_param.data)

    @torch.no_grad()
    def sync(self) -> None:
        self._sync()


def unpack_weight_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """Receiving side of :meth:`LearnerWorker.export_weight_buckets`: bucket -> (name, tensor).

    Each entry carries its dtype tag: float32 travels as float32, bfloat16 as an int16 view that is
    viewed back (``torch.from_numpy(a).view(torch.bfloat16)``). Same as
    :func:`rlsys.workers.weight_sync.unpack_bucket`, which rollout workers use.
    """
    return unpack_bucket(bucket)


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner rank needs, identical on every rank.

    ``lr`` is the peak learning rate: linear warmup over ``warmup_steps`` applied optimizer steps
    (step k, 0-based, uses ``lr * min(1, (k + 1) / warmup_steps)``), then constant. ``grad_clip``
    is the global-norm clip (0 disables). ``eps`` is AdamW's epsilon. ``weight_decay`` applies to
    matrices only (biases and norm weights are not decayed). ``logprob_chunk_tokens``: tokens per
    chunk when turning hidden states into log-probs (0: auto, ~256 MiB of float32 logits).
    ``logprob_micro_batch_size``: rows per forward pass when computing log-probs without grad (pi_old,
    the reference policy, :meth:`Learner.compute_logprobs`); 0: ``micro_batch_size``. No activations
    are kept there, so it can be larger, and under ZeRO-3 fewer forwards mean fewer gathers.
    ``gather_bytes``: ZeRO-3 weight export gathers parameters in groups of about this size.
    """

    model_path: str
    zero_stage: int = 2
    dtype: str = "bfloat16"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    loss_type: str = "grpo"
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    agg: str = "token_mean"
    token_sum_constant: Optional[float] = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: Optional[float] = None  # truncated importance sampling vs the rollout engine (algo.tis_cap)
    seed: int = 0
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int = 0
    logprob_micro_batch_size: int = 0
    gather_bytes: int = 256 * 1024 * 1024
    dist_timeout_s: float = 1800.0

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix for any invalid value."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"LearnerSpec.{name}={getattr(self, name)!r}: {why}")

        if not self.model_path:
            bad("model_path", "give a Hugging Face checkpoint directory")
        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", "DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose one of {DTYPES}")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"choose one of {LOSS_TYPES}")
        if self.agg not in AGG_MODES:
            bad("agg", f"choose one of {AGG_MODES}")
        if self.agg == "seq_mean_token_sum_norm" and not (self.token_sum_constant or 0) > 0:
            bad("token_sum_constant", "agg='seq_mean_token_sum_norm' needs a positive constant "
                "(e.g. the max response length)")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.micro_batch_size < 1:
            bad("micro_batch_size", "must be >= 1")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        for name in ("weight_decay", "grad_clip", "kl_coef", "entropy_coef"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                bad(name, "must be finite and >= 0")
        if self.tis_cap is not None and not (math.isfinite(self.tis_cap) and self.tis_cap >= 1):
            bad("tis_cap", "must be a finite number >= 1 (or None for off)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.logprob_chunk_tokens < 0:
            bad("logprob_chunk_tokens", "must be >= 0 (0 = auto)")
        if self.logprob_micro_batch_size < 0:
            bad("logprob_micro_batch_size", "must be >= 0 (0 = micro_batch_size)")
        if self.gather_bytes <= 0:
            bad("gather_bytes", "must be > 0")


def _lr_factor(warmup_steps: int, step: int) -> float:
    """Linear warmup then constant: the factor for the ``step``-th (0-based) applied step."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def _chunk_logprob_entropy(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], entropy_grad: bool):
    """hidden [m, H], targets [m] -> (logprob [m] f32, entropy [m] f32) through the LM head.

    Materialises only this chunk's [m, V] logits (float32).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    logprob = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprob, entropy


class _LogprobHead(torch.nn.Module):
    """Chunked LM head: per-token log-probs and entropies without full-vocabulary logits for all.

    Holds the SAME Parameter(s) as the model's output embedding (the tied embedding matrix for
    tied models), so ZeRO-3 gathers them for this module's forward and backward through its usual
    module hooks; the original ``lm_head`` module is never called. With grad enabled each chunk runs
    under non-reentrant activation checkpointing, so the backward pass recomputes the chunk's
    logits instead of keeping all of them alive: logits memory is a few [chunk, V] float32
    temporaries, forward or backward, whatever the sequence length.
    """

    def __init__(self, output_embeddings: torch.nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.weight = output_embeddings.weight
        self.bias = getattr(output_embeddings, "bias", None)
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                entropy_grad: bool):
        """hidden [B, L, H] -> (logprobs [B, L], entropy [B, L]), float32, 0 off-response.

        Column t holds log pi(token t | tokens < t), computed from hidden state t - 1; only columns
        where ``response_mask`` is True are computed.
        """
        from torch.utils.checkpoint import checkpoint

        b, length, _ = hidden.shape
        sel = response_mask[:, 1:]  # [B, L-1]: hidden state t-1 predicts response token t
        h = hidden[:, :-1][sel]  # [M, H]
        targets = input_ids[:, 1:][sel]  # [M]
        m = h.shape[0]
        lps, ents = [], []
        # max(m, 1): with no response token still run one (empty) chunk so that the head's
        # parameters take part in the graph on every rank; ZeRO's gradient hooks expect it.
        for start in range(0, max(m, 1), self.chunk_tokens):
            hc, tc = h[start:start + self.chunk_tokens], targets[start:start + self.chunk_tokens]
            if torch.is_grad_enabled():
                lp, ent = checkpoint(_chunk_logprob_entropy, hc, tc, self.weight, self.bias, entropy_grad,
                                     use_reentrant=False)
            else:
                lp, ent = _chunk_logprob_entropy(hc, tc, self.weight, self.bias, False)
            lps.append(lp)
            ents.append(ent)
        lp_flat, ent_flat = torch.cat(lps), torch.cat(ents)
        zeros = torch.zeros((b, length - 1), dtype=torch.float32, device=hidden.device)
        lp_out = torch.nn.functional.pad(zeros.masked_scatter(sel, lp_flat), (1, 0))
        ent_out = torch.nn.functional.pad(zeros.masked_scatter(sel, ent_flat), (1, 0))
        return lp_out, ent_out


class _PolicyModule(torch.nn.Module):
    """What DeepSpeed wraps: HF decoder -> chunked log-prob head (the HF ``forward`` is not used).

    ``forward(input_ids [B, L], attention_mask [B, L], response_mask [B, L], entropy_grad)`` ->
    ``(logprobs [B, L], entropy [B, L])`` float32, aligned with ``input_ids``, 0 off-response.
    """

    def __init__(self, hf_model: torch.nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.hf = hf_model
        self.head = _LogprobHead(hf_model.get_output_embeddings(), chunk_tokens)

    def forward(self, input_ids, attention_mask, response_mask, entropy_grad: bool = False):
        decoder = getattr(self.hf, self.hf.base_model_prefix)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden, input_ids, response_mask, entropy_grad)


class Learner:
    """One data-parallel learner rank (see the module docstring for the gradient contract).

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
        self._applied_steps = 0
        torch.manual_seed(spec.seed)
        self.device = self._init_distributed(init_file)
        self.torch_dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
        self.ds_config = self._ds_config()

        hf = self._load_model(spec.model_path, trainable=True)
        if spec.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf = hf
        chunk = spec.logprob_chunk_tokens or max(1, _LOGITS_CHUNK_BYTES // (4 * hf.config.vocab_size))
        self.policy = _PolicyModule(hf, chunk)

        optimizer = torch.optim.AdamW(self._param_groups(self.policy), lr=spec.lr, betas=tuple(spec.betas),
                                      eps=spec.eps, weight_decay=spec.weight_decay)
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

    def _load_model(self, model_path: str, trainable: bool) -> torch.nn.Module:
        """The HF causal LM in the training dtype; under ZeRO-3 built already partitioned.

        ZeRO-3: the module is constructed inside ``deepspeed.zero.Init`` (each rank allocates only its
        partition) and the safetensors weights are streamed in one tensor at a time, rank 0 reading
        and scattering each (``GatheredParameters(modifier_rank=0)``), so no rank ever holds a full
        copy. (transformers' own route, ``HfDeepSpeedConfig``, needs ``accelerate``, which this
        stack does not install.) Other stages: plain ``from_pretrained``.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"learner rank {self.rank}: model path {model_path!r} is not a directory on "
                                    f"this node ({os.uname().nodename}); model.path must be a Hugging Face "
                                    "checkpoint directory visible to every learner")
        try:
            if self.spec.zero_stage != 3:
                hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.torch_dtype,
                                                          attn_implementation="sdpa")
            else:
                from transformers.initialization import no_init_weights

                config = AutoConfig.from_pretrained(model_path)
                # no_init_weights: random init would index into already-partitioned (empty) tensors, and
                # every weight is overwritten from the checkpoint anyway. No dtype= for zero.Init: in
                # DeepSpeed 0.19.8 an explicit dtype is overridden by bf16 on accelerators without fp16
                # (CPU); the dtype it derives from the config (bf16 enabled or not) is the right one.
                with no_init_weights(), self._deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                    hf = AutoModelForCausalLM.from_config(config, dtype=self.torch_dtype,
                                                          attn_implementation="sdpa")
                # Construction under no_init_weights skips the tying of input/output embeddings; redo it
                # (a no-op for untied models) before loading, so the tied matrix is one parameter.
                hf.tie_weights()
                self._load_partitioned(hf, Path(model_path))
        except Exception as e:
            raise RuntimeError(f"learner rank {self.rank}: cannot load the model from {model_path!r} "
                               f"({type(e).__name__}: {e}); model.path must be a Hugging Face checkpoint "
                               "directory with safetensors weights") from e
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
                for key in f.keys():
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
            raise ValueError(f"checkpoint {model_dir} lacks weights for {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")

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
                dist.init_process_group(backend, init_method=f"file://{init_file}", rank=self.rank,
                                        world_size=self.world_size,
                                        timeout=datetime.timedelta(seconds=self.spec.dist_timeout_s))
            except Exception as e:
                parent = os.path.dirname(init_file)
                why = (f"its directory {parent!r} does not exist here (cwd {os.getcwd()!r}): the init file must be "
                       "an absolute path on a file system every learner shares" if not os.path.isdir(parent) else
                       "a stale init file from an earlier run makes ranks disagree: delete it, or give a fresh path")
                raise RuntimeError(
                    f"learner rank {self.rank}/{self.world_size}: joining the {backend} process group via "
                    f"file://{init_file} failed ({type(e).__name__}: {e}); {why}") from e
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
        decay, no_decay = [], []
        for _, p in module.named_parameters():
            if not p.requires_grad:
                continue
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions flatten the local tensor
            (decay if len(shape) >= 2 else no_decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
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

    def _all_reduce(self, values: Sequence[float], op: str = "sum") -> np.ndarray:
        """All-reduce a small float64 vector across ranks ("sum" or "max")."""
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
        ext = self._all_reduce([v for n in counts for v in (-n, n)], op="max")
        if any(-ext[2 * i] != ext[2 * i + 1] for i in range(len(counts))):
            raise ValueError(
                f"learner rank {self.rank}, {phase}: ranks hold different numbers of rows (this rank: "
                f"{batch.num_rows}), so they would run different numbers of micro-batches of {list(sizes)} rows "
                "and wait on each other forever; every rank must run the same number. Split the global batch "
                "with rlsys.workers.batching.shard_train_batch")
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

    def train_step(self, batch: TrainBatch, old_logprobs: Optional[np.ndarray] = None) -> TrainStats:
        """One optimizer step on this rank's share of the global batch; returns GLOBAL stats.

        pi_old: ``old_logprobs`` [N, L] if given (e.g. computed with :meth:`compute_logprobs` before
        the first of several PPO mini-batches). Else pi_old is the current policy itself: each
        micro-batch's own forward pass, detached, so the ratio is exactly 1 (a single step per batch)
        and no separate no-grad pass over the batch is spent on it. The rollout engine's log-probs
        serve the ``rollout_logprob_diff`` metric and truncated IS (``tis_cap``).

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
        old: Optional[np.ndarray] = None  # None: pi_old = this step's own forward, detached
        if old_logprobs is not None:
            old = np.asarray(old_logprobs, dtype=np.float32)
            if old.shape != batch.input_ids.shape:
                raise ValueError(f"learner rank {self.rank}, train_step: old_logprobs has shape {old.shape}, "
                                 f"expected {batch.input_ids.shape} (aligned with input_ids)")
        ref = self._token_logprobs(self.ref_engine, batch) if self.ref_engine is not None else None
        old_seconds = time.perf_counter() - t0

        mask = batch.response_mask
        diff_sum = 0.0  # sum over response tokens of |pi_old - pi_rollout|
        need_entropy_grad = spec.entropy_coef > 0
        # Weighted sums (value * tokens) and extremes across micro-batches, reduced across ranks below.
        tok = loss_sum = pg = clip = akl = ent = rmean = kl = tis_w = tis_clip = 0.0
        rmax, rmin = -math.inf, math.inf
        nonfinite_loss = 0.0
        self.engine.train()
        for k, (rows, mb) in enumerate(iter_micro_batches(batch, spec.micro_batch_size)):
            width = mb.input_ids.shape[1]
            # Reduce/step only after the last micro-batch (set before its forward, as DeepSpeed asks).
            self.engine.set_gradient_accumulation_boundary(k == n_micro - 1)
            ids, attn, resp = self._tensors(mb)
            lp, entropy = self.engine(ids, attn, resp, need_entropy_grad)
            old_mb = lp.detach().float() if old is None else self._tensor(old[rows, :width])
            rollout_mb = self._tensor(batch.rollout_logprobs[rows, :width])
            diff_sum += float((old_mb - rollout_mb).abs()[resp].double().sum())
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
            )
            value = float(loss.detach())
            if not math.isfinite(value):
                nonfinite_loss = 1.0
                # Make every gradient this loss reaches NaN (even where its local derivative is 0), so
                # DeepSpeed's non-finite-norm check skips the step on all ranks after the reduction.
                loss = loss * float("nan")
            # x world_size: DeepSpeed averages gradients over ranks; we want their sum.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            n_tok = m["num_tokens"]
            loss_sum += value
            tok += n_tok
            pg += m["pg_loss"] * n_tok
            clip += m["clip_fraction"] * n_tok
            akl += m["approx_kl"] * n_tok
            ent += m["entropy"] * n_tok
            rmean += m["ratio_mean"] * n_tok
            kl += m.get("kl", 0.0) * n_tok
            tis_w += m.get("tis_weight_mean", 0.0) * n_tok
            tis_clip += m.get("tis_clip_fraction", 0.0) * n_tok
            if n_tok > 0:
                rmax, rmin = max(rmax, m["ratio_max"]), min(rmin, m["ratio_min"])

        lr = float(self.engine.get_lr()[0])
        own_norm = self._stage0_grad_norm() if spec.zero_stage == 0 else None
        sums = self._all_reduce([loss_sum, tok, pg, clip, akl, ent, rmean, kl, diff_sum, nonfinite_loss,
                                 float(mask.any(axis=1).sum()), tis_w, tis_clip])
        maxes = self._all_reduce([rmax, -rmin], op="max")
        any_nonfinite_loss = sums[9] > 0
        skipped_before = self.engine.skipped_steps
        if own_norm is not None and (any_nonfinite_loss or not math.isfinite(own_norm)):
            # ZeRO-0 with an fp32 torch optimizer has no overflow check of its own.
            self.engine.zero_grad()
            skipped = True
            grad_norm = own_norm if not math.isfinite(own_norm) else float("nan")
        else:
            self.engine.step()
            skipped = self.engine.skipped_steps > skipped_before
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = float(own_norm if grad_norm is None else grad_norm)
            if any_nonfinite_loss and not skipped:
                raise LearnerError(f"learner rank {self.rank}, train_step: a non-finite loss did not produce a "
                                   "skipped step; the optimizer state may be corrupted")
        if not skipped:
            self._applied_steps += 1

        total_tok = sums[1]
        denom = max(total_tok, 1.0)
        extra = {
            "ratio_mean": float(sums[6] / denom) if total_tok else 1.0,
            "ratio_min": float(-maxes[1]) if total_tok else 1.0,
            "num_sequences": float(sums[10]),
            "num_micro_batches": float(n_micro),
            "old_logprob_seconds": old_seconds,
            "applied_steps": float(self._applied_steps),
        }
        if ref is not None:
            extra["kl"] = float(sums[7] / denom)
        if spec.tis_cap is not None:
            extra["tis_weight_mean"] = float(sums[11] / denom) if total_tok else 1.0
            extra["tis_clip_fraction"] = float(sums[12] / denom)
        return TrainStats(
            loss=float(sums[0]),
            pg_loss=float(sums[2] / denom),
            clip_fraction=float(sums[3] / denom),
            approx_kl=float(sums[4] / denom),
            entropy=float(sums[5] / denom),
            grad_norm=grad_norm,
            lr=lr,
            num_tokens=int(total_tok),
            rollout_logprob_diff=float(sums[8] / denom),
            ratio_max=float(maxes[0]) if total_tok else 1.0,
            skipped=bool(skipped),
            seconds=time.perf_counter() - t0,
            extra=extra,
        )

    def _stage0_grad_norm(self) -> float:
        """Global L2 norm of the (already all-reduced) gradients when ZeRO is off (stage 0)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt())

    def _gather_groups(self) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
        """(HF name, parameter) in module order, grouped to about ``gather_bytes`` per group."""
        group: list[tuple[str, torch.nn.Parameter]] = []
        size = 0
        for mod_name, module in self.hf.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                name = f"{mod_name}.{pname}" if mod_name else pname
                group.append((name, p))
                size += getattr(p, "ds_numel", p.numel()) * p.element_size()
                if size >= self.spec.gather_bytes:
                    yield group
                    group, size = [], 0
        if group:
            yield group

    def iter_named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter of the HF model as (HF checkpoint name, CPU tensor copy), module order.

        Includes ``lm_head.weight`` for tied embeddings (it is the embedding matrix, repeated under
        its own name: inference engines load both). Dtype: the training dtype. Under ZeRO-3 the
        parameters are gathered ``gather_bytes`` at a time (bounded memory): a collective, so every
        rank must exhaust this generator; only rank 0's output is meant to be used.
        """
        z3 = self.spec.zero_stage == 3
        for group in self._gather_groups():
            params = list({id(p): p for _, p in group}.values())
            ctx = self._deepspeed.zero.GatheredParameters(params, modifier_rank=None) if z3 else nullcontext()
            with ctx:
                copies = [(name, p.detach().to("cpu", copy=True)) for name, p in group]
            yield from copies
        for mod_name, module in self.hf.named_modules():
            for bname, buf in module.named_buffers(recurse=False):
                if bname in getattr(module, "_non_persistent_buffers_set", set()):
                    continue  # e.g. rotary inv_freq: recomputed from the config, not in checkpoints
                yield (f"{mod_name}.{bname}" if mod_name else bname), buf.detach().to("cpu", copy=True)

    def iter_weight_buckets(self, bucket_bytes: int, dtype: Optional[str] = None) -> Iterator[WeightBucket]:
        """Rank 0: the weights as :class:`WeightBucket`s of ~``bucket_bytes``, streamed; others: none.

        Collective: every rank must exhaust it (each iterates :meth:`iter_named_weights`). ``dtype``
        ("bfloat16" or "float32") casts before packing, e.g. to ship bf16 to a bf16 inference engine.
        Buckets follow :mod:`rlsys.workers.weight_sync` (bf16 as int16 views, a dtype tag per entry).
        """
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"export dtype must be one of {DTYPES} or None, got {dtype!r}")
        cast = None if dtype is None else getattr(torch, dtype)
        named = ((n, t if cast is None or not t.is_floating_point() else t.to(cast))
                 for n, t in self.iter_named_weights())
        if self.rank != 0:
            for _ in named:
                pass
            return
        yield from iter_buckets(named, bucket_bytes)

    def save_hf(self, path: str, dtype: Optional[str] = None, max_shard_bytes: int = 4 * 1024**3) -> Optional[str]:
        """Write a Hugging Face checkpoint directory at ``path``; returns it on rank 0, None elsewhere.

        Weights as safetensors (``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` plus an
        index past ``max_shard_bytes``), ``config.json`` (``dtype`` = the saved dtype), and every
        other file of the source checkpoint (tokenizer, chat template, generation config). Tied
        weights are written once, as transformers does. Atomic: built in a sibling temp directory and
        renamed into place (an existing ``path`` is replaced). Collective under ZeRO-3.
        """
        from safetensors.torch import save_file

        import torch.distributed as dist

        cast = None if dtype is None else getattr(torch, dtype)
        final = Path(path)
        is_writer = self.rank == 0
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        if is_writer:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        ids_by_name = {}
        for mod_name, module in self.hf.named_modules():
            for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
                ids_by_name[f"{mod_name}.{pname}" if mod_name else pname] = id(p)
        seen_ids: set[int] = set()
        shards: list[list[str]] = []
        pending: dict[str, torch.Tensor] = {}
        size = 0
        saved_dtype = str(self.torch_dtype).replace("torch.", "") if cast is None else dtype

        def flush() -> None:
            nonlocal pending, size
            if pending:
                save_file(pending, str(tmp / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
                shards.append(list(pending))
                pending, size = {}, 0

        try:
            for name, t in self.iter_named_weights():
                pid = ids_by_name.get(name)
                if pid is not None and pid in seen_ids:
                    continue  # a tied alias (lm_head.weight): checkpoints store the matrix once
                if pid is not None:
                    seen_ids.add(pid)
                if not is_writer:
                    continue
                if cast is not None and t.is_floating_point():
                    t = t.to(cast)
                pending[name] = t.contiguous()
                size += t.numel() * t.element_size()
                if size >= max_shard_bytes:
                    flush()
            if is_writer:
                flush()
                self._finish_checkpoint(tmp, final, shards, saved_dtype)
        except BaseException:
            if is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if self.world_size > 1:
                dist.barrier()  # the directory is complete when any rank returns
        return str(final) if is_writer else None

    def _finish_checkpoint(self, tmp: Path, final: Path, shards: list[list[str]], saved_dtype: str) -> None:
        n = len(shards)
        if n == 1:
            os.rename(tmp / "part-00000.safetensors", tmp / "model.safetensors")
        else:
            weight_map = {}
            total = 0
            for k, names in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.rename(tmp / f"part-{k:05d}.safetensors", tmp / fname)
                total += (tmp / fname).stat().st_size
                weight_map.update({name: fname for name in names})
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = copy.deepcopy(self.hf.config)
        config.dtype = saved_dtype
        config.use_cache = True  # training switched it off; inference wants it
        config.save_pretrained(str(tmp))
        src = Path(self.spec.model_path)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0600; checkpoints are read by other processes/users
        os.chmod(tmp, 0o755)
        replace_dir(tmp, final)

    # ---- training state (resume) -----------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "zero_stage": self.spec.zero_stage, "dtype": self.spec.dtype}

    def _agree(self, phase: str, error: Optional[BaseException]) -> None:
        """Collective: raise on EVERY rank if any rank failed (its own error where it has one).

        Called before a phase's next collective, so one rank's failure (a full disk, a missing
        file) fails all ranks at once instead of leaving the others waiting in a gather.
        """
        flags = [0.0] * self.world_size
        if error is not None:
            flags[self.rank] = 1.0
        failed = [r for r, v in enumerate(self._all_reduce(flags)) if v > 0]
        if error is not None:
            raise error
        if failed:
            raise LearnerStateError(f"learner rank {self.rank}, {phase}: learner rank(s) {failed} failed (see their "
                                    f"error); {_PEER_FAILED}")

    def _collect_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's state as (tensors for safetensors, JSON-able scalars)."""
        layout = _OptimizerLayout(self.engine)
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()

        def put(name: str, t: torch.Tensor) -> None:
            t = t.detach()
            t = (t.to("cpu") if t.device.type != "cpu" else t).contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages or ptr == 0:
                t = t.clone()  # safetensors refuses tensors that share memory
            storages.add(t.untyped_storage().data_ptr())
            tensors[name] = t

        masters, states = [], []
        for k, master in enumerate(layout.masters):
            put(f"master.{k}", master)
            masters.append({"shape": list(master.shape), "dtype": str(master.dtype).removeprefix("torch.")})
            entry: dict[str, Any] = {"tensors": [], "scalars": {}}
            for key, value in layout.base.state.get(master, {}).items():
                if torch.is_tensor(value):
                    put(f"state.{k}.{key}", value)
                    entry["tensors"].append(key)
                elif value is None or isinstance(value, (bool, int, float)):
                    entry["scalars"][key] = value
                else:
                    raise LearnerStateError(f"learner rank {self.rank}, save_state: optimizer state entry {key!r} "
                                            f"is a {type(value).__name__}; only tensors and numbers are saved")
            states.append(entry)
        put("rng.torch", torch.get_rng_state())
        if self.device.type == "cuda":
            put("rng.cuda", torch.cuda.get_rng_state(self.device))

        scalers = []
        for obj in layout.scalers:
            fields = {f: getattr(obj, f) for f in _SCALER_FIELDS if hasattr(obj, f)}
            bad = {f: type(v).__name__ for f, v in fields.items()
                   if not (v is None or isinstance(v, (bool, int, float)))}
            if bad:
                raise LearnerStateError(f"learner rank {self.rank}, save_state: loss-scaler fields {bad} are not "
                                        "numbers")
            scalers.append(fields)
        sched = self.engine.lr_scheduler
        py_version, py_internal, py_gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
        meta = {
            "format": LEARNER_STATE_FORMAT,
            "version": LEARNER_STATE_VERSION,
            "rank": self.rank,
            **self._layout(),
            "optimizer": layout.kind,
            "applied_steps": self._applied_steps,
            "masters": masters,
            "optimizer_state": states,
            "lr_scheduler": {"last_epoch": sched.last_epoch, "step_count": sched._step_count},
            "engine": {c: getattr(self.engine, c) for c in _ENGINE_COUNTERS if hasattr(self.engine, c)},
            "loss_scalers": scalers,
            "rng": {"python": [py_version, list(py_internal), py_gauss],
                    "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]},
        }
        return tensors, meta

    def save_state(self, path: str) -> None:
        """Write this rank's training state into the directory ``path``; rank 0 writes the manifest last.

        Collective: every rank calls it, between train steps. ``path`` is created if missing and must
        not already hold a manifest (build the state in a fresh directory and rename it into place;
        the driver does that for the whole checkpoint). It must be on a file system every rank sees:
        rank 0 records the size of every rank's files in the manifest.

        Written: ``rank{r}.safetensors`` (fp32 master weights of this rank's ZeRO partition, AdamW
        ``exp_avg`` / ``exp_avg_sq`` / ``step``, torch CPU and CUDA RNG states) and ``rank{r}.json``
        (LR-schedule position, applied-step and engine counters, loss-scaler fields, numpy and Python
        RNG states, master shapes for validation), then ``learner_state.json`` (format, version,
        world_size, zero_stage, dtype, applied steps, each file with its size), written to a temp
        name and renamed. Every rank returns once the manifest exists; if any rank fails, every rank
        raises and no manifest is written, so the directory never reads as complete.
        """
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        root = Path(path)
        error: Optional[BaseException] = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            if (root / LEARNER_STATE_MANIFEST).exists():
                raise LearnerStateError(f"learner rank {self.rank}, save_state: {str(root)!r} already holds a "
                                        "learner state; write into a fresh directory (and rename it into place)")
            tensors, meta = self._collect_state()
            tname, jname = _rank_files(self.rank)
            save_file(tensors, str(root / tname), metadata={"format": LEARNER_STATE_FORMAT})
            (root / jname).write_text(json.dumps(meta, indent=1, sort_keys=True))
            for name in (tname, jname):
                os.chmod(root / name, 0o644)  # safetensors writes 0600; the state may be read by other users
                _fsync(root / name)  # on disk before the manifest says it is there
        except Exception as e:
            error = e
        self._agree("save_state", error)  # every rank's files exist (also the barrier before the manifest)
        if self.rank == 0:
            try:
                self._write_manifest(root)
            except Exception as e:
                error = e
        self._agree("save_state", error)  # nobody returns before the manifest is written
        log.info("learner rank %d: saved training state to %s in %.2f s", self.rank, root,
                 time.perf_counter() - t0)

    def _write_manifest(self, root: Path) -> None:
        import deepspeed

        files = {}
        for rank in range(self.world_size):
            for name in _rank_files(rank):
                f = root / name
                if not f.is_file():
                    raise LearnerStateError(
                        f"learner rank 0, save_state: learner rank {rank}'s file {str(f)!r} is not visible here; the "
                        "state directory must be on a file system shared by every learner")
                files[name] = f.stat().st_size
        manifest = {
            "format": LEARNER_STATE_FORMAT,
            "version": LEARNER_STATE_VERSION,
            **self._layout(),
            "optimizer": _OptimizerLayout(self.engine).kind,
            "applied_steps": self._applied_steps,
            "model_path": self.spec.model_path,
            "device": self.device.type,
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
            "files": files,
        }
        tmp = root / f".{LEARNER_STATE_MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.chmod(tmp, 0o644)
        _fsync(tmp)
        os.replace(tmp, root / LEARNER_STATE_MANIFEST)
        _fsync(root)  # the rename itself is durable

    def _read_rank_state(self, root: Path, layout: _OptimizerLayout) -> tuple[dict[str, torch.Tensor], dict]:
        """Validate and read this rank's files (no pickle: safetensors + JSON); nothing is changed yet."""
        from safetensors.torch import load_file

        where = f"learner rank {self.rank}, load_state from {str(root)!r}"
        manifest = read_learner_state_manifest(str(root))
        mismatch = _layout_mismatch(manifest, self._layout())
        if mismatch:
            raise LearnerStateError(f"{where}: {mismatch}")
        tname, jname = _rank_files(self.rank)
        if tname not in manifest["files"] or jname not in manifest["files"]:
            raise LearnerStateError(f"{where}: the manifest lists no files for this rank")
        meta = json.loads((root / jname).read_text())
        tensors = load_file(str(root / tname))
        if meta.get("rank") != self.rank or _layout_mismatch(meta, self._layout()):
            raise LearnerStateError(f"{where}: {jname} describes rank {meta.get('rank')} of another layout")
        if meta.get("optimizer") != layout.kind:
            raise LearnerStateError(f"{where}: saved with DeepSpeed optimizer {meta.get('optimizer')}, this learner "
                                    f"runs {layout.kind}")
        if len(meta["masters"]) != len(layout.masters) or len(meta["optimizer_state"]) != len(layout.masters):
            raise LearnerStateError(f"{where}: {len(meta['masters'])} master tensors saved, this rank has "
                                    f"{len(layout.masters)}: a different model or DeepSpeed partitioning")
        for k, (saved, master) in enumerate(zip(meta["masters"], layout.masters)):
            t = tensors.get(f"master.{k}")
            if (t is None or list(t.shape) != list(master.shape) or t.dtype != master.dtype
                    or saved["shape"] != list(master.shape)):
                got = None if t is None else (list(t.shape), str(t.dtype))
                raise LearnerStateError(f"{where}: master tensor {k} is {got} in the file, this rank has "
                                        f"{(list(master.shape), str(master.dtype))}: a different model or DeepSpeed "
                                        "partitioning")
            for key in meta["optimizer_state"][k]["tensors"]:
                if f"state.{k}.{key}" not in tensors:
                    raise LearnerStateError(f"{where}: optimizer state tensor state.{k}.{key} is missing")
        if "rng.torch" not in tensors:
            raise LearnerStateError(f"{where}: the torch RNG state is missing")
        return tensors, meta

    @torch.no_grad()
    def load_state(self, path: str) -> None:
        """Restore the training state written by :meth:`save_state`, so training continues bit for bit.

        Collective: every rank calls it (on a learner built with the same spec, typically a fresh
        one). First every rank validates without changing anything: the manifest exists (else the
        directory is incomplete), its files have the recorded sizes, world_size / zero_stage / dtype
        equal this learner's (else :class:`LearnerStateError` saying what differs: a different
        learner layout is not supported), and this rank's tensors have this rank's shapes. If any
        rank fails validation, every rank raises and the learner is untouched. Then: fp32 masters
        and AdamW state are copied in, the model weights re-derived from the masters (collective
        under ZeRO), and the LR schedule, counters and RNG states restored. Hyperparameters (lr,
        betas, ...) come from this learner's spec; the LR schedule continues at the saved position.
        The frozen reference model (``kl_coef > 0``) is the initial policy and is not part of the state.
        """
        t0 = time.perf_counter()
        root = Path(path)
        error: Optional[BaseException] = None
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        layout: Optional[_OptimizerLayout] = None
        try:
            layout = _OptimizerLayout(self.engine)
            tensors, meta = self._read_rank_state(root, layout)
        except Exception as e:
            error = e
        self._agree("load_state", error)
        assert layout is not None

        for k, master in enumerate(layout.masters):
            master.data.copy_(tensors[f"master.{k}"])
            saved = meta["optimizer_state"][k]
            if not saved["tensors"] and not saved["scalars"]:
                layout.base.state.pop(master, None)  # saved before this tensor's first update
                continue
            old = layout.base.state.get(master, {})
            new: dict[str, Any] = dict(saved["scalars"])
            for key in saved["tensors"]:
                t = tensors[f"state.{k}.{key}"]
                cur = old.get(key)
                if torch.is_tensor(cur) and cur.shape == t.shape and cur.dtype == t.dtype:
                    cur.copy_(t)  # in place: DeepSpeed may hold views of the moments (hp-param links)
                    new[key] = cur
                else:
                    # AdamW (neither fused nor capturable, as built here) keeps its step count on the CPU
                    # and the moments next to the parameter.
                    new[key] = t if t.dim() == 0 else t.to(master.device)
            layout.base.state[master] = new
        layout.sync()

        sched = self.engine.lr_scheduler
        sched.last_epoch = int(meta["lr_scheduler"]["last_epoch"])
        sched._step_count = int(meta["lr_scheduler"]["step_count"])
        # What LambdaLR.step computes for this position, from this spec's peak LR.
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
        for name, value in meta["engine"].items():
            setattr(self.engine, name, value)
        for obj, fields in zip(layout.scalers, meta["loss_scalers"]):
            for name, value in fields.items():
                setattr(obj, name, value)
        self._applied_steps = int(meta["applied_steps"])

        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        py_version, py_internal, py_gauss = meta["rng"]["python"]
        random.setstate((py_version, tuple(py_internal), py_gauss))
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = meta["rng"]["numpy"]
        np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
        log.info("learner rank %d: loaded training state from %s (%d applied steps) in %.2f s", self.rank, root,
                 self._applied_steps, time.perf_counter() - t0)

    def close(self) -> None:
        """Leave the process group (best effort); the learner is unusable afterwards."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # teardown after a failed peer: nothing left to recover
                log.debug("destroy_process_group failed on rank %d", self.rank, exc_info=True)


# ---- Ray --------------------------------------------------------------------------------------------


class _LearnerActor:
    """Ray actor body: one :class:`Learner`; every method is a thin call-through."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, init_file: str) -> None:
        self.learner = Learner(spec, rank, world_size, init_file)

    def ready(self) -> dict[str, Any]:
        lr = self.learner
        dtype = str(next(lr.engine.module.parameters()).dtype).removeprefix("torch.")
        return {"rank": lr.rank, "world_size": lr.world_size, "device": str(lr.device),
                "init_seconds": lr.init_seconds, "pid": os.getpid(), "dtype": dtype,
                "threads": torch.get_num_threads()}

    def train_step(self, batch: TrainBatch, old_logprobs: Optional[np.ndarray] = None) -> TrainStats:
        return self.learner.train_step(batch, old_logprobs)

    def compute_logprobs(self, batch: TrainBatch) -> np.ndarray:
        return self.learner.compute_logprobs(batch)

    def export_weight_buckets(self, bucket_bytes: int, dtype: Optional[str] = None) -> list:
        """Rank 0: ``ray.put`` each bucket, return the refs (the caller ships them on); others: []."""
        import ray

        # One bucket at a time: each is copied into the object store before the next is packed.
        return [ray.put(b) for b in self.learner.iter_weight_buckets(bucket_bytes, dtype)]

    def save_hf(self, path: str, dtype: Optional[str] = None) -> Optional[str]:
        return self.learner.save_hf(path, dtype)

    def save_state(self, path: str) -> None:
        self.learner.save_state(path)

    def load_state(self, path: str) -> None:
        self.learner.load_state(path)

    def close(self) -> None:
        self.learner.close()


def _remote_class():
    import ray

    return ray.remote(_LearnerActor)


class _LazyRemote:
    """``LearnerWorker.options(...)`` / ``.remote(...)`` without importing ray at module import."""

    _cls = None

    def __getattr__(self, name: str):
        if _LazyRemote._cls is None:
            _LazyRemote._cls = _remote_class()
        return getattr(_LazyRemote._cls, name)


#: The Ray actor class: ``LearnerWorker.options(num_cpus=..., ...).remote(spec, rank, world_size, init_file)``.
LearnerWorker = _LazyRemote()


class LearnerGroup:
    """Driver-side handle on ``num_workers`` learner actors (data-parallel ranks 0..n-1).

    ``actor_options`` go to ``LearnerWorker.options`` (resources, runtime_env; default
    ``num_cpus=1``; a ``name`` gets ``-{rank}`` appended). ``init_dir`` must be visible to every
    actor (same host, or a shared file system): the process group meets through a fresh file in it.
    The constructor returns once every rank is initialised. Calls block with a timeout and raise
    :class:`LearnerError` naming the phase and the rank that failed or is late.
    """

    def __init__(self, spec: LearnerSpec, num_workers: int, actor_options: Optional[dict] = None,
                 init_dir: Optional[str] = None, *, ready_timeout_s: float = 900.0,
                 call_timeout_s: float = 1800.0) -> None:
        import tempfile

        spec.validate()
        if num_workers < 1:
            raise ValueError(f"LearnerGroup num_workers must be >= 1, got {num_workers}")
        self.spec = spec
        self.num_workers = num_workers
        self.call_timeout_s = call_timeout_s
        self.actors: list = []
        # Absolute: the actors resolve it in their own working directory, which is not ours.
        root = Path(init_dir or tempfile.gettempdir()).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.init_file = str(root / f"rlsys_learner_pg_{os.getpid()}_{uuid.uuid4().hex[:12]}")
        if os.path.exists(self.init_file):
            os.unlink(self.init_file)  # a stale store would make the ranks disagree on the group
        base = dict(actor_options or {})
        base.setdefault("num_cpus", 1)
        try:
            for rank in range(num_workers):
                opts = dict(base)
                if "name" in opts:
                    opts["name"] = f"{opts['name']}-{rank}"
                self.actors.append(LearnerWorker.options(**opts).remote(spec, rank, num_workers, self.init_file))
            self.ready_info = self._wait(
                [a.ready.remote() for a in self.actors], "init", ready_timeout_s,
                hint="An actor that never starts usually means the cluster lacks the resources asked for "
                     f"({base.get('num_cpus')} CPU, {base.get('num_gpus', 0)} GPU per learner).")
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, refs: list, phase: str, timeout: float, hint: str = "") -> list:
        """ray.get every rank's result; fail fast on the first error, naming rank and phase."""
        import ray

        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LearnerError(
                    f"learner phase {phase!r}: rank(s) {sorted(pending.values())} did not finish within "
                    f"{timeout:.0f}s (ranks wait for each other in collectives, so one dead or slow rank stalls "
                    f"all; check that rank's log).{' ' + hint if hint else ''} Raise the timeout if the model "
                    "is just slow.")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            for ref in done:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as e:
                    raise LearnerError(f"learner rank {rank} failed in phase {phase!r}: {type(e).__name__}: {e}") \
                        from e
        return results

    def shard(self, batch: TrainBatch, pad_token_id: int = 0) -> list[TrainBatch]:
        """The global batch split into one part per rank (see ``batching.shard_train_batch``)."""
        from rlsys.workers.batching import shard_train_batch

        return shard_train_batch(batch, self.num_workers, self.spec.micro_batch_size, pad_token_id)

    def train_step(self, global_batch_parts: list[TrainBatch],
                   old_logprobs: Optional[list[np.ndarray]] = None) -> TrainStats:
        """One optimizer step over the global batch given as one part per rank; rank 0's (= global) stats."""
        parts = list(global_batch_parts)
        if len(parts) != self.num_workers:
            raise ValueError(f"LearnerGroup.train_step: got {len(parts)} batch parts for {self.num_workers} "
                             "learners; pass one part per rank (LearnerGroup.shard(batch))")
        sizes = (self.spec.micro_batch_size, self.spec.logprob_micro_batch_size or self.spec.micro_batch_size)
        counts = {tuple(num_micro_batches(p.num_rows, m) for m in sizes) for p in parts}
        if len(counts) != 1:
            raise ValueError(f"LearnerGroup.train_step: parts with {[p.num_rows for p in parts]} rows would run "
                             "different numbers of micro-batches on different ranks, and the ranks would wait on "
                             "each other forever; split the global batch with LearnerGroup.shard(batch)")
        norms = {p.loss_normalizer for p in parts}
        if len(norms) != 1:
            raise ValueError(f"LearnerGroup.train_step: parts carry different loss_normalizers {sorted(norms)}; all "
                             "must carry the global batch's normalizer")
        olds = old_logprobs or [None] * self.num_workers
        refs = [a.train_step.remote(p, o) for a, p, o in zip(self.actors, parts, olds)]
        return self._wait(refs, "train", self.call_timeout_s)[0]

    def compute_logprobs(self, batch: TrainBatch, pad_token_id: int = 0) -> np.ndarray:
        """Log-probs [N, L] of a whole batch, its rows spread over the ranks; same layout as the batch."""
        plans = plan_shards(batch.attention_mask.sum(axis=1), self.num_workers,
                            self.spec.logprob_micro_batch_size or self.spec.micro_batch_size)
        refs = [a.compute_logprobs.remote(take_rows(batch, plan, pad_token_id))
                for a, plan in zip(self.actors, plans)]
        out = np.zeros(batch.input_ids.shape, dtype=np.float32)
        for plan, part in zip(plans, self._wait(refs, "compute_logprobs", self.call_timeout_s)):
            real = plan >= 0
            out[plan[real]] = part[real]
        return out

    def export_weight_buckets(self, bucket_bytes: int, dtype: Optional[str] = None) -> list:
        """Refs to rank 0's weight buckets (``ray.get`` one -> WeightBucket; unpack_weight_bucket)."""
        refs = [a.export_weight_buckets.remote(bucket_bytes, dtype) for a in self.actors]
        return self._wait(refs, "export_weights", self.call_timeout_s)[0]

    def save_hf(self, path: str, dtype: Optional[str] = None) -> str:
        """Hugging Face checkpoint at ``path`` (written by rank 0 on its file system)."""
        refs = [a.save_hf.remote(path, dtype) for a in self.actors]
        return self._wait(refs, "save_hf", self.call_timeout_s)[0]

    def save_state(self, path: str, timeout_s: Optional[float] = None) -> None:
        """Every rank's training state into the directory ``path`` (see :meth:`Learner.save_state`).

        ``path`` must be visible to every learner (same host or a shared file system) and hold no
        learner state yet; it is complete when this returns (``learner_state.json`` written last).
        Raises :class:`LearnerError` naming the rank that failed or is late (``timeout_s``, default
        ``call_timeout_s``).
        """
        refs = [a.save_state.remote(path) for a in self.actors]
        self._wait_state(refs, "save_state", self.call_timeout_s if timeout_s is None else timeout_s)

    def load_state(self, path: str, timeout_s: Optional[float] = None) -> None:
        """Restore every rank from ``path`` (see :meth:`Learner.load_state`); the next train_step continues
        exactly where the run that saved it would have. The group must have the same number of learners,
        ZeRO stage and dtype; otherwise, or if ``path`` is incomplete, :class:`LearnerError` (wrapping a
        :class:`LearnerStateError` that says what is wrong) and no rank is changed.
        """
        refs = [a.load_state.remote(path) for a in self.actors]
        self._wait_state(refs, "load_state", self.call_timeout_s if timeout_s is None else timeout_s)

    def _wait_state(self, refs: list, phase: str, timeout: float) -> None:
        """``_wait``, but report the rank that failed, not a rank that stopped because of it.

        save_state/load_state fail on every rank together (they agree before any collective), so
        the first error to arrive may be a bystander's "rank(s) [r] failed"; rank r's own error
        (already raised by then) says what is wrong.
        """
        import ray

        try:
            self._wait(refs, phase, timeout)
        except LearnerError as e:
            if _PEER_FAILED not in str(e):
                raise
            for rank, ref in enumerate(refs):
                try:
                    ray.get(ref, timeout=60)
                except Exception as own:
                    if _PEER_FAILED not in str(own):
                        raise LearnerError(f"learner rank {rank} failed in phase {phase!r}: "
                                           f"{type(own).__name__}: {own}") from own
            raise

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Leave the process group, kill the actors, remove the rendezvous file. Idempotent.

        When the job is being stopped by a signal (rlsys.signals) the actors are killed without
        the graceful close, which would queue behind a train step (or a collective) still running."""
        import ray

        from rlsys.signals import stopping

        if self.actors:
            if not stopping():
                refs = [a.close.remote() for a in self.actors]
                ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            for a in self.actors:
                ray.kill(a, no_restart=True)
            self.actors = []
        if self.init_file and os.path.exists(self.init_file):
            try:
                os.unlink(self.init_file)
            except OSError:
                pass

