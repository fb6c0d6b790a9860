"""The DeepSpeed learner inside real Ray actors on a loopback-only local cluster (CPU, gloo).

One global batch, three learner groups, each taking one optimizer step on it:

* ``z2x1``: 1 rank, ZeRO-2, micro-batch 2, gradient checkpointing on;
* ``z2x2``: 2 ranks, ZeRO-2, micro-batch 1;
* ``z3x2``: 2 ranks, ZeRO-3, micro-batch 1.

Each is compared with a single-process PyTorch reference: plain ``transformers`` forward, the
full-batch ``policy_loss``, ``backward``, one ``torch.optim.AdamW`` step. AdamW's first step is
``lr * g / (|g| + eps)`` per element, which hides the scale of ``g`` when ``eps`` is tiny (a
gradient off by a factor 2 gives the same update); with ``eps = 1`` the update is nearly linear
in ``g``, so a wrong normalizer or a missing / extra rank average shows up in the weights
(``test_the_weight_check_detects_a_factor_of_two`` proves the check can fail), and the reported
gradient norm is compared as well.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from rlsys.cluster import actor_options, connect, loopback_env

pytestmark = pytest.mark.integration

LR = 1.0  # with eps = 1, lr 1 moves weights by ~|g|: large against fp32 rounding of the weights
EPS = 1.0
WARMUP = 2  # the first step runs at lr * 1/2
BETAS = (0.9, 0.999)
ENTROPY_COEF = 0.01
KL_COEF = 0.05
CONFIGS = {  # name: (world_size, zero_stage, micro_batch_size, gradient_checkpointing, logprob_chunk_tokens)
    "z2x1": (1, 2, 2, True, 0),  # 0: auto, one chunk here
    "z2x2": (2, 2, 1, False, 5),  # small chunks: the chunked, recomputed LM head must be exact too
    "z3x2": (2, 3, 1, False, 4),
}
# Learner vs reference: relative error of the weight update. Measured ~1e-7 (float32 summation
# order); a factor-2 gradient error gives ~0.3 or more.
UPDATE_RTOL = 1e-4
GRAD_NORM_RTOL = 1e-5


def _global_batch():
    from rlsys.workers.batching import build_train_batch, loss_normalizer_for

    rng = np.random.default_rng(1234)
    prompt_lens, response_lens = [3, 8, 2, 5, 4], [6, 0, 12, 3, 9]  # row 1: empty response (inert)
    prompts = [rng.integers(3, 1000, size=n).tolist() for n in prompt_lens]
    responses = [rng.integers(3, 1000, size=n).tolist() for n in response_lens]
    rollout_lps = [(-rng.random(n) * 5).tolist() for n in response_lens]
    advantages = [1.0, 0.7, -0.8, 1.5, -0.4]
    b = build_train_batch(prompts, responses, rollout_lps, advantages, pad_token_id=0, loss_normalizer=1.0)
    # 5 rows: every config pads with dummy rows (1 rank x mbs 2 -> 6 rows; 2 ranks -> 3 + 3).
    return replace(b, loss_normalizer=loss_normalizer_for("token_mean", b.response_mask))


def _spec(model_path: str, zero: int, mbs: int, gc: bool, chunk: int):
    from rlsys.workers.learner import LearnerSpec

    return LearnerSpec(
        model_path=model_path,
        zero_stage=zero,
        dtype="float32",
        lr=LR,
        eps=EPS,
        betas=BETAS,
        weight_decay=0.0,
        grad_clip=0.0,
        warmup_steps=WARMUP,
        micro_batch_size=mbs,
        loss_type="grpo",
        agg="token_mean",
        kl_coef=KL_COEF,
        entropy_coef=ENTROPY_COEF,
        seed=0,
        gradient_checkpointing=gc,
        logprob_chunk_tokens=chunk,
    )


def _exported(group, bucket_bytes: int = 1 << 20) -> tuple[dict[str, torch.Tensor], int]:
    """Rank 0's weights through the bucket path: ({name: tensor}, number of buckets)."""
    import ray

    from rlsys.workers.learner import unpack_weight_bucket

    refs = group.export_weight_buckets(bucket_bytes)
    out: dict[str, torch.Tensor] = {}
    for ref in refs:
        for name, t in unpack_weight_bucket(ray.get(ref)):
            assert name not in out, f"{name} exported twice"
            out[name] = t.clone()
    return out, len(refs)


@pytest.fixture(scope="module")
def model_path() -> str:
    from rlsys.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("tiny", seed=0))


