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
    assert list(m) == ALWAYS  # the driver's order; no train/kl or train/tis_* when they were not computed
    assert m["train/loss"] == 0.5 and m["train/lr"] == 1e-3 and m["train/grad_norm"] == 2.0
    assert m["train/tokens"] == 40 and isinstance(m["train/tokens"], int)
    assert m["train/skipped"] == 1 and isinstance(m["train/skipped"], int)


def test_metrics_with_kl_and_tis() -> None:
    s = stats(kl=0.004, tis_weight_mean=0.98, tis_clip_fraction=0.05)
    m = s.metrics()
    assert list(m) == [*ALWAYS, "train/tis_weight_mean", "train/tis_clip_fraction", "train/kl"]
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
