"""Learner training state: save, restore into FRESH learner actors, continue bit for bit (CPU, gloo).

For each layout, group A trains on b1, b2, saves its state, trains on b3, b4; group B (new actors,
same spec) loads the state and trains on b3, b4. B must reproduce A exactly: the exported weights
(``torch.equal``), every training statistic except wall-clock times, and the state files written
after step 4 (fp32 master weights and AdamW moments, bitwise).

Why bitwise is expected on CPU: both groups run the same ops on the same inputs with the same
thread count (one CPU per actor), gloo's reductions over a fixed number of ranks combine in a fixed
order, and the restore re-derives the low-precision weights from the fp32 masters with DeepSpeed's
own post-step copies. Nothing in between draws random numbers, so any difference is a missed piece
of state.

Layouts: ``z3x2`` (2 ranks, ZeRO-3, float32) and ``z2x1`` (1 rank, ZeRO-2, bfloat16: fp32 masters
behind bf16 weights). Error paths run on z2x1's group B BEFORE it loads the real state, so B's exact
match also proves that a refused load leaves the learner untouched.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsys.cluster import actor_options, connect, loopback_env

pytestmark = pytest.mark.integration

LR = 1e-3
WARMUP = 4  # steps 3 and 4 run at 3/4 and 4/4 of LR: only a restored schedule position gives that
CONFIGS = {  # name: (world_size, zero_stage, dtype); z3x2 first: its state serves z2x1's mismatch check
    "z3x2": (2, 3, "float32"),
    "z2x1": (1, 2, "bfloat16"),
}
TIMING_KEYS = ("seconds", "old_logprob_seconds")  # TrainStats fields measured from the clock


def _batch(seed: int):
    from rlsys.workers.batching import build_train_batch, loss_normalizer_for

    rng = np.random.default_rng(seed)
    prompt_lens, response_lens = rng.integers(2, 8, size=4), rng.integers(1, 10, size=4)
    prompts = [rng.integers(3, 1000, size=n).tolist() for n in prompt_lens]
    responses = [rng.integers(3, 1000, size=n).tolist() for n in response_lens]
    rollout_lps = [(-rng.random(n) * 5).tolist() for n in response_lens]
    b = build_train_batch(
        prompts, responses, rollout_lps, rng.normal(size=4).tolist(), pad_token_id=0, loss_normalizer=1.0
    )
    return replace(b, loss_normalizer=loss_normalizer_for("token_mean", b.response_mask))


def _spec(model_path: str, zero: int, dtype: str):
    from rlsys.workers.learner import LearnerSpec

    return LearnerSpec(
        model_path=model_path,
        zero_stage=zero,
        dtype=dtype,
        lr=LR,
        warmup_steps=WARMUP,
        weight_decay=0.01,
        grad_clip=1.0,
        micro_batch_size=2,
        entropy_coef=0.01,
        seed=0,
    )


def _exported(group) -> dict[str, torch.Tensor]:
    import ray

    from rlsys.workers.learner import unpack_weight_bucket

    out: dict[str, torch.Tensor] = {}
    for ref in group.export_weight_buckets(1 << 22):
        for name, t in unpack_weight_bucket(ray.get(ref)):
            out[name] = t.clone()
    return out


def _stats(s) -> dict:
    d = asdict(s)
    for k in TIMING_KEYS:
        d.pop(k)
    return d


def _state_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": t for f in sorted(path.glob("*.safetensors")) for k, t in load_file(str(f)).items()}


def _rank_jsons(path: Path) -> dict[str, dict]:
    return {f.name: json.loads(f.read_text()) for f in sorted(path.glob("rank*.json"))}


def _error(fn) -> str:
    from rlsys.workers.learner import LearnerError

    with pytest.raises(LearnerError) as info:
        fn()
    return str(info.value)


@pytest.fixture(scope="module")
def model_path() -> str:
    from rlsys.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model("tiny", seed=0))


@pytest.fixture(scope="module")
def ray_cluster():
    loopback_env()  # before ray is imported: loopback only, no usage reporting
    import ray

    started = connect(None, num_cpus=4)
    yield
    if started:
        ray.shutdown()


def _error_paths(group, name: str, root: Path, states: dict[str, Path]) -> dict[str, str]:
    """Refused loads/saves on a fresh group (before its real load); returns the error messages."""
    import ray

    own = states[name]
    errors: dict[str, str] = {}
    if name == "z2x1":
        errors["layout"] = _error(lambda: group.load_state(str(states["z3x2"])))
        half = root / "half-written"
        shutil.copytree(own, half)
        (half / "learner_state.json").unlink()  # what a save killed before the manifest leaves
        errors["half"] = _error(lambda: group.load_state(str(half)))
        truncated = root / "truncated"
        shutil.copytree(own, truncated)
        with open(truncated / "rank0.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        errors["truncated"] = _error(lambda: group.load_state(str(truncated)))
        errors["missing"] = _error(lambda: group.load_state(str(root / "no-such-state")))
        errors["overwrite"] = _error(lambda: group.save_state(str(own)))
    if name == "z3x2":
        # Only rank 1's file is damaged (same size, so the manifest check passes): rank 1 fails on its own
        # file, rank 0 must not go on into the collective restore but stop and say which rank failed.
        bad = root / "bad-rank1"
        shutil.copytree(own, bad)
        text = (bad / "rank1.json").read_text()
        (bad / "rank1.json").write_text("#" + text[1:])
        refs = [a.load_state.remote(str(bad)) for a in group.actors]
        for rank, ref in enumerate(refs):
            with pytest.raises(ray.exceptions.RayTaskError) as info:
                ray.get(ref, timeout=300)
            errors[f"bad_rank1_on_rank{rank}"] = str(info.value)
        errors["bad_rank1_group"] = _error(lambda: group.load_state(str(bad)))
    return errors


@pytest.fixture(scope="module")
def runs(ray_cluster, model_path, tmp_path_factory):
    from rlsys.workers.learner import LearnerGroup

    batches = [_batch(1000 + i) for i in range(4)]
    states: dict[str, Path] = {}
    out: dict[str, dict] = {}
    for name, (world, zero, dtype) in CONFIGS.items():
        root = tmp_path_factory.mktemp(f"state-{name}")
        spec = _spec(model_path, zero, dtype)
        r: dict = {"root": root}
        t0 = time.perf_counter()
        a = LearnerGroup(spec, world, actor_options(1), init_dir=str(root / "init-a"))
        try:
            r["start_seconds"] = time.perf_counter() - t0
            for b in batches[:2]:
                a.train_step(a.shard(b))
            r["w_saved"] = _exported(a)
            t1 = time.perf_counter()
            a.save_state(str(root / "state"))
            r["save_seconds"] = time.perf_counter() - t1
            states[name] = root / "state"
            r["stats_a"] = [a.train_step(a.shard(b)) for b in batches[2:]]
            r["w_a"] = _exported(a)
            a.save_state(str(root / "after-a"))
        finally:
            a.shutdown()

        b_group = LearnerGroup(spec, world, actor_options(1), init_dir=str(root / "init-b"))
        try:
            r["errors"] = _error_paths(b_group, name, root, states)
            t1 = time.perf_counter()
            b_group.load_state(str(root / "state"))
            r["load_seconds"] = time.perf_counter() - t1
            b_group.save_state(str(root / "roundtrip"))  # load -> save must reproduce the files exactly
            r["stats_b"] = [b_group.train_step(b_group.shard(b)) for b in batches[2:]]
            r["w_b"] = _exported(b_group)
            b_group.save_state(str(root / "after-b"))
        finally:
            b_group.shutdown()
        out[name] = r
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_training_is_bitwise_identical(runs, name: str) -> None:
    r = runs[name]
    assert set(r["w_a"]) == set(r["w_b"])
    for n, t in r["w_a"].items():
        assert torch.equal(r["w_b"][n], t), f"{name}: {n} differs after resuming"
    for step, (sa, sb) in enumerate(zip(r["stats_a"], r["stats_b"]), start=3):
        assert not sa.skipped
        assert _stats(sa) == _stats(sb), f"{name}: step {step} statistics differ after resuming"
    # The check has teeth: steps 3-4 moved the weights (a no-op restore + no-op training would pass
    # equality trivially), at the schedule position of steps 3-4, not of a fresh run's steps 1-2.
    moved = [n for n, t in r["w_a"].items() if not torch.equal(t, r["w_saved"][n])]
    assert len(moved) >= len(r["w_a"]) // 2, f"{name}: only {len(moved)} tensors moved in steps 3-4"
    assert [s.lr for s in r["stats_b"]] == pytest.approx([LR * 3 / WARMUP, LR])
    assert [s.applied_steps for s in r["stats_b"]] == [3, 4]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_optimizer_state_and_masters_match_bitwise(runs, name: str) -> None:
    root = runs[name]["root"]
    # After step 4: fp32 masters, exp_avg, exp_avg_sq, step, RNG of every rank.
    after_a, after_b = _state_tensors(root / "after-a"), _state_tensors(root / "after-b")
    assert set(after_a) == set(after_b)
    assert any(k.endswith(".exp_avg_sq") for k in after_a)
    for k, t in after_a.items():
        assert torch.equal(after_b[k], t), f"{name}: {k} differs after step 4"
    assert _rank_jsons(root / "after-a") == _rank_jsons(root / "after-b")
    # Straight after loading, a save writes back exactly what was loaded.
    saved, again = _state_tensors(root / "state"), _state_tensors(root / "roundtrip")
    assert set(saved) == set(again) and all(torch.equal(again[k], t) for k, t in saved.items())
    assert _rank_jsons(root / "state") == _rank_jsons(root / "roundtrip")
    # The fp32 masters moved in steps 3-4 (bf16 weights alone could hide small updates).
    masters = [k for k in saved if ":master." in k]
    assert masters and all(not torch.equal(after_a[k], saved[k]) for k in masters)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_files_are_safetensors_and_json_only(runs, name: str) -> None:
    from safetensors import safe_open

    from rlsys.workers.learner import read_learner_state_manifest

    world, zero, dtype = CONFIGS[name]
    state = runs[name]["root"] / "state"
    files = sorted(p.name for p in state.iterdir())
    expected = ["learner_state.json"] + [f"rank{r}.{ext}" for r in range(world) for ext in ("json", "safetensors")]
    assert files == sorted(expected)  # no stray temp files, nothing else
    for p in state.iterdir():
        assert p.is_file() and p.suffix in (".json", ".safetensors"), p
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            with safe_open(str(p), framework="pt") as f:
                assert {"rng.torch", "master.0"} <= set(f.keys())  # a safetensors handle, not a dict
    manifest = read_learner_state_manifest(str(state))
    assert (manifest["world_size"], manifest["zero_stage"], manifest["dtype"]) == (world, zero, dtype)
    assert manifest["applied_steps"] == 2
    assert sorted(manifest["files"]) == sorted(f for f in expected if f != "learner_state.json")
    assert all(manifest["files"][f] == (state / f).stat().st_size for f in manifest["files"])


def test_load_with_a_different_layout_is_refused(runs) -> None:
    err = runs["z2x1"]["errors"]["layout"]
    assert "learner rank 0 failed in phase 'load_state'" in err
    assert "world_size 2 (saved) vs 1 (this learner)" in err
    assert "zero_stage 3 (saved) vs 2 (this learner)" in err
    assert "dtype 'float32' (saved) vs 'bfloat16' (this learner)" in err
    assert "is not supported" in err


def test_incomplete_or_damaged_state_is_refused(runs) -> None:
    errors = runs["z2x1"]["errors"]
    assert "has no learner_state.json" in errors["half"] and "not a complete learner state" in errors["half"]
    assert "rank0.safetensors has" in errors["truncated"] and "truncated" in errors["truncated"]
    assert "does not exist" in errors["missing"]
    assert "already holds a learner state" in errors["overwrite"]


def test_one_rank_failing_stops_every_rank(runs) -> None:
    errors = runs["z3x2"]["errors"]
    assert "JSONDecodeError" in errors["bad_rank1_on_rank1"]
    assert "learner rank 0, load_state: learner rank(s) [1] failed" in errors["bad_rank1_on_rank0"]
    # The group reports the rank that failed and why, not the bystander.
    group_err = errors["bad_rank1_group"]
    assert "learner rank 1 failed in phase 'load_state'" in group_err and "JSONDecodeError" in group_err


def test_manifest_reader_rejects_incomplete_directories(tmp_path) -> None:
    from rlsys.workers.learner import LearnerStateError, read_learner_state_manifest

    with pytest.raises(LearnerStateError, match="not a complete learner state"):
        read_learner_state_manifest(str(tmp_path))
    (tmp_path / "learner_state.json").write_text(
        json.dumps({"format": "rlsys-learner-state", "version": 1, "files": {"rank0.safetensors": 10}})
    )
    with pytest.raises(LearnerStateError, match="rank0.safetensors is listed in the manifest but missing"):
        read_learner_state_manifest(str(tmp_path))


def test_report_timings(runs) -> None:
    for name, r in runs.items():
        size = sum(p.stat().st_size for p in (r["root"] / "state").iterdir())
        print(
            f"{name}: group start {r['start_seconds']:.1f}s, save_state {r['save_seconds']:.3f}s, "
            f"load_state {r['load_seconds']:.3f}s, state {size / 2**20:.1f} MiB"
        )