@pytest.fixture(scope="module")
def reference(model_path):
    """Full-batch single-process step: logprobs, loss, gradient norm, updated weights."""
    from transformers import AutoModelForCausalLM

    from rlsys.algo.losses import policy_loss

    batch = _global_batch()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    ids = torch.from_numpy(batch.input_ids)
    mask = torch.from_numpy(batch.response_mask)
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask)).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = torch.nn.functional.pad(logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0)) * mask
    entropy = torch.nn.functional.pad(-(logp_all.exp() * logp_all).sum(-1), (1, 0)) * mask
    loss, metrics = policy_loss(
        lp,
        lp.detach(),
        torch.from_numpy(batch.advantages),
        mask,
        loss_type="grpo",
        ref_logprobs=lp.detach(),
        kl_coef=KL_COEF,
        entropy=entropy,
        entropy_coef=ENTROPY_COEF,
        agg="token_mean",
        normalizer=batch.loss_normalizer,
    )
    loss.backward()
    params = dict(model.named_parameters())  # tied lm_head.weight appears once (as the embedding)
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    grad_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def adam_step(scale: float) -> dict[str, torch.Tensor]:
        ps = {n: torch.nn.Parameter(initial[n].clone()) for n in params}
        for n, p in ps.items():
            p.grad = grads[n] * scale
        torch.optim.AdamW(list(ps.values()), lr=LR / WARMUP, betas=BETAS, eps=EPS, weight_decay=0.0).step()
        return {n: p.detach() for n, p in ps.items()}

    return {
        "batch": batch,
        "logprobs": lp.detach().numpy(),
        "loss": float(loss.detach()),
        "metrics": metrics,
        "grad_norm": grad_norm,
        "initial": initial,
        "updated": adam_step(1.0),
        "updated_2x": adam_step(2.0),  # what a gradient off by a factor 2 would produce
        # What a checkpoint holds: the tied head (lm_head.weight, the embedding matrix) is stored once.
        "names": set(initial) - {"lm_head.weight"},
        "shapes": {n: tuple(t.shape) for n, t in initial.items() if n != "lm_head.weight"},
    }


@pytest.fixture(scope="module")
def ray_cluster():
    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    started = connect(None, num_cpus=4)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, model_path, reference, tmp_path_factory):
    """Run every config once (groups are shut down as soon as they are done)."""
    import ray

    from rlsys.workers.batching import take_rows
    from rlsys.workers.learner import LearnerGroup

    batch = reference["batch"]
    out: dict[str, dict] = {}
    for name, (world, zero, mbs, gc, chunk) in CONFIGS.items():
        t0 = time.perf_counter()
        group = LearnerGroup(
            _spec(model_path, zero, mbs, gc, chunk),
            world,
            actor_options(1),
            init_dir=str(tmp_path_factory.mktemp(f"init-{name}")),
        )
        r: dict = {"start_seconds": time.perf_counter() - t0}
        try:
            if name == "z3x2":
                r["before"], r["buckets"] = _exported(group)
                r["logprobs"] = group.compute_logprobs(batch)
            parts = group.shard(batch)
            if name == "z2x2":
                # Ranks handed different row counts (bypassing LearnerGroup's own check) must all
                # fail fast with the same message instead of hanging in a collective, and leave the
                # group usable and untouched (the exact step below still matches the reference).
                uneven = [take_rows(batch, [0, 1]), take_rows(batch, [2])]
                refs = [a.train_step.remote(p) for a, p in zip(group.actors, uneven)]
                r["uneven_errors"] = []
                for ref in refs:
                    with pytest.raises(ray.exceptions.RayTaskError) as info:
                        ray.get(ref, timeout=120)
                    r["uneven_errors"].append(str(info.value))
                with pytest.raises(ValueError, match="LearnerGroup.shard"):
                    group.train_step(uneven)
            if name == "z2x1":
                # A non-finite loss first: the step must be skipped without a trace, so the real
                # step below still matches the reference exactly (grads zeroed, Adam state and LR
                # schedule untouched).
                bad = replace(
                    batch,
                    advantages=np.where(np.arange(batch.num_rows) == 0, np.nan, batch.advantages).astype(np.float32),
                )
                r["before_bad"], _ = _exported(group)
                r["bad_stats"] = group.train_step(group.shard(bad))
                r["after_bad"], _ = _exported(group)
            r["stats"] = group.train_step(parts)
            r["after"], _ = _exported(group)
            if name in ("z2x1", "z2x2"):
                # PPO mini-batches: pi_old once for the whole batch, then two optimizer steps on its two
                # halves, each with its own normalizer; 1 rank x mbs 2 and 2 ranks x mbs 1 must agree.
                from rlsys.workers.batching import split_mini_batches

                with_old = replace(batch, old_logprobs=group.compute_logprobs(batch))
                minis = split_mini_batches(with_old, 1, 2, "token_mean")
                r["mini_stats"] = [group.train_step(group.shard(m)) for m in minis]
                r["after_minis"], _ = _exported(group)
            # Timing only: two more steps on the same batch (their values are not checked).
            times = []
            for _ in range(2):
                t1 = time.perf_counter()
                group.train_step(parts)
                times.append(time.perf_counter() - t1)
            r["step_seconds"] = times
            if name == "z3x2":
                r["ckpt"] = group.save_hf(str(tmp_path_factory.mktemp("ckpt") / "hf"))
                r["after3"], _ = _exported(group)
                r["after3_bf16"] = ray.get(group.export_weight_buckets(64 << 20, dtype="bfloat16"))
                r["logprobs_after3"] = group.compute_logprobs(batch)
        finally:
            group.shutdown()
        out[name] = r
    return out


