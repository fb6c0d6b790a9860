"""rlsys.records.TrainStats: typed optional fields, the train/* metrics the driver logs (no untyped extra dict)."""

from __future__ import annotations

import dataclasses
from typing import Any

from rlsys.records import TrainStats

BASE: dict[str, Any] = dict(
    loss=0.5,
    pg_loss=0.25,
    clip_fraction=0.1,
    approx_kl=0.01,
    entropy=1.5,
    grad_norm=2.0,
    lr=1e-3,
    num_tokens=40,
    rollout_logprob_diff=0.02,
    ratio_max=1.2,
)
ALWAYS = [
    "train/loss",
    "train/pg_loss",
    "train/clip_fraction",
    "train/grad_norm",
    "train/entropy",
    "train/approx_kl",
    "train/lr",
    "train/ratio_max",
    "train/rollout_logprob_diff",
    "train/tokens",
    "train/skipped",
    "train/updates",
]


def stats(**fields: Any) -> TrainStats:
    return TrainStats(**{**BASE, **fields})


def test_metrics_without_optional_terms() -> None:
    s = stats(
        skipped=True,
        ratio_mean=1.0,
        ratio_min=0.9,
        num_sequences=4,
        num_micro_batches=2,
        applied_steps=0,
        old_logprob_seconds=0.3,
    )
    m = s.metrics()
    assert list(m) == [*ALWAYS, "train/ratio_min"]  # the driver's order; no train/kl or train/tis_* when not computed
    assert m["train/loss"] == 0.5 and m["train/lr"] == 1e-3 and m["train/grad_norm"] == 2.0
    assert m["train/tokens"] == 40 and isinstance(m["train/tokens"], int)
    assert m["train/skipped"] == 1 and isinstance(m["train/skipped"], int)


def test_metrics_with_kl_and_tis() -> None:
    s = stats(kl=0.004, tis_weight_mean=0.98, tis_clip_fraction=0.05)
    m = s.metrics()
    assert list(m) == [*ALWAYS, "train/tis_weight_mean", "train/tis_clip_fraction", "train/kl"]
    assert m["train/updates"] == 1
    assert (m["train/kl"], m["train/tis_weight_mean"], m["train/tis_clip_fraction"]) == (0.004, 0.98, 0.05)
    assert m["train/skipped"] == 0
    # A KL of exactly 0 (pi == pi_ref at the first step) is logged, not dropped.
    assert stats(kl=0.0).metrics()["train/kl"] == 0.0


def test_typed_fields_and_no_extra_dict() -> None:
    names = {f.name for f in dataclasses.fields(TrainStats)}
    assert "extra" not in names
    assert {
        "ratio_mean",
        "ratio_min",
        "kl",
        "tis_weight_mean",
        "tis_clip_fraction",
        "num_sequences",
        "num_micro_batches",
        "applied_steps",
        "old_logprob_seconds",
    } <= names
    assert not hasattr(TrainStats, "extra")  # the untyped dict view is gone: read the typed fields


def test_combine_one_update_is_that_update() -> None:
    s = stats(ratio_min=0.9, kl=0.1)
    assert TrainStats.combine([s]) is s


def test_combine_weights_by_tokens_and_takes_extremes() -> None:
    """Two PPO updates of 40 and 10 tokens: per-token metrics token-weighted, by hand."""
    a = stats(
        clip_fraction=0.0,
        pg_loss=1.0,
        num_tokens=40,
        ratio_max=1.0,
        ratio_min=1.0,
        lr=1e-3,
        applied_steps=1,
        tis_weight_mean=1.0,
        grad_norm=2.0,
        loss=0.5,
        num_micro_batches=2,
        seconds=1.0,
    )
    b = stats(
        clip_fraction=0.5,
        pg_loss=-1.0,
        num_tokens=10,
        ratio_max=1.5,
        ratio_min=0.7,
        lr=2e-3,
        applied_steps=2,
        tis_weight_mean=0.5,
        grad_norm=4.0,
        loss=0.1,
        skipped=True,
        num_micro_batches=2,
        seconds=2.0,
    )
    c = TrainStats.combine([a, b])
    assert c.clip_fraction == (0.0 * 40 + 0.5 * 10) / 50 == 0.1
    assert c.pg_loss == (1.0 * 40 - 1.0 * 10) / 50 == 0.6
    assert c.tis_weight_mean == (40 + 5) / 50
    assert (c.ratio_max, c.ratio_min) == (1.5, 0.7)
    assert c.loss == 0.3 and c.grad_norm == 3.0  # plain means over updates
    assert (c.lr, c.applied_steps, c.num_updates, c.num_tokens, c.num_micro_batches, c.seconds) == (
        2e-3,
        2,
        2,
        50,
        4,
        3.0,
    )
    assert c.skipped  # one skipped update marks the step
    assert c.kl is None  # neither update computed it
    m = c.metrics()
    assert m["train/updates"] == 2 and m["train/ratio_min"] == 0.7
    assert b.update_row()["ratio_min"] == 0.7 and b.update_row()["skipped"] == 1
