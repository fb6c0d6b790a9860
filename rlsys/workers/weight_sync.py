"""The object-store weight transport (``sync.transport=object_store``): learner weights -> every rollout engine.

The default transport is torchdist (rlsys.workers.torchdist, docs/weight-transfer.md); this one stays
as the fallback. The learner group streams (name, tensor) pairs (ZeRO-3 gathers one
layer at a time), rank 0 packs them into buckets of ~``bucket_bytes`` and ``ray.put``s each one;
bf16 tensors travel as int16 numpy views, which Ray's object store hands back zero-copy. Each
rollout worker pulls the buckets lazily inside one ``reload_weights`` call, so one bucket at a
time is resident on the rollout side. Measurements (against pickled torch tensors):
docs/lab-notes.md#weight_sync.

It needs in-process engines: each engine takes a lazy Python iterator over the refs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Tensors travel as numpy arrays; dtypes numpy lacks travel as same-width integer views.
_VIEW_AS = {torch.bfloat16: (np.int16, torch.int16), torch.float16: (np.float16, None)}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAMES_TO_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass(frozen=True)
class WeightBucket:
    """A slice of the model's weights in Hugging Face checkpoint naming."""

    names: tuple[str, ...]
    dtypes: tuple[str, ...]  # torch dtype names ("bfloat16", "float32", "float16")
    arrays: tuple[np.ndarray, ...]  # each shaped like its parameter; bf16 as int16 views

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))


def pack_bucket(named: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    """(name, CPU tensor) pairs -> WeightBucket (no copy for contiguous CPU tensors)."""
    names, dtypes, arrays = [], [], []
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"weight {name!r} has dtype {t.dtype}; sync supports {sorted(_NAMES_TO_DTYPE)}")
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy()
        else:
            arr = t.numpy()
        names.append(name)
        dtypes.append(_DTYPE_NAMES[t.dtype])
        arrays.append(arr)
    return WeightBucket(tuple(names), tuple(dtypes), tuple(arrays))


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """WeightBucket -> (name, tensor) pairs; zero-copy views over the arrays where possible."""
    out = []
    for name, dtype, arr in zip(bucket.names, bucket.dtypes, bucket.arrays):
        if not arr.flags.writeable:
            # Ray's object store returns read-only buffers; torch warns on (and must not write to)
            # them, so take a private copy. Loading copies into the engine's parameters anyway.
            arr = arr.copy()
        t = torch.from_numpy(arr)
        if dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        out.append((name, t))
    return out


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Group a stream of (name, tensor) into buckets of at least one tensor and ~bucket_bytes."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        pending.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield pack_bucket(pending)
            pending, size = [], 0
    if pending:
        yield pack_bucket(pending)