def _update_error(after: dict, expected: dict, initial: dict) -> float:
    """||after - expected|| / ||expected - initial|| over all distinct parameters."""
    num = den = 0.0
    for n in expected:
        num += float((after[n].double() - expected[n].double()).pow(2).sum())
        den += float((expected[n].double() - initial[n].double()).pow(2).sum())
    return math.sqrt(num / den)


def test_single_learner_step_is_sane(runs, reference) -> None:
    r, ref = runs["z2x1"], reference
    s = r["stats"]
    batch = ref["batch"]
    assert not s.skipped and math.isfinite(s.loss) and math.isfinite(s.grad_norm) and s.grad_norm > 0
    assert s.num_tokens == int(batch.response_mask.sum())
    assert s.lr == pytest.approx(LR / WARMUP)
    assert s.loss == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert s.pg_loss == pytest.approx(ref["metrics"]["pg_loss"], rel=1e-5, abs=1e-6)
    assert s.ratio_max == pytest.approx(1.0, abs=1e-5) and s.clip_fraction == 0.0
    assert abs(s.approx_kl) < 1e-6
    assert s.entropy == pytest.approx(ref["metrics"]["entropy"], rel=1e-5)
    assert 0 < s.entropy <= math.log(1024) + 1e-4
    assert s.kl == pytest.approx(0.0, abs=1e-6)  # pi == pi_ref at the first step
    mask = batch.response_mask
    diff = np.abs(ref["logprobs"] - batch.rollout_logprobs)[mask].mean()
    assert s.rollout_logprob_diff == pytest.approx(float(diff), rel=1e-4)
    changed = [n for n in ref["names"] if not torch.equal(r["after"][n], ref["initial"][n])]
    assert len(changed) == len(ref["names"])  # every parameter gets a gradient and moves


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_exact_across_ranks_and_micro_batches(runs, reference, name: str) -> None:
    r = runs[name]
    err = _update_error(r["after"], reference["updated"], reference["initial"])
    print(f"{name}: update error {err:.2e}, grad norm {r['stats'].grad_norm:.8f} vs {reference['grad_norm']:.8f}")
    assert err < UPDATE_RTOL, f"{name}: weight update differs from the full-batch reference by {err:.3g}"
    assert r["stats"].grad_norm == pytest.approx(reference["grad_norm"], rel=GRAD_NORM_RTOL)
    assert r["stats"].loss == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
    assert r["stats"].num_tokens == int(reference["batch"].response_mask.sum())


def test_the_weight_check_detects_a_factor_of_two(runs, reference) -> None:
    # If the learners had a normalizer or rank average off by 2, they would have produced
    # reference["updated_2x"]; the tolerance used above must reject that by a wide margin.
    err = _update_error(reference["updated_2x"], reference["updated"], reference["initial"])
    assert err > 100 * UPDATE_RTOL
    assert _update_error(runs["z2x2"]["after"], reference["updated_2x"], reference["initial"]) > 100 * UPDATE_RTOL


def test_configs_agree_with_each_other(runs, reference) -> None:
    base = runs["z2x1"]["after"]
    for name in ("z2x2", "z3x2"):
        err = _update_error(runs[name]["after"], base, reference["initial"])
        assert err < UPDATE_RTOL, f"{name} vs z2x1: {err:.3g}"


def test_mini_batches_agree_across_ranks_and_the_second_is_off_policy(runs, reference) -> None:
    a, b = runs["z2x1"], runs["z2x2"]
    # Both groups took the same exact step before (test_configs_agree_with_each_other), then the same two
    # mini-batch updates: the exact micro-batch / rank invariance holds per mini-batch.
    err = _update_error(b["after_minis"], a["after_minis"], a["after"])
    assert err < UPDATE_RTOL, f"mini-batch updates differ across ranks by {err:.3g}"
    for s1, s2 in zip(a["mini_stats"], b["mini_stats"]):
        assert s1.loss == pytest.approx(s2.loss, rel=1e-5, abs=1e-7)
        assert s1.ratio_max == pytest.approx(s2.ratio_max, rel=1e-5)
    first, second = a["mini_stats"]
    batch = reference["batch"]
    assert first.num_tokens + second.num_tokens == int(batch.response_mask.sum())
    # The first update starts at pi_old (ratio 1 up to float32 rounding); the second runs on weights the
    # first moved, so its ratio leaves 1 and the clip can act.
    assert abs(first.ratio_max - 1) < 1e-4 and abs(first.ratio_min - 1) < 1e-4
    assert second.ratio_max - second.ratio_min > 1e-3


