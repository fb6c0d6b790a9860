"""Pure helpers of the SFT warm start (rlsys.sft): cache key, data stream, NLL batch, config checks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlsys import sft
from rlsys.config import ConfigError, RLConfig

ROOT = Path(__file__).resolve().parents[2]


def fake_model(path: Path, record: dict | None = None, weights: bytes = b"w" * 10) -> str:
    """A directory that passes the config checks and identifies itself like a model would."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (path / "model.safetensors").write_bytes(weights)
    if record is not None:
        (path / "rlsys_model.json").write_text(json.dumps(record))
    return str(path)


@pytest.fixture
def base(tmp_path) -> str:
    return fake_model(tmp_path / "base", {"format_version": 1, "size": "tiny", "seed": 0})


OTHER_DTYPE = "<the dtype the default does not resolve to here>"


def key_of(cfg: RLConfig, base: str) -> str:
    return sft.sft_cache_key(sft.sft_settings(cfg, base))


# ---- cache key --------------------------------------------------------------------------------------


def test_key_is_stable_and_ignores_dict_order():
    s = {"a": 1, "b": [1.5, "x"], "c": {"d": None}}
    assert sft.sft_cache_key(s) == sft.sft_cache_key(dict(reversed(list(s.items()))))
    assert len(sft.sft_cache_key(s)) == 16 and all(ch in "0123456789abcdef" for ch in sft.sft_cache_key(s))


