"""The focal weight reaches the update on real DeepSpeed learners.

With AdamW's eps far above |g| the first step is lr * g / eps (to ~|g|/eps relative), i.e. linear
in the gradient, so the update itself can be compared: for one mixed group with success rate 1/4,
gamma = 1 must give exactly (1 - 1/4)^1 = 0.75 of the gamma = 0 update, and an all-correct group
must give no update at all, whatever gamma.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rlsys import algo
from rlsys.workers.batching import build_train_batch, loss_normalizer_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    from rlsys import cluster

    started = cluster.connect(None, num_cpus=2)
    yield
    if started:
        import ray

        ray.shutdown()


def _batch(rewards: torch.Tensor, gamma: float):
    rng = np.random.default_rng(0)
    b, g = rewards.shape
    adv, _ = algo.group_advantages(rewards, gamma=gamma)
    prompts = [list(rng.integers(3, 1000, 6)) for _ in range(b) for _ in range(g)]
    responses = [list(rng.integers(3, 1000, 5)) for _ in range(b * g)]
    batch = build_train_batch(
        prompts,
        responses,
        [np.zeros(5, np.float32)] * (b * g),
        adv.reshape(-1).tolist(),
        pad_token_id=0,
        loss_normalizer=1.0,
    )
    return dataclasses.replace(batch, loss_normalizer=loss_normalizer_for("token_mean", batch.response_mask))


def _update(batch) -> dict[str, np.ndarray]:
    """Weight delta of one fp32 step from the tiny model's initial weights."""
    import ray

    from rlsys.cluster import actor_options
    from rlsys.models import ensure_tiny_model
    from rlsys.workers.learner import LearnerGroup, LearnerSpec
    from rlsys.workers.weight_sync import unpack_bucket

    spec = LearnerSpec(
        model_path=str(ensure_tiny_model("tiny", 0)),
        zero_stage=2,
        dtype="float32",
        lr=10.0,
        eps=1e4,
        weight_decay=0.0,
        grad_clip=0.0,
        micro_batch_size=4,
    )
    group = LearnerGroup(spec, 1, actor_options=actor_options(1))
    try:

        def weights():
            return {
                n: t.float().numpy().copy()
                for ref in group.export_weight_buckets(1 << 30)
                for n, t in unpack_bucket(ray.get(ref))
            }

        before = weights()
        group.train_step(group.shard(batch))
        after = weights()
    finally:
        group.shutdown()
    return {k: after[k] - before[k] for k in before}


def test_focal_weight_scales_the_update_and_all_correct_groups_give_nothing(ray_local):
    mixed = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    d0 = _update(_batch(mixed, gamma=0.0))
    d1 = _update(_batch(mixed, gamma=1.0))
    num = sum(float((a * b).sum()) for a, b in zip(d1.values(), d0.values()))
    den = sum(float((b * b).sum()) for b in d0.values())
    assert den > 0, "the gamma = 0 step did not move the weights"
    ratio = num / den
    assert ratio == pytest.approx(0.75, abs=2e-3), f"focal update / GRPO update = {ratio}"

    solved = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    d2 = _update(_batch(solved, gamma=1.0))
    assert max(float(np.abs(v).max()) for v in d2.values()) == 0.0