def test_zero3_export_covers_every_hf_parameter(runs, reference, model_path) -> None:
    from safetensors import safe_open

    r = runs["z3x2"]
    with safe_open(f"{model_path}/model.safetensors", framework="pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    assert r["buckets"] > 1  # 1 MiB buckets for a 16 MiB model: several
    for weights in (r["before"], r["after"]):
        assert set(weights) == reference["names"] == set(ckpt)  # the tied head once, as the embedding
        assert {n: tuple(t.shape) for n, t in weights.items()} == reference["shapes"]
        assert all(t.dtype == torch.float32 for t in weights.values())
    # Before training: exactly the checkpoint (bf16 upcast), the tied head equal to the embedding.
    for n, t in ckpt.items():
        assert torch.equal(r["before"][n], t.float()), n
    # dtype="bfloat16": one 64 MiB bucket, tagged bfloat16, carried as int16 views, exact casts.
    (bucket,) = r["after3_bf16"]
    assert set(bucket.dtypes) == {"bfloat16"} and all(a.dtype == np.int16 for a in bucket.arrays)
    from rlsys.workers.learner import unpack_weight_bucket

    for n, t in unpack_weight_bucket(bucket):
        assert t.dtype == torch.bfloat16 and torch.equal(t, r["after3"][n].to(torch.bfloat16)), n


def test_group_compute_logprobs_matches_reference(runs, reference) -> None:
    lp = runs["z3x2"]["logprobs"]
    batch = reference["batch"]
    assert lp.shape == batch.input_ids.shape
    assert (lp[~batch.response_mask] == 0).all()
    np.testing.assert_allclose(lp, reference["logprobs"], atol=2e-5)


def test_skipped_step_on_nonfinite_loss(runs) -> None:
    r = runs["z2x1"]
    assert r["bad_stats"].skipped and not math.isfinite(r["bad_stats"].loss)
    for n, t in r["before_bad"].items():
        assert torch.equal(r["after_bad"][n], t), f"{n} changed during a skipped step"
    assert r["bad_stats"].applied_steps == 0
    # The following real step ran at the first step's LR and matched the reference
    # (test_gradient_exact_across_ranks_and_micro_batches[z2x1]).
    assert r["stats"].lr == pytest.approx(LR / WARMUP) and r["stats"].applied_steps == 1


def test_save_hf_loads_in_transformers_and_matches(runs, reference) -> None:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = runs["z3x2"]
    path = Path(r["ckpt"])
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert not (path / "rlsys_model.json").exists()
    assert not list(path.parent.glob(".*tmp*"))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(r["after3"]) | {"lm_head.weight"}  # the export holds the tied matrix once
    for n, t in r["after3"].items():
        assert torch.equal(state[n], t), n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.decode(tok.encode("hello world")) == "hello world"
    batch = reference["batch"]
    ids = torch.from_numpy(batch.input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp = torch.nn.functional.pad(lp, (1, 0)).numpy() * batch.response_mask
    np.testing.assert_allclose(lp, r["logprobs_after3"], atol=2e-5)


def test_report_timings(runs) -> None:
    for name, r in runs.items():
        print(
            f"{name}: start {r['start_seconds']:.1f}s, first step {r['stats'].seconds:.3f}s, "
            f"later steps {', '.join(f'{t:.3f}' for t in r['step_seconds'])}s"
        )


def test_uneven_shards_fail_fast_on_every_rank(runs) -> None:
    errors = runs["z2x2"]["uneven_errors"]
    assert len(errors) == 2
    for rank, err in enumerate(errors):
        assert f"learner rank {rank}, train_step" in err and "shard_train_batch" in err


def test_init_failure_names_the_rank(ray_cluster, tmp_path) -> None:
    from rlsys.workers.learner import LearnerError, LearnerGroup

    spec = _spec(str(tmp_path / "no-such-model"), 2, 1, False, 0)
    expected = r"(?s)learner rank 0 failed in phase 'init'.*model path .* is not a directory"
    with pytest.raises(LearnerError, match=expected):
        LearnerGroup(spec, 1, actor_options(1), init_dir=str(tmp_path), ready_timeout_s=300)