def test_key_is_the_same_in_another_process_with_another_hash_seed(base):
    """No salted hash() anywhere: the key of a config is a fixed function of its settings."""
    here = key_of(RLConfig(), base)
    code = (
        "from rlsys import sft; from rlsys.config import RLConfig; import sys; "
        "print(sft.sft_cache_key(sft.sft_settings(RLConfig(), sys.argv[1])))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, base], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == here


@pytest.mark.parametrize(
    "section,field,value",
    [
        ("sft", "steps", 301),
        ("sft", "batch_size", 32),
        ("sft", "lr", 1e-3),
        ("sft", "warmup_steps", 0),
        ("sft", "num_examples", 100),
        ("sft", "seed", 1),
        ("sft", "dtype", OTHER_DTYPE),
        ("sft", "max_response_tokens", 16),
        ("data", "task", "sort"),
        ("model", "dtype", OTHER_DTYPE),
        ("learner", "weight_decay", 0.1),
        ("learner", "beta1", 0.8),
        ("learner", "grad_clip", 0.5),
    ],
)
def test_key_changes_with_every_setting_that_changes_the_weights(base, section, field, value):
    cfg = RLConfig()
    before = key_of(cfg, base)
    if value == OTHER_DTYPE:  # the default resolves per CPU kind: bf16 on AVX512_BF16, fp32 on AVX2
        value = "float32" if sft._train_dtype(cfg) == "bfloat16" else "bfloat16"
    setattr(getattr(cfg, section), field, value)
    assert key_of(cfg, base) != before


@pytest.mark.parametrize(
    "section,field,value",
    [
        ("sft", "output_dir", "/somewhere"),
        ("sft", "enabled", False),
        ("sft", "log_every", 7),
        ("sft", "eval_prompts", 0),
        ("sft", "eval_samples", 4),
        ("sft", "micro_batch_size", 64),
        ("sft", "num_workers", 1),
        ("learner", "num_workers", 2),
        ("learner", "zero_stage", 3),
        ("learner", "micro_batch_size", 2),
        ("trainer", "seed", 5),
        ("trainer", "total_steps", 1000),
        ("algo", "gamma", 1.0),
        ("rollout", "temperature", 0.7),
        ("rollout", "max_tokens", 16),
        ("cluster", "num_cpus", 8),
        ("learner", "lr", 1e-3),
        ("data", "num_train", 100),
    ],
)
def test_key_ignores_settings_that_cannot_change_the_weights(base, section, field, value):
    """Layout (ranks, ZeRO stage, micro-batches) leaves the gradient exact; RL settings are not SFT's."""
    cfg = RLConfig()
    before = key_of(cfg, base)
    setattr(getattr(cfg, section), field, value)
    assert key_of(cfg, base) == before


def test_sft_dtype_none_means_model_dtype(base):
    from rlsys.config import resolve_dtype

    cfg = RLConfig()
    cfg.sft.dtype = None
    implicit = key_of(cfg, base)  # model.dtype=auto, resolved for this machine
    cfg.sft.dtype = resolve_dtype(cfg).model.dtype
    assert key_of(cfg, base) == implicit
    cfg.sft.dtype = "float32" if cfg.sft.dtype == "bfloat16" else "bfloat16"
    assert key_of(cfg, base) != implicit


def test_key_depends_on_the_base_model(tmp_path, base):
    cfg = RLConfig()
    other_seed = fake_model(tmp_path / "base_seed1", {"format_version": 1, "size": "tiny", "seed": 1})
    assert key_of(cfg, base) != key_of(cfg, other_seed)
    # A checkpoint without an rlsys build record: its config and weight files identify it.
    ckpt = tmp_path / "ckpt"
    fake_model(ckpt)
    k1 = key_of(cfg, str(ckpt))
    assert key_of(cfg, str(ckpt)) == k1
    (ckpt / "model.safetensors").write_bytes(b"w" * 11)  # rewritten in place
    assert key_of(cfg, str(ckpt)) != k1


def test_default_dir_is_under_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RLSYS_CACHE_DIR", str(tmp_path / "cache"))
    assert sft.default_sft_dir("abc") == tmp_path / "cache" / "sft" / "abc"
    assert sft.default_sft_dir("abc", cache_dir=tmp_path) == tmp_path / "sft" / "abc"


# ---- data -------------------------------------------------------------------------------------------


class CharTokenizer:
    """One id per character (enough to check the stream's bookkeeping without a real tokenizer)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def stream(seed=0, batch_size=8, n=20, cap=64):
    from rlsys.tasks import get_task

    task = get_task("countdown")
    rows = task.generate("train", n, seed=0)
    prompts = [[i + 1] for i in range(n)]  # prompt i is the single token i + 1: identifies the row
    return (
        task,
        rows,
        sft.SFTBatches(
            task, rows, prompts, CharTokenizer(), eos_id=2, batch_size=batch_size, seed=seed, max_response_tokens=cap
        ),
    )


def test_stream_is_deterministic_and_seeded():
    _, _, s1 = stream(seed=0)
    _, _, s2 = stream(seed=0)
    _, _, s3 = stream(seed=1)
    b1 = [s1.next_batch() for _ in range(5)]
    assert b1 == [s2.next_batch() for _ in range(5)]
    assert b1 != [s3.next_batch() for _ in range(5)]


def test_each_epoch_visits_every_row_once_with_valid_solutions():
    task, rows, s = stream(batch_size=5, n=20)
    for epoch in range(3):
        seen = []
        for _ in range(4):  # 4 x 5 = one epoch of 20 rows
            prompts, responses = s.next_batch()
            for p, r in zip(prompts, responses):
                assert r[-1] == 2  # EOS
                row = rows[p[0] - 1]
                assert task.verify(CharTokenizer().decode(r[:-1]), row.answer)
                seen.append(p[0])
        assert sorted(seen) == list(range(1, 21)), f"epoch {epoch} is not a permutation"
        assert s.epoch == epoch


def test_solutions_are_redrawn_each_epoch_from_the_prior():
    """A prompt with several solutions gets different ones over the epochs (fresh draws, seeded)."""
    task, rows, s = stream(batch_size=20, n=20)
    per_row: dict[int, set] = {}
    for _ in range(30):
        prompts, responses = s.next_batch()
        for p, r in zip(prompts, responses):
            per_row.setdefault(p[0], set()).add(tuple(r))
    assert max(len(v) for v in per_row.values()) >= 2


def test_long_responses_are_cut_only_when_a_cap_is_set():
    _, _, s = stream(batch_size=4, cap=5)
    _, responses = s.next_batch()
    assert all(len(r) <= 5 for r in responses)
    assert s.num_truncated == 4 and s.longest_response == 5
    _, _, s = stream(batch_size=4, cap=None)
    _, responses = s.next_batch()
    assert s.num_truncated == 0 and s.longest_response == max(len(r) for r in responses) > 5


def test_stream_rejects_bad_arguments():
    from rlsys.tasks import get_task

    with pytest.raises(ValueError, match="at least one"):
        sft.SFTBatches(get_task("countdown"), [], [], CharTokenizer(), 2, 4, 0, 8)


def test_nll_batch_is_a_grpo_batch_with_unit_advantages():
    prompts = [[5, 6, 7], [8]]
    responses = [[9, 10, 2], [11, 2]]
    b = sft._nll_batch(prompts, responses, pad_id=0)
    assert b.advantages.tolist() == [1.0, 1.0]
    assert b.loss_normalizer == 5.0  # token_mean: the global response-token count
    assert not b.rollout_logprobs.any()  # so the learner's rollout_logprob_diff is the batch NLL
    assert b.response_mask.sum() == 5 and b.response_mask[0, 3:6].all() and b.response_mask[1, 1:3].all()
    lp = np.where(b.response_mask, -2.0, 0.0)
    assert sft._nll_per_token(lp, b.response_mask) == pytest.approx(2.0)


# ---- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("dtype", "float16", "sft.dtype"),
        ("micro_batch_size", 0, "sft.micro_batch_size"),
        ("max_response_tokens", 0, "sft.max_response_tokens"),
        ("warmup_steps", -1, "sft.warmup_steps"),
        ("log_every", 0, "sft.log_every"),
        ("eval_prompts", -1, "sft.eval_prompts"),
        ("eval_samples", 0, "sft.eval_samples"),
        ("num_workers", 0, "sft.num_workers"),
    ],
)
def test_validate_sft_names_the_key(field, value, match):
    cfg = RLConfig()
    setattr(cfg.sft, field, value)
    with pytest.raises(ConfigError, match=match):
        sft.validate_sft(cfg)


@pytest.mark.parametrize(
    "sft_workers,learners,gpus,cpus,expected",
    [
        (None, 1, 0.0, 3, 2),  # the default job on a 2-core machine: both cores train
        (None, 1, 0.0, 1, 1),  # a 1-CPU cluster: one rank
        (None, 4, 0.0, 8, 4),  # never fewer than the RL learners
        (None, 1, 1.0, 8, 1),  # GPU learners: exactly learner.num_workers (GPUs are not oversubscribed)
        (3, 1, 0.0, 1, 3),  # explicit: taken as given (_check_resources then refuses what does not fit)
    ],
)
def test_sft_learner_count(sft_workers, learners, gpus, cpus, expected):
    cfg = RLConfig()
    cfg.sft.num_workers, cfg.learner.num_workers, cfg.learner.num_gpus_per_worker = sft_workers, learners, gpus
    assert sft.sft_learner_count(cfg, cpus) == expected
    moved = sft.with_sft_learners(cfg, cpus)
    assert moved.learner.num_workers == expected and cfg.learner.num_workers == learners  # a copy


def test_explicit_sft_workers_that_do_not_fit_name_the_key():
    cfg = RLConfig()
    cfg.sft.num_workers = 4
    with pytest.raises(ConfigError, match=r"sft.num_workers=4.*exceed the 3 CPUs"):
        sft._check_resources(sft.with_sft_learners(cfg, 3), 3)


def test_warm_start_needs_a_built_in_task(tmp_path, base):
    cfg = RLConfig()
    cfg.model.path = base
    cfg.data.task = None
    cfg.data.path = str(tmp_path / "x.jsonl")
    Path(cfg.data.path).write_text("{}\n")
    with pytest.raises(ConfigError, match="data.task"):
        sft.warm_start(cfg)


def test_warm_start_refuses_to_overwrite_a_foreign_directory(tmp_path, base):
    cfg = RLConfig()
    cfg.model.path = base
    cfg.sft.output_dir = str(tmp_path / "mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="sft.output_dir"):
        sft.warm_start(cfg)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_a_complete_result_is_reused_without_touching_ray(tmp_path, base):
    """Same key + config.json + report: warm_start returns at once (it never imports a learner)."""
    cfg = RLConfig()
    cfg.model.path = base
    out = tmp_path / "done"
    cfg.sft.output_dir = str(out)
    key = key_of(cfg, base)
    fake_model(out)
    (out / sft.REPORT_FILE).write_text(json.dumps({"key": key, "steps": 3}))
    assert sft.warm_start(cfg) == str(out)
    assert sft.read_report(out)["steps"] == 3


def test_settings_are_json_and_complete(base):
    s = sft.sft_settings(RLConfig(), base)
    json.dumps(s)
    assert s["format_version"] == sft.FORMAT_VERSION
    assert s["base_model_identity"] == {"build_record": {"format_version": 1, "size": "tiny", "seed": 0}}
    assert {f.name for f in dataclasses.fields(RLConfig().sft)} - {
        "output_dir",
        "enabled",
        "log_every",
        "eval_prompts",
        "eval_samples",
        "micro_batch_size",
        "num_workers",
    } <= set(s)
