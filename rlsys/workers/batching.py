"""Pure numpy helpers that turn rollouts into learner batches (no torch, no Ray).

Layout (see :class:`rlsys.records.TrainBatch`): one row per sampled response, ``prompt + response``
right-padded to a common length L. Every ``[N, L]`` array is aligned with ``input_ids``: the value
at column t concerns token t, whose log-prob the learner computes from the logits at t - 1. So a
row's response occupies columns ``P_i .. P_i + T_i - 1`` of ``response_mask`` and
``rollout_logprobs``; column 0 is always a prompt token (a prompt needs at least one token).

Exactness across micro-batches and ranks: the loss of any piece of the global batch is
"sum of per-row terms / loss_normalizer", with one normalizer computed once from the whole global
batch (:func:`loss_normalizer_for`) and carried by every shard and micro-batch. Pieces then add
up to the full-batch loss regardless of how the rows are split.

Data-parallel ranks must run the same number of micro-batches (ZeRO reduces gradients, and under
ZeRO-3 gathers parameters, with one collective per micro-batch), so :func:`shard_train_batch`
pads shards with inert dummy rows: all-False ``response_mask``, advantage 0, pad token ids, and
an attention mask with only column 0 set (a fully masked row would make attention softmax NaN,
and a NaN activation poisons the backward pass even where its gradient weight is zero).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np

from rlsys.choices import AGG_MODES
from rlsys.records import TrainBatch

__all__ = [
    "AGG_MODES",
    "build_train_batch",
    "concat_train_batches",
    "iter_micro_batches",
    "loss_normalizer_for",
    "num_micro_batches",
    "plan_shards",
    "shard_train_batch",
    "split_mini_batches",
    "take_rows",
    "trim_padding",
]


def loss_normalizer_for(agg: str, response_mask: np.ndarray) -> float:
    """The global loss normalizer for ``agg`` over a full batch's ``response_mask`` [N, L].

    ``token_mean``: total response tokens. ``seq_mean_token_mean`` / ``seq_mean_token_sum_norm``:
    number of rows with at least one response token. An empty batch returns 1.0 (its loss is 0
    whatever the normalizer; TrainBatch requires a positive one).
    """
    mask = np.asarray(response_mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"response_mask must be [N, L], got shape {mask.shape}")
    if agg == "token_mean":
        value = float(mask.sum())
    elif agg in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        value = float(mask.any(axis=1).sum())
    else:
        raise ValueError(f"unknown agg {agg!r}; choose one of {AGG_MODES}")
    return value if value > 0 else 1.0


def build_train_batch(
    prompt_token_ids: Sequence[Sequence[int] | np.ndarray],
    response_token_ids: Sequence[Sequence[int] | np.ndarray],
    response_logprobs: Sequence[Sequence[float] | np.ndarray],
    advantages: Sequence[float],
    pad_token_id: int,
    loss_normalizer: float,
) -> TrainBatch:
    """Rows ``prompt_i + response_i``, right-padded to the longest, as a :class:`TrainBatch`.

    Args:
        prompt_token_ids: N prompts, each with >= 1 token.
        response_token_ids: N responses (may be empty: such a row contributes nothing).
        response_logprobs: N sequences, ``len == len(response_i)``: the rollout engine's log-probs.
        advantages: N floats, one per row (broadcast over its response tokens by the loss).
        pad_token_id: id written into padding columns (they are masked out everywhere).
        loss_normalizer: the GLOBAL normalizer of the step's whole batch (see
            :func:`loss_normalizer_for`). To derive it from the batch being built, build with 1.0
            and then ``dataclasses.replace(b, loss_normalizer=loss_normalizer_for(agg, b.response_mask))``.

    Returns:
        TrainBatch with ``input_ids`` [N, L] int64, ``attention_mask`` [N, L] bool (True over
        prompt + response), ``response_mask`` [N, L] bool (True over the response columns),
        ``rollout_logprobs`` [N, L] float32 (the given values at response columns, 0 elsewhere),
        ``advantages`` [N] float32.
    """
    n = len(prompt_token_ids)
    if not (len(response_token_ids) == len(response_logprobs) == len(advantages) == n):
        raise ValueError(
            "build_train_batch: prompt_token_ids, response_token_ids, response_logprobs and advantages "
            f"must have one entry per row; got {n}, {len(response_token_ids)}, {len(response_logprobs)}, "
            f"{len(advantages)}"
        )
    if n == 0:
        raise ValueError("build_train_batch: no rows (a step needs at least one response)")
    lengths = []
    for i, (p, r, lp) in enumerate(zip(prompt_token_ids, response_token_ids, response_logprobs)):
        if len(p) == 0:
            raise ValueError(
                f"build_train_batch: row {i} has an empty prompt; the first token's "
                "log-prob is undefined, so every row needs >= 1 prompt token"
            )
        if len(lp) != len(r):
            raise ValueError(f"build_train_batch: row {i} has {len(r)} response tokens but {len(lp)} rollout log-probs")
        lengths.append(len(p) + len(r))
    length = max(lengths)
    input_ids = np.full((n, length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((n, length), dtype=bool)
    response_mask = np.zeros((n, length), dtype=bool)
    rollout_logprobs = np.zeros((n, length), dtype=np.float32)
    for i, (p, r, lp) in enumerate(zip(prompt_token_ids, response_token_ids, response_logprobs)):
        np_, nr = len(p), len(r)
        input_ids[i, :np_] = np.asarray(p, dtype=np.int64)
        input_ids[i, np_ : np_ + nr] = np.asarray(r, dtype=np.int64)
        attention_mask[i, : np_ + nr] = True
        response_mask[i, np_ : np_ + nr] = True
        rollout_logprobs[i, np_ : np_ + nr] = np.asarray(lp, dtype=np.float32)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=np.asarray(advantages, dtype=np.float32).reshape(n),
        rollout_logprobs=rollout_logprobs,
        loss_normalizer=float(loss_normalizer),
    )


def take_rows(batch: TrainBatch, indices: Sequence[int] | np.ndarray, pad_token_id: int = 0) -> TrainBatch:
    """Rows ``indices`` of ``batch`` (a copy); index -1 yields an inert dummy row.

    Dummy rows: ``input_ids`` = ``pad_token_id``, attention on column 0 only (never a fully
    masked row), no response tokens, advantage 0, rollout log-probs 0. The normalizer is kept.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.max() >= batch.num_rows or idx.min() < -1):
        raise ValueError(f"take_rows: indices must be in [-1, {batch.num_rows}), got {idx.min()}..{idx.max()}")
    real = idx >= 0
    safe = np.where(real, idx, 0)
    input_ids = batch.input_ids[safe].copy()
    attention_mask = batch.attention_mask[safe].copy()
    response_mask = batch.response_mask[safe].copy()
    advantages = batch.advantages[safe].astype(np.float32, copy=True)
    rollout_logprobs = batch.rollout_logprobs[safe].astype(np.float32, copy=True)
    old = None if batch.old_logprobs is None else batch.old_logprobs[safe].astype(np.float32, copy=True)
    dummy = ~real
    if dummy.any():
        input_ids[dummy] = pad_token_id
        attention_mask[dummy] = False
        attention_mask[dummy, :1] = True
        response_mask[dummy] = False
        advantages[dummy] = 0.0
        rollout_logprobs[dummy] = 0.0
        if old is not None:
            old[dummy] = 0.0
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        advantages=advantages,
        rollout_logprobs=rollout_logprobs,
        loss_normalizer=batch.loss_normalizer,
        old_logprobs=old,
    )


