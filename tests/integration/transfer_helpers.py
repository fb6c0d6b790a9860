"""Helpers shared by the weight-transfer integration tests: a perturbed copy of the tiny model (so a
sync that moved nothing shows) and the probe that compares an engine's logprobs with the learner's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PROBE = list(range(10, 60))


def base_and_perturbed(root: Path) -> tuple[str, str]:
    """(the tiny model, a copy with seeded noise on every weight) under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlsys.models import ensure_tiny_model

    base = str(shutil.copytree(ensure_tiny_model(), root / "base"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    perturbed = root / "perturbed"
    shutil.copytree(base, perturbed)
    model.save_pretrained(perturbed)
    return base, str(perturbed)


def learner_probe(learners) -> np.ndarray:
    """The learner's log p(PROBE[t] | PROBE[:t]) for t >= 1: [len(PROBE) - 1]."""
    from rlsys.workers.batching import build_train_batch

    pb = build_train_batch(
        [PROBE[:1]], [PROBE[1:]], [np.zeros(len(PROBE) - 1, np.float32)], [0.0], pad_token_id=0, loss_normalizer=1.0
    )
    return np.asarray(learners.compute_logprobs(pb))[0, 1 : len(PROBE)]


def engine_gaps(learners, pool) -> list[float]:
    """Per engine: mean |engine logprob - learner logprob| over the probe."""
    ref = learner_probe(learners)
    return [float(np.abs(lp - ref).mean()) for lp in pool.sequence_logprobs(PROBE)]


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[None]:
    """A loopback-only local Ray cluster for one test module (left alone if one is already up)."""
    from rlsys.cluster import connect, loopback_env

    loopback_env()
    import ray

    started = connect(None, num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextmanager
def learner_of(model_path: str, init_dir: str) -> Iterator[object]:
    """One float32 ZeRO-2 learner rank (a Ray actor) serving ``model_path``."""
    from rlsys.cluster import actor_options
    from rlsys.workers.learner import LearnerGroup, LearnerSpec

    learners = LearnerGroup(
        LearnerSpec(model_path=model_path, zero_stage=2, dtype="float32"), 1, actor_options(1), init_dir=init_dir
    )
    try:
        yield learners
    finally:
        learners.shutdown()
