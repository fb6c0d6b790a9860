"""Getting the weights out of a learner: streamed (HF name, tensor) pairs, weight buckets, HF checkpoints.

Functions of a :class:`~rlsys.workers.learner.engine.Learner` (its methods of the same names call
them). All are collectives under ZeRO-3 (parameters are gathered ``spec.gather_bytes`` at a time),
so every rank must call them, and exhaust the iterators; only rank 0's output is meant to be used.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlsys.fsutil import replace_dir
from rlsys.workers.learner.spec import DTYPES
from rlsys.workers.torchdist import TensorMeta
from rlsys.workers.weight_sync import WeightBucket, iter_buckets, unpack_bucket

if TYPE_CHECKING:
    from rlsys.workers.learner.engine import Learner

__all__ = ["iter_named_weights", "iter_weight_buckets", "save_hf", "unpack_weight_bucket", "weight_meta"]

# Files of a source checkpoint that save_hf does NOT copy: weights (rewritten), config (rewritten),
# and rlsys' tiny-model build marker (it describes the untrained weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "rlsys_model.json"}


def unpack_weight_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """Receiving side of :meth:`LearnerWorker.export_weight_buckets`: bucket -> (name, tensor).

    Each entry carries its dtype tag: float32 travels as float32, bfloat16 as an int16 view that is
    viewed back (``torch.from_numpy(a).view(torch.bfloat16)``). Same as
    :func:`rlsys.workers.weight_sync.unpack_bucket`, which rollout workers use.
    """
    return unpack_bucket(bucket)


def _gather_groups(learner: Learner) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """(HF name, parameter) in module order, grouped to about ``gather_bytes`` per group; a parameter
    shared by several modules (tied embeddings: ``lm_head.weight``) comes once, under its first name."""
    group: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    seen: set[int] = set()
    for mod_name, module in learner.hf.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{pname}" if mod_name else pname
            group.append((name, p))
            size += getattr(p, "ds_numel", p.numel()) * p.element_size()
            if size >= learner.spec.gather_bytes:
                yield group
                group, size = [], 0
    if group:
        yield group


def iter_named_weights(learner: Learner, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the HF model as (HF checkpoint name, CPU tensor copy), module order.

    ``copy=False``: parameters already in CPU memory come as detached views of the live weights (a
    consumer that copies each one at once, such as the torchdist sender, saves a pass over the
    model); gathered ZeRO-3 parameters are always copied (the gather is released after each group).

    A tied matrix comes once, as a checkpoint stores it (``model.embed_tokens.weight``, no
    ``lm_head.weight``): vLLM's loaders tie it themselves, and some (Gemma 2 / 3) have no ``lm_head``
    to load into. Dtype: the training dtype. Under ZeRO-3 the
    parameters are gathered ``gather_bytes`` at a time (bounded memory): a collective, so every
    rank must exhaust this generator; only rank 0's output is meant to be used.
    """
    z3 = learner.spec.zero_stage == 3
    if z3:
        import deepspeed
    for group in _gather_groups(learner):
        params = list({id(p): p for _, p in group}.values())
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if z3 else nullcontext()
        with ctx:
            copies = [(name, p.detach().to("cpu", copy=copy or z3)) for name, p in group]
        yield from copies
    for mod_name, module in learner.hf.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname in getattr(module, "_non_persistent_buffers_set", set()):
                continue  # e.g. rotary inv_freq: recomputed from the config, not in checkpoints
            yield (f"{mod_name}.{bname}" if mod_name else bname), buf.detach().to("cpu", copy=copy)


def weight_meta(learner: Learner) -> list[TensorMeta]:
    """What :func:`iter_named_weights` yields, (name, dtype, shape) per tensor in the same order, read
    from the module structure without gathering anything (ZeRO-3: each parameter's ``ds_shape``).
    Local to the calling rank; no collective."""
    meta = []
    for group in _gather_groups(learner):
        for name, p in group:
            shape = tuple(int(s) for s in getattr(p, "ds_shape", p.shape))
            meta.append(TensorMeta(name, str(p.dtype).removeprefix("torch."), shape))
    for mod_name, module in learner.hf.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname in getattr(module, "_non_persistent_buffers_set", set()):
                continue
            meta.append(TensorMeta.of(f"{mod_name}.{bname}" if mod_name else bname, buf))
    return meta


def iter_weight_buckets(learner: Learner, bucket_bytes: int, dtype: str | None = None) -> Iterator[WeightBucket]:
    """Rank 0: the weights as :class:`WeightBucket`s of ~``bucket_bytes``, streamed; others: none.

    Collective: every rank must exhaust it (each iterates :func:`iter_named_weights`). ``dtype``
    ("bfloat16" or "float32") casts before packing, e.g. to ship bf16 to a bf16 inference engine.
    Buckets follow :mod:`rlsys.workers.weight_sync` (bf16 as int16 views, a dtype tag per entry).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {DTYPES} or None, got {dtype!r}")
    cast = None if dtype is None else getattr(torch, dtype)
    named = (
        (n, t if cast is None or not t.is_floating_point() else t.to(cast)) for n, t in iter_named_weights(learner)
    )
    if learner.rank != 0:
        for _ in named:
            pass
        return
    yield from iter_buckets(named, bucket_bytes)


def save_hf(learner: Learner, path: str, dtype: str | None = None, max_shard_bytes: int = 4 * 1024**3) -> str | None:
    """Write a Hugging Face checkpoint directory at ``path``; returns it on rank 0, None elsewhere.

    Weights as safetensors (``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` plus an
    index past ``max_shard_bytes``), ``config.json`` (``dtype`` = the saved dtype), and every
    other file of the source checkpoint (tokenizer, chat template, generation config). Tied
    weights are written once, as transformers does. Atomic: built in a sibling temp directory and
    renamed into place (an existing ``path`` is replaced). Collective under ZeRO-3.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    cast = None if dtype is None else getattr(torch, dtype)
    final = Path(path)
    is_writer = learner.rank == 0
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_writer:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0
    saved_dtype = dtype if dtype is not None else str(learner.torch_dtype).replace("torch.", "")

    def flush() -> None:
        nonlocal pending, size
        if pending:
            save_file(pending, str(tmp / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, size = {}, 0

    try:
        for name, t in iter_named_weights(learner):  # tied weights once, as checkpoints store them
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
            _finish_checkpoint(learner, tmp, final, shards, saved_dtype)
    except BaseException:
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if learner.world_size > 1:
            dist.barrier()  # the directory is complete when any rank returns
    return str(final) if is_writer else None


def _finish_checkpoint(learner: Learner, tmp: Path, final: Path, shards: list[list[str]], saved_dtype: str) -> None:
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
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config = copy.deepcopy(learner.hf.config)
    config.dtype = saved_dtype
    config.use_cache = True  # training switched it off; inference wants it
    config.save_pretrained(str(tmp))
    src = Path(learner.spec.model_path)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, tmp / f.name)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600; checkpoints are read by other processes/users
    os.chmod(tmp, 0o755)
    replace_dir(tmp, final)