def num_micro_batches(num_rows: int, micro_batch_size: int) -> int:
    """ceil(num_rows / micro_batch_size): how many micro-batches :func:`iter_micro_batches` yields."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return -(-num_rows // micro_batch_size)


def plan_shards(seq_lengths: Sequence[int], world_size: int, micro_batch_size: int) -> list[np.ndarray]:
    """Assign N rows to ``world_size`` shards of equal row count, balanced by sequence length.

    Every shard gets ``R`` slots, ``R = ceil(N / world_size)`` rounded up to a multiple of
    ``micro_batch_size`` (so each shard runs exactly ``R / micro_batch_size`` micro-batches).
    Rows go longest-first to the shard with the fewest tokens that still has a free slot
    (greedy LPT); inside a shard rows are ordered longest-first, so the k-th micro-batches of all
    ranks, which run in lock-step, have similar lengths, and trimming padding per micro-batch
    removes the most columns. Unused slots hold -1 (dummy rows, see :func:`take_rows`).

    Returns:
        ``world_size`` int64 arrays of length R; each real row index appears in exactly one.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    lengths = np.asarray(seq_lengths, dtype=np.int64).reshape(-1)
    n = lengths.size
    per_shard = max(1, -(-n // world_size))
    per_shard = -(-per_shard // micro_batch_size) * micro_batch_size
    loads = np.zeros(world_size, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(world_size)]
    # Stable sort: equal lengths keep their original order, so the plan is deterministic.
    for i in np.argsort(-lengths, kind="stable"):
        open_shards = [s for s in range(world_size) if len(members[s]) < per_shard]
        s = min(open_shards, key=lambda k: (loads[k], len(members[k]), k))
        members[s].append(int(i))
        loads[s] += int(lengths[i])
    plans = []
    for rows in members:
        # rows were appended longest-first already; pad the tail with dummies.
        plans.append(np.asarray(rows + [-1] * (per_shard - len(rows)), dtype=np.int64))
    return plans


def shard_train_batch(
    batch: TrainBatch, world_size: int, micro_batch_size: int, pad_token_id: int = 0
) -> list[TrainBatch]:
    """Split a global batch into ``world_size`` shards for data-parallel learners.

    Balanced by sequence length (see :func:`plan_shards`); every shard has the same number of rows,
    a multiple of ``micro_batch_size``, padded with inert dummy rows; each real row appears in
    exactly one shard; every shard keeps the global ``loss_normalizer``.
    """
    lengths = batch.attention_mask.sum(axis=1)
    return [take_rows(batch, plan, pad_token_id) for plan in plan_shards(lengths, world_size, micro_batch_size)]


def trim_padding(batch: TrainBatch) -> TrainBatch:
    """Drop trailing columns where no row has attention (right padding); values are unchanged.

    Exact for causal models with right padding: real tokens never attend to later columns.
    At least one column is kept.
    """
    cols = np.flatnonzero(batch.attention_mask.any(axis=0))
    keep = int(cols[-1]) + 1 if cols.size else 1
    if keep == batch.input_ids.shape[1]:
        return batch
    return TrainBatch(
        input_ids=batch.input_ids[:, :keep],
        attention_mask=batch.attention_mask[:, :keep],
        response_mask=batch.response_mask[:, :keep],
        advantages=batch.advantages,
        rollout_logprobs=batch.rollout_logprobs[:, :keep],
        loss_normalizer=batch.loss_normalizer,
        old_logprobs=None if batch.old_logprobs is None else batch.old_logprobs[:, :keep],
    )


def iter_micro_batches(batch: TrainBatch, micro_batch_size: int) -> Iterator[tuple[slice, TrainBatch]]:
    """Consecutive micro-batches of ``micro_batch_size`` rows (the last may be smaller).

    Yields ``(rows, micro_batch)``: ``rows`` is the slice of ``batch`` rows it covers, and the
    micro-batch has its right-padding columns trimmed (:func:`trim_padding`), so its width may be
    less than the batch's L: results for columns ``0..width-1`` map back to ``[rows, :width]``.
    Views, not copies. Exactly :func:`num_micro_batches` items.
    """
    n = batch.num_rows
    for k in range(num_micro_batches(n, micro_batch_size)):
        rows = slice(k * micro_batch_size, min(n, (k + 1) * micro_batch_size))
        mb = TrainBatch(
            input_ids=batch.input_ids[rows],
            attention_mask=batch.attention_mask[rows],
            response_mask=batch.response_mask[rows],
            advantages=batch.advantages[rows],
            rollout_logprobs=batch.rollout_logprobs[rows],
            loss_normalizer=batch.loss_normalizer,
            old_logprobs=None if batch.old_logprobs is None else batch.old_logprobs[rows],
        )
        yield rows, trim_padding(mb)


def concat_train_batches(batches: Sequence[TrainBatch], pad_token_id: int = 0) -> TrainBatch:
    """Stack batches row-wise, right-padding to the widest; all must share one ``loss_normalizer``."""
    if not batches:
        raise ValueError("concat_train_batches: nothing to concatenate")
    norms = {b.loss_normalizer for b in batches}
    if len(norms) != 1:
        raise ValueError(f"concat_train_batches: batches carry different loss_normalizers {sorted(norms)}")
    olds = [b.old_logprobs for b in batches if b.old_logprobs is not None]
    if olds and len(olds) != len(batches):
        raise ValueError("concat_train_batches: some batches carry old_logprobs and some do not")
    length = max(b.input_ids.shape[1] for b in batches)

    def pad(a: np.ndarray, value: float) -> np.ndarray:
        extra = length - a.shape[1]
        return a if extra == 0 else np.pad(a, ((0, 0), (0, extra)), constant_values=value)

    return TrainBatch(
        input_ids=np.concatenate([pad(b.input_ids, pad_token_id) for b in batches]),
        attention_mask=np.concatenate([pad(b.attention_mask, False) for b in batches]),
        response_mask=np.concatenate([pad(b.response_mask, False) for b in batches]),
        advantages=np.concatenate([b.advantages for b in batches]).astype(np.float32),
        rollout_logprobs=np.concatenate([pad(b.rollout_logprobs, 0.0) for b in batches]).astype(np.float32),
        loss_normalizer=batches[0].loss_normalizer,
        old_logprobs=(
            np.concatenate([pad(o, 0.0) for o in olds]).astype(np.float32) if len(olds) == len(batches) else None
        ),
    )


def split_mini_batches(
    batch: TrainBatch, group_size: int, num_mini_batches: int, agg: str, order: Sequence[int] | np.ndarray | None = None
) -> list[TrainBatch]:
    """PPO mini-batches of a step's batch: its groups split into ``min(num_mini_batches, groups)`` parts.

    ``batch`` holds whole groups in group-major order (``group_size`` consecutive rows each, as the
    driver builds it). Groups are taken in ``order`` (a permutation of the group indices; default:
    as they are) and dealt out in contiguous, nearly equal runs (sizes differ by at most one group).
    Each part carries its OWN loss normalizer (``agg`` over its rows), so the exact micro-batch and
    rank invariance of :func:`shard_train_batch` holds within every mini-batch; ``old_logprobs``
    travel with their rows.
    """
    if group_size < 1 or batch.num_rows % group_size:
        raise ValueError(f"split_mini_batches: {batch.num_rows} rows are not whole groups of {group_size}")
    if num_mini_batches < 1:
        raise ValueError(f"split_mini_batches: num_mini_batches must be >= 1, got {num_mini_batches}")
    groups = batch.num_rows // group_size
    perm = np.arange(groups) if order is None else np.asarray(order, dtype=np.int64).reshape(-1)
    if sorted(perm.tolist()) != list(range(groups)):
        raise ValueError(f"split_mini_batches: order must be a permutation of the {groups} group indices")
    parts = []
    for chunk in np.array_split(perm, min(num_mini_batches, groups)):
        rows = (chunk[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
        part = take_rows(batch, rows)
        parts.append(replace(part, loss_normalizer=loss_normalizer_for(agg, part.response_mask)))
    return parts
