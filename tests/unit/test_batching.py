"""rlsys.workers.batching: row layout, normalizers, sharding, micro-batching (pure numpy)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from rlsys.workers.batching import (
    build_train_batch,
    concat_train_batches,
    iter_micro_batches,
    loss_normalizer_for,
    num_micro_batches,
    plan_shards,
    shard_train_batch,
    take_rows,
    trim_padding,
)

PAD = 0


def _batch(n: int = 7, seed: int = 0, normalizer: float = 1.0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 100, size=rng.integers(1, 6))) for _ in range(n)]
    responses = [list(rng.integers(3, 100, size=rng.integers(0, 9))) for _ in range(n)]
    logprobs = [list(-rng.random(len(r)) - 0.01) for r in responses]
    advantages = list(rng.normal(size=n))
    return (
        prompts,
        responses,
        logprobs,
        advantages,
        build_train_batch(prompts, responses, logprobs, advantages, PAD, normalizer),
    )


def test_build_aligns_response_tokens_and_logprobs() -> None:
    prompts, responses, logprobs, advantages, b = _batch()
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    assert b.input_ids.shape == (7, longest) and b.input_ids.dtype == np.int64
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        n_p, n_r = len(p), len(r)
        assert b.input_ids[i, :n_p].tolist() == p
        assert b.input_ids[i, n_p : n_p + n_r].tolist() == r
        assert (b.input_ids[i, n_p + n_r :] == PAD).all()
        # response_mask marks exactly the response columns: column t <-> token t.
        assert np.flatnonzero(b.response_mask[i]).tolist() == list(range(n_p, n_p + n_r))
        assert np.flatnonzero(b.attention_mask[i]).tolist() == list(range(n_p + n_r))
        np.testing.assert_allclose(b.rollout_logprobs[i, n_p : n_p + n_r], np.asarray(lp, dtype=np.float32))
        assert (b.rollout_logprobs[i][~b.response_mask[i]] == 0).all()
    assert not b.response_mask[:, 0].any()  # column 0 is a prompt token: no logits predict it
    np.testing.assert_allclose(b.advantages, np.asarray(advantages, dtype=np.float32))


def test_build_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        build_train_batch([[]], [[5]], [[-1.0]], [0.0], PAD, 1.0)
    with pytest.raises(ValueError, match="rollout log-probs"):
        build_train_batch([[1]], [[5, 6]], [[-1.0]], [0.0], PAD, 1.0)
    with pytest.raises(ValueError, match="one entry per row"):
        build_train_batch([[1], [2]], [[5]], [[-1.0]], [0.0], PAD, 1.0)


def test_loss_normalizer_values() -> None:
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    assert loss_normalizer_for("token_mean", mask) == 6.0
    assert loss_normalizer_for("seq_mean_token_mean", mask) == 2.0  # the empty row does not count
    assert loss_normalizer_for("seq_mean_token_sum_norm", mask) == 2.0
    assert loss_normalizer_for("token_mean", np.zeros((2, 3), dtype=bool)) == 1.0
    with pytest.raises(ValueError, match="unknown agg"):
        loss_normalizer_for("mean", mask)


@pytest.mark.parametrize("n,world,mbs", [(7, 2, 2), (7, 3, 1), (1, 4, 2), (16, 2, 4), (5, 1, 3)])
def test_shards_cover_every_row_once_with_equal_micro_batch_counts(n: int, world: int, mbs: int) -> None:
    *_, b = _batch(n, seed=n + world)
    b = replace(b, loss_normalizer=loss_normalizer_for("token_mean", b.response_mask))
    plans = plan_shards(b.attention_mask.sum(axis=1), world, mbs)
    real = np.concatenate([p[p >= 0] for p in plans])
    assert sorted(real.tolist()) == list(range(n))
    shards = shard_train_batch(b, world, mbs, PAD)
    assert len(shards) == world
    assert len({s.num_rows for s in shards}) == 1 and shards[0].num_rows % mbs == 0
    assert len({num_micro_batches(s.num_rows, mbs) for s in shards}) == 1
    assert all(s.loss_normalizer == b.loss_normalizer for s in shards)
    # The shards hold exactly the original rows' tokens, advantages and log-probs.
    assert sum(int(s.response_mask.sum()) for s in shards) == int(b.response_mask.sum())
    for plan, shard in zip(plans, shards):
        for slot, row in enumerate(plan):
            if row >= 0:
                np.testing.assert_array_equal(shard.input_ids[slot], b.input_ids[row])
                np.testing.assert_array_equal(shard.response_mask[slot], b.response_mask[row])
                assert shard.advantages[slot] == b.advantages[row]


def test_shards_balance_tokens() -> None:
    lengths = [5, 100, 10, 90, 80, 70, 10, 5]
    plans = plan_shards(lengths, 2, 2)
    loads = [sum(lengths[i] for i in p if i >= 0) for p in plans]
    assert loads == [185, 185]  # a contiguous split would give 275 / 95
    # Longest-first inside each shard: the k-th micro-batches of the ranks have similar lengths.
    for p in plans:
        real = [lengths[i] for i in p if i >= 0]
        assert real == sorted(real, reverse=True)


def test_padding_rows_are_inert() -> None:
    *_, b = _batch(3)
    padded = take_rows(b, [2, -1, 0, -1], pad_token_id=PAD)
    for slot in (1, 3):
        assert not padded.response_mask[slot].any()
        assert padded.advantages[slot] == 0.0
        assert (padded.rollout_logprobs[slot] == 0).all()
        assert (padded.input_ids[slot] == PAD).all()
        # Exactly one attended column: never a fully masked attention row (NaN softmax).
        assert padded.attention_mask[slot].tolist() == [True] + [False] * (padded.input_ids.shape[1] - 1)
    assert loss_normalizer_for("token_mean", padded.response_mask) == b.response_mask[[2, 0]].sum()
    with pytest.raises(ValueError, match="indices"):
        take_rows(b, [3])


def test_micro_batches_trim_padding_and_map_back() -> None:
    *_, b = _batch(7, seed=3)
    out = np.zeros(b.input_ids.shape, dtype=np.int64)
    count = 0
    for rows, mb in iter_micro_batches(b, 3):
        count += 1
        width = mb.input_ids.shape[1]
        # Trimmed to the micro-batch's own longest row, nothing that matters is lost.
        assert width == int(b.attention_mask[rows].sum(axis=1).max())
        assert mb.response_mask.sum() == b.response_mask[rows].sum()
        assert mb.loss_normalizer == b.loss_normalizer
        out[rows, :width] = mb.input_ids
    assert count == num_micro_batches(7, 3) == 3
    np.testing.assert_array_equal(np.where(b.attention_mask, out, PAD), np.where(b.attention_mask, b.input_ids, PAD))


def test_trim_keeps_one_column_and_concat_roundtrips() -> None:
    *_, b = _batch(4, seed=5)
    assert trim_padding(take_rows(b, [-1, -1])).input_ids.shape[1] == 1
    parts = shard_train_batch(b, 2, 1, PAD)
    merged = concat_train_batches([trim_padding(p) for p in parts], PAD)
    assert merged.num_rows == 4 and int(merged.response_mask.sum()) == int(b.response_mask.sum())
    with pytest.raises(ValueError, match="normalizers"):
        concat_train_batches([b, replace(b, loss_normalizer=2.0)])


# ---- the learner's pure pieces (no DeepSpeed, no Ray) ----------------------------------------------


def test_learner_spec_validation_and_warmup() -> None:
    from rlsys.workers.learner import LearnerSpec, _lr_factor

    LearnerSpec(model_path="m").validate()
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(zero_stage=4), "zero_stage"),
        (dict(dtype="float16"), "dtype"),
        (dict(agg="seq_mean_token_sum_norm"), "token_sum_constant"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(betas=(0.9, 1.0)), "betas"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            LearnerSpec(model_path="m", **bad).validate()
    assert [_lr_factor(4, k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _lr_factor(0, 0) == 1.0


def test_split_mini_batches_deals_whole_groups_with_their_own_normalizers():
    import dataclasses

    from rlsys.workers.batching import build_train_batch, loss_normalizer_for, split_mini_batches

    g, groups = 2, 5
    prompts = [[1, 2]] * (g * groups)
    responses = [[3] * (1 + i) for i in range(g * groups)]  # row i has i + 1 response tokens
    lps = [[-0.1] * len(r) for r in responses]
    b = build_train_batch(prompts, responses, lps, list(range(g * groups)), pad_token_id=0, loss_normalizer=1.0)
    old = np.where(b.response_mask, -2.0, 0.0).astype(np.float32)
    b = dataclasses.replace(b, old_logprobs=old)
    parts = split_mini_batches(b, g, 2, "token_mean", order=[4, 0, 3, 1, 2])
    # 5 groups into 2: 3 + 2 groups, in the given order, rows of a group together
    assert [p.advantages.tolist() for p in parts] == [[8, 9, 0, 1, 6, 7], [2, 3, 4, 5]]
    for p in parts:
        assert p.loss_normalizer == loss_normalizer_for("token_mean", p.response_mask) == p.response_mask.sum()
        assert p.old_logprobs is not None and (p.old_logprobs[p.response_mask] == -2.0).all()
    seq = split_mini_batches(b, g, 3, "seq_mean_token_mean")
    assert [p.num_rows for p in seq] == [4, 4, 2] and [p.loss_normalizer for p in seq] == [4, 4, 2]
    assert len(split_mini_batches(b, g, 9, "token_mean")) == 5  # never more parts than groups
    with pytest.raises(ValueError, match="whole groups"):
        split_mini_batches(b, 3, 2, "token_mean")
    with pytest.raises(ValueError, match="permutation"):
        split_mini_batches(b, g, 2, "token_mean", order=[0, 0, 1, 2, 3])
