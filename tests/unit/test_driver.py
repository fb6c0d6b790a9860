"""The training loop (rlsys.driver) on in-process fakes: no Ray, no vLLM, no DeepSpeed, no weights.

``driver.train(cfg, actors)`` runs on any handles that satisfy the Protocols of rlsys.workers. The
fakes below record every call into one event list, so a test can read the phases of each step in
the order they ran; the tokenizer is a stub (``driver.load_tokenizer`` is patched) and the model
directory holds only a config.json and an empty weights file, which is all the config checks read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rlsys import checkpoint as ckpt
from rlsys import driver
from rlsys.build import Actors
from rlsys.config import ConfigError, RLConfig
from rlsys.metrics import MetricsLogger
from rlsys.records import GRADE_OK, Completion, Grade, RolloutGroup, RolloutRequest, TrainStats
from rlsys.sampler import PromptSampler
from rlsys.tasks import get_task
from rlsys.workers import LearnerGroupLike, RewardGroupLike, RolloutGroupLike
from rlsys.workers.learner import LearnerError
from rlsys.workers.vllm_engine import GenerationStats

ROOT = Path(__file__).resolve().parents[2]
RIGHT, WRONG = "Answer: right", "Answer: wrong"


# ================================ fakes ===============================================================


class FakeTokenizer:
    chat_template = "{{ messages }}"
    name_or_path = "fake"
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "|".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens):
        return [1 + ord(c) % 50 for c in text[:6]]

    def decode(self, ids, skip_special_tokens):
        return " ".join(map(str, ids))


def mixed_every_other(prompt_id: str, sample_index: int, version: int) -> str:
    """Half the prompts get one right answer (a mixed group), the others none."""
    return RIGHT if sample_index == 0 and int(prompt_id.rsplit("/", 1)[-1]) % 2 == 0 else WRONG


class FakeRollout:
    """Answers with ``answer(prompt_id, sample_index, weight_version)``; records calls into ``events``."""

    num_workers = 1
    restarts = 0

    def __init__(self, events: list, answer=mixed_every_other, version: int = 0):
        self.events, self.answer, self.version = events, answer, version
        self.weights_lock = threading.RLock()
        self.generated: list[list[str]] = []
        self.versions: list[int] = []  # the version each generate call sampled with

    def generate(self, requests, group_size, seeds):
        assert set(seeds) == {r.prompt_id for r in requests}
        self.events.append("generate")
        self.generated.append([r.prompt_id for r in requests])
        self.versions.append(self.version)
        groups = []
        for r in requests:
            comps = tuple(
                Completion(
                    token_ids=np.arange(1, 4, dtype=np.int32),
                    logprobs=np.full(3, -0.5, np.float32),
                    text=self.answer(r.prompt_id, j, self.version),
                    finish_reason="stop",
                )
                for j in range(group_size)
            )
            groups.append(RolloutGroup(r.prompt_id, r.prompt_token_ids, comps, self.version, 0))
        return groups, [GenerationStats(num_tokens=3 * group_size * len(requests), seconds=0.01, worker_id=0)]

    def load_weight_buckets(self, bucket_refs, version):
        self.events.append("load_weights")
        self.version = version
        return [len(bucket_refs)]

    def sequence_logprobs(self, token_ids, worker=None):
        self.events.append("sequence_logprobs")
        return [np.full(len(token_ids) - 1, -1.0, np.float32)]

    def describe(self):
        return [{"dtype": "float32", "threads": 1}]

    def shutdown(self):
        self.events.append("shutdown")


class FakeReward:
    num_workers = 1
    restarts = 0

    def __init__(self, events: list):
        self.events = events
        self.validated: list[str] = []

    def validate_specs(self, specs):
        self.validated.extend(specs)

    def grade(self, requests):
        self.events.append("grade")
        return [
            Grade(r.prompt_id, r.sample_index, float(r.completion == RIGHT), r.completion == RIGHT, GRADE_OK)
            for r in requests
        ]

    def shutdown(self):
        self.events.append("shutdown")


def make_stats(**overrides) -> TrainStats:
    """A TrainStats with every field it requires set to 0 (robust to new typed fields)."""
    values: dict[str, Any] = {
        f.name: (0 if f.type in ("int", int) else False if f.type in ("bool", bool) else 0.0)
        for f in dataclasses.fields(TrainStats)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    values.update(loss=0.1, grad_norm=1.0, lr=1e-3, num_tokens=12, ratio_max=1.0)
    values.update(overrides)
    return TrainStats(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainStats)}})


class FakeLearners:
    """``skipped``: which steps (1-based) report a non-finite, skipped update; ``fail_at``: the step
    whose train_step raises LearnerError; ``stats``: TrainStats fields every step reports."""

    num_workers = 1
    ready_info = [{"dtype": "float32", "threads": 1}]

    def __init__(self, events: list, skipped=(), fail_at=None, stats=None):
        self.events, self.skipped, self.fail_at, self.stats = events, set(skipped), fail_at, dict(stats or {})
        self.steps = 0
        self.batches: list[Any] = []
        self.loaded: list[str] = []

    def shard(self, batch, pad_token_id=0):
        self.batches.append(batch)
        return [batch]

    def train_step(self, global_batch_parts):
        self.events.append("train_step")
        self.steps += 1
        if self.steps == self.fail_at:
            raise LearnerError("learner rank 0 failed in phase 'train': boom")
        return make_stats(skipped=self.steps in self.skipped, **self.stats)

    def compute_logprobs(self, batch, pad_token_id=0):
        self.events.append("compute_logprobs")
        return np.full(batch.input_ids.shape, -1.0, np.float32)

    def export_weight_buckets(self, bucket_bytes, dtype=None):
        self.events.append("export_weights")
        return [f"bucket-{self.steps}"]

    def save_hf(self, path, dtype=None):
        self.events.append("save_hf")
        Path(path, "model.safetensors").write_text(f"weights after {self.steps} steps")
        return path

    def save_state(self, path, timeout_s=None):
        self.events.append("save_state")
        Path(path).mkdir()
        Path(path, "learner_state.json").write_text(json.dumps({"steps": self.steps}))

    def load_state(self, path, timeout_s=None):
        self.loaded.append(path)

    def shutdown(self, timeout_s=10.0):
        self.events.append("shutdown")


class RecordingLogger(MetricsLogger):
    events: list = []

    def log(self, step, metrics):
        RecordingLogger.events.append(f"log {step}")
        super().log(step, metrics)


@pytest.fixture
def events(monkeypatch) -> list:
    ev: list = []
    monkeypatch.setattr(driver, "load_tokenizer", lambda model_cfg, path: FakeTokenizer())
    monkeypatch.setattr(RecordingLogger, "events", ev)
    monkeypatch.setattr(driver, "MetricsLogger", RecordingLogger)
    return ev


def fakes(events: list, version: int = 0, **learner_kw) -> Actors:
    """``version``: the weight version the rollout fake holds (a resumed run's actors hold the checkpoint's)."""
    return Actors(
        rollout=FakeRollout(events, version=version),
        reward=FakeReward(events),
        learners=FakeLearners(events, **learner_kw),
    )


def make_cfg(tmp_path: Path, **sections) -> RLConfig:
    """A small config: the countdown task, B = 2, G = 2, no evaluation, a checkpoint every step.
    ``sections``: ``trainer={"total_steps": 4}`` etc. override fields of that section."""
    model = tmp_path / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"")  # never read: the fakes have no weights
    cfg = RLConfig()
    base: dict[str, dict[str, Any]] = {
        "run": {"output_dir": str(tmp_path / "run")},
        "trainer": {
            "total_steps": 2,
            "prompts_per_step": 2,
            "save_every": 1,
            "keep_checkpoints": 5,
            "eval_at_start_end": False,
            "log_samples": 1,
        },
        "algo": {"group_size": 2},
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"task": "countdown", "num_train": 16},
        "logger": {"wandb_mode": "disabled"},
        "eval": {"n": 2, "k": [1, 2], "num_prompts": 2},
    }
    for name, fields in sections.items():
        base.setdefault(name, {}).update(fields)
    for name, fields in base.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg


def metric_rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


PHASE_OF = {
    "generate": "generate",
    "grade": "grade",
    "train_step": "train",
    "export_weights": "sync",
    "load_weights": "sync",
    "compute_logprobs": "sync",
    "sequence_logprobs": "sync",
    "save_hf": "checkpoint",
    "save_state": "checkpoint",
}


def phases(events: list) -> list[str]:
    """The events as phases, runs of one phase collapsed (``log N`` -> ``log``)."""
    out: list[str] = []
    for e in events:
        p = "log" if e.startswith("log ") else PHASE_OF[e]
        if not out or out[-1] != p:
            out.append(p)
    return out


# ================================ tests ===============================================================


def test_fakes_satisfy_the_protocols():
    ev: list = []
    rollout: RolloutGroupLike = FakeRollout(ev)
    reward: RewardGroupLike = FakeReward(ev)
    learners: LearnerGroupLike = FakeLearners(ev)
    assert rollout.num_workers == reward.num_workers == learners.num_workers == 1


def test_each_step_runs_generate_grade_train_sync_log_checkpoint_in_order(tmp_path, events):
    actors = fakes(events)
    summary = driver.train(make_cfg(tmp_path), actors)

    assert phases(events) == ["generate", "grade", "train", "sync", "log", "checkpoint"] * 2
    # The sync pushes, then checks: export -> load -> learner and engine score the probe.
    first_sync = events[events.index("export_weights") : events.index("log 1")]
    assert first_sync == ["export_weights", "load_weights", "compute_logprobs", "sequence_logprobs"]
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["weight_version"] for r in rows] == [1, 2]
    assert all(r["sync/logprob_diff"] == 0.0 for r in rows)
    # B x G completions per step; half the prompts are mixed.
    assert actors.learners.batches[0].num_rows == 4
    assert rows[0]["algo/sampling_rounds"] == 1 and rows[0]["algo/filtered_groups"] == 0
    assert summary.steps == 2 and summary.checkpoint.endswith("step_000002")
    assert summary.first_reward == rows[0]["reward/mean"] and summary.last_reward == rows[1]["reward/mean"]
    # Injected actors belong to the caller: the driver checked their verifiers but did not shut them down.
    assert "shutdown" not in events
    assert actors.reward.validated == ["rlsys.tasks.countdown:verify"]


def test_dynamic_sampling_keeps_mixed_groups_and_refills(tmp_path, events):
    cfg = make_cfg(
        tmp_path,
        algo={"dynamic_sampling": True, "max_refill_rounds": 3, "group_size": 2},
        trainer={"prompts_per_step": 4},
    )
    rows = get_task("countdown").generate("train", 16, seed=0)
    requests = {r.prompt_id: RolloutRequest(r.prompt_id, (1, 2, 3)) for r in rows}
    rollout, reward = FakeRollout(events), FakeReward(events)
    sg = driver.collect_groups(cfg, 1, rows, requests, PromptSampler(len(rows), seed=0), rollout, reward)

    assert len(sg.groups) == 4 and [g.prompt_id for g in sg.groups] == [r.prompt_id for r in sg.rows]
    assert all(0 < int(c.sum()) < 2 for c in sg.correct), "only mixed groups are kept"
    asked = [p for call in rollout.generated for p in call]
    assert sg.refill["algo/sampling_rounds"] == len(rollout.generated) > 1
    assert sg.refill["algo/filtered_groups"] == len(asked) - 4
    assert len(sg.grades) == 2 * len(asked)  # every round's grades are counted
    assert tuple(sg.rewards.shape) == tuple(sg.correct.shape) == (4, 2)
    assert len(sg.gen_stats) == len(rollout.generated)


def test_dynamic_sampling_falls_back_to_the_first_round_when_nothing_is_mixed(tmp_path, events, caplog):
    cfg = make_cfg(tmp_path, algo={"dynamic_sampling": True, "max_refill_rounds": 2}, trainer={"total_steps": 1})
    actors = Actors(
        rollout=FakeRollout(events, answer=lambda p, j, v: WRONG),
        reward=FakeReward(events),
        learners=FakeLearners(events),
    )
    with caplog.at_level(logging.WARNING, logger="rlsys.driver"):
        driver.train(cfg, actors)
    assert "no mixed group in 3 rounds" in caplog.text
    row = metric_rows(tmp_path)[0]
    assert row["algo/sampling_rounds"] == 3 and row["algo/filtered_groups"] == 3 * cfg.trainer.prompts_per_step
    assert row["reward/mean"] == 0.0 and row["algo/mixed_group_fraction"] == 0.0
    # Trained on the first round's B groups (all-zero advantages), not on nothing.
    batch = actors.learners.batches[0]
    assert batch.num_rows == cfg.trainer.prompts_per_step * cfg.algo.group_size
    assert not batch.advantages.any()


def test_dynamic_sampling_trains_on_fewer_groups_when_refills_run_out(tmp_path, events, caplog):
    only_one = lambda p, j, v: RIGHT if j == 0 and p.endswith("/000000") else WRONG  # noqa: E731
    actors = Actors(
        rollout=FakeRollout(events, answer=only_one), reward=FakeReward(events), learners=FakeLearners(events)
    )
    with caplog.at_level(logging.WARNING, logger="rlsys.driver"):
        driver.train(
            make_cfg(
                tmp_path,
                algo={"dynamic_sampling": True, "max_refill_rounds": 1},
                trainer={"total_steps": 1, "prompts_per_step": 2},
                data={"task": "countdown", "num_train": 4},
            ),
            actors,
        )
    asked = [p for call in actors.rollout.generated for p in call]
    kept = sum(p.endswith("/000000") for p in asked)
    assert f"kept {kept} of 2 groups after 2 rounds" in caplog.text
    assert actors.learners.batches[0].num_rows == kept * 2


def test_checkpoint_cadence_rotation_and_resume(tmp_path, events):
    cfg = make_cfg(tmp_path, trainer={"total_steps": 5, "save_every": 2, "keep_checkpoints": 2})
    first = fakes(events)
    driver.train(cfg, first)
    saved_after = [e for e in events if e.startswith("log ") or e == "save_state"]
    assert saved_after == ["log 1", "log 2", "save_state", "log 3", "log 4", "save_state", "log 5", "save_state"]
    run = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000004", "step_000005"]
    state = ckpt.load_driver_state(run / "checkpoints" / "step_000005")
    assert (state.step, state.weight_version, state.skipped_in_a_row, state.dtype) == (5, 5, 0, "float32")

    # run.resume=never refuses a directory that holds checkpoints ...
    with pytest.raises(ConfigError, match="run.resume=auto"):
        driver.train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, total_steps=7)), fakes([]))
    # ... auto continues after the newest one: the same step numbers, versions and first reward.
    events.clear()
    resumed = make_cfg(
        tmp_path, trainer={"total_steps": 7, "save_every": 2, "keep_checkpoints": 2}, run={"resume": "auto"}
    )
    summary = driver.train(resumed, fakes(events, version=5))
    assert events[0] == "generate" and phases(events).count("train") == 2
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["weight_version"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert summary.first_reward == rows[0]["reward/mean"] and summary.checkpoint.endswith("step_000007")
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000006", "step_000007"]


def test_resume_drops_metric_rows_written_after_the_checkpoint(tmp_path, events):
    cfg = make_cfg(tmp_path, trainer={"total_steps": 2, "save_every": 1})
    driver.train(cfg, fakes(events))
    # As if the run died after logging step 2, before its checkpoint was complete.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000002")
    driver.train(make_cfg(tmp_path, trainer={"total_steps": 3}, run={"resume": "auto"}), fakes([]))
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2, 3]


def test_non_finite_steps_in_a_row_abort_the_run(tmp_path, events):
    cfg = make_cfg(tmp_path, trainer={"total_steps": 6, "max_nonfinite_steps": 2, "save_every": 0})
    # Step 1 is skipped, 2 is fine (the count restarts), 3 and 4 are skipped: abort after step 4.
    with pytest.raises(RuntimeError, match=r"step 4: 2 steps in a row had a non-finite loss") as err:
        driver.train(cfg, fakes(events, skipped=(1, 3, 4)))
    assert "trainer.max_nonfinite_steps=2" in str(err.value) and "(none yet)" in str(err.value)
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the aborted step is neither synced nor logged
    assert [r["train/skipped"] for r in rows] == [1, 0, 1]
    assert events.count("export_weights") == 3


def test_a_learner_failure_names_the_last_checkpoint_and_how_to_resume(tmp_path, events):
    with pytest.raises(RuntimeError, match="Last good checkpoint: .*step_000001") as err:
        driver.train(make_cfg(tmp_path, trainer={"total_steps": 3}), fakes(events, fail_at=2))
    assert "run.resume=auto" in str(err.value) and isinstance(err.value.__cause__, LearnerError)


class OffsetRollout(FakeRollout):
    """An engine whose probe log-probs sit ``offset`` nats/token away from the learner's."""

    offset = 0.2

    def sequence_logprobs(self, token_ids, worker=None):
        self.events.append("sequence_logprobs")
        return [np.full(len(token_ids) - 1, -1.0 + self.offset, np.float32)]


@pytest.mark.parametrize(
    ("dtype", "bound", "fails"),
    [
        ("float32", None, "(bound sync.max_logprob_diff=0.1, the float32 default)"),
        ("bfloat16", None, None),
        ("bfloat16", 0.15, "(bound sync.max_logprob_diff=0.15)"),
    ],
)
def test_the_sync_probe_bound_follows_the_dtype_unless_set(tmp_path, events, dtype, bound, fails):
    """0.2 nats/token is bf16 kernel noise on a deep model but not in float32 (sync_logprob_bound)."""
    cfg = make_cfg(tmp_path, model={"dtype": dtype}, sync={"max_logprob_diff": bound}, trainer={"total_steps": 1})
    actors = Actors(rollout=OffsetRollout(events), reward=FakeReward(events), learners=FakeLearners(events))
    if fails is None:
        driver.train(cfg, actors)
        assert metric_rows(tmp_path)[0]["sync/logprob_diff"] == pytest.approx(0.2)
    else:
        with pytest.raises(RuntimeError, match="rollout worker 0 scores the probe sequence 0.2000") as err:
            driver.train(cfg, actors)
        assert fails in str(err.value)


def documented_metric_keys() -> set[str]:
    """The keys docs/metrics.md names in its tables (first column, backticked; ``@k`` stands for any k)."""
    keys: set[str] = set()
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([^`]+)`", line.split(" | ")[0]))
    return keys


def test_every_emitted_metric_key_is_documented(tmp_path, events):
    cfg = make_cfg(
        tmp_path,
        trainer={"total_steps": 2, "eval_at_start_end": True, "eval_every": 1},
        algo={"dynamic_sampling": True, "tis_cap": 2.0},
    )
    # The optional TrainStats fields (KL to the reference, truncated IS) filled, so their keys show up too.
    optional = {"kl": 0.01, "tis_weight_mean": 0.9, "tis_clip_fraction": 0.1, "ratio_mean": 1.0, "ratio_min": 1.0}
    summary = driver.train(cfg, fakes(events, stats=optional))
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]  # row 0: the starting policy's evaluation
    keys = {k for r in rows for k in r}
    assert {"eval/pass@1", "time/eval", "run/bf16", "algo/sampling_rounds", "train/kl", "train/tis_weight_mean"} <= keys
    documented = documented_metric_keys()
    undocumented = sorted(k for k in keys if re.sub(r"@\d+", "@k", k) not in documented)
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"
    assert all(
        isinstance(v, (int, float)) and math.isfinite(v) for k, v in rows[1].items() if not k.startswith("cpu/")
    ), rows[1]
    assert set(summary.eval_before) == set(summary.eval_after) == {1, 2}


# ================================ PPO mini-batches and the off-policy modes ===========================


def test_mini_batches_compute_pi_old_once_and_split_whole_groups(tmp_path, events):
    cfg = make_cfg(tmp_path, trainer={"total_steps": 1, "prompts_per_step": 4, "mini_batches": 2, "epochs": 2})
    actors = fakes(events)
    driver.train(cfg, actors)
    step_events = events[: events.index("export_weights")]
    # pi_old once, before the first of the 2 x 2 updates
    assert [e for e in step_events if e in ("compute_logprobs", "train_step")] == ["compute_logprobs"] + [
        "train_step"
    ] * 4
    minis = actors.learners.batches
    assert [b.num_rows for b in minis] == [4, 4, 4, 4]  # 2 whole groups of G = 2 each
    for b in minis:
        assert b.old_logprobs is not None and (b.old_logprobs[b.response_mask] == -1.0).all()
        assert b.loss_normalizer == b.response_mask.sum() == 12  # its own tokens, not the batch's 24
    # every epoch covers every row once
    key = [tuple(map(tuple, b.input_ids[:, :3])) for b in minis]
    assert sorted(key[0] + key[1]) == sorted(key[2] + key[3])
    row = metric_rows(tmp_path)[0]
    assert row["train/updates"] == 4 and "time/pi_old" in row
    updates = [json.loads(line) for line in (tmp_path / "run" / "updates.jsonl").read_text().splitlines()]
    assert [(u["step"], u["update"]) for u in updates] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert {"clip_fraction", "ratio_min", "ratio_max"} <= set(updates[0])


def test_one_step_off_trains_each_batch_sampled_by_the_previous_weights(tmp_path, events):
    sync_actors = fakes([])
    driver.train(make_cfg(tmp_path / "sync", trainer={"total_steps": 4}), sync_actors)
    actors = fakes(events)
    driver.train(make_cfg(tmp_path, trainer={"total_steps": 4, "mode": "one_step_off"}), actors)
    # Batch s is generated while step s - 1 trains, by the weights of step s - 2 (the first two by v0).
    assert actors.rollout.versions == [0, 0, 1, 2]
    assert sync_actors.rollout.versions == [0, 1, 2, 3]
    # Same prompts, same order as sync: only the weights that sampled them differ.
    assert actors.rollout.generated == sync_actors.rollout.generated
    rows = metric_rows(tmp_path)
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert all(r["rollout/dropped_stale_groups"] == 0 for r in rows)
    assert [r["weight_version"] for r in rows] == [1, 2, 3, 4]
    assert all("time/wait_rollout" in r and "time/rollout" in r for r in rows)
    assert [("time/push_wait" in r) for r in rows] == [True, True, True, False]  # nothing to wait for after the last


@pytest.mark.parametrize("staleness", [1, 2, 3])
def test_async_mode_keeps_every_group_within_the_bound(tmp_path, events, staleness):
    actors = fakes(events)
    driver.train(make_cfg(tmp_path, trainer={"total_steps": 6, "mode": "async", "max_staleness": staleness}), actors)
    rows = metric_rows(tmp_path)
    assert all(r["rollout/staleness_max"] <= staleness and r["rollout/dropped_stale_groups"] == 0 for r in rows)
    # Each batch generated once, in order: no batch lost or duplicated.
    assert len(actors.rollout.generated) == 6
    assert actors.rollout.versions == sorted(actors.rollout.versions)


def test_a_group_beyond_the_bound_is_dropped_and_counted(tmp_path, events):
    groups = driver.StepGroups(
        rows=["a", "b"],
        groups=[RolloutGroup("a", (1,), (), 3, 0), RolloutGroup("b", (1,), (), 1, 0)],
        rewards=torch_rows([[1.0, 0.0], [0.0, 1.0]]),
        correct=torch_rows([[1, 0], [0, 1]]).bool(),
        grades=[],
        gen_stats=[],
        refill={},
        reward_seconds=0.0,
    )
    kept, m = driver.drop_stale(groups, version=4, bound=2, step=5)
    assert [g.prompt_id for g in kept.groups] == ["a"] and kept.rows == ["a"] and kept.rewards.shape == (1, 2)
    assert m == {"rollout/staleness_mean": 1.0, "rollout/staleness_max": 1, "rollout/dropped_stale_groups": 1}
    with pytest.raises(RuntimeError, match="every group"):
        driver.drop_stale(groups, version=9, bound=2, step=5)
    assert driver.drop_stale(groups, version=9, bound=0, step=5)[1]["rollout/dropped_stale_groups"] == 0  # sync


def torch_rows(values):
    import torch

    return torch.tensor(values)


def by_version(prompt_id: str, sample_index: int, version: int) -> str:
    """A mixed group at even versions, an all-correct one at odd: the reward tells which weights sampled."""
    return RIGHT if sample_index <= version % 2 else WRONG


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_a_resumed_off_policy_run_trains_on_the_batches_in_flight_at_its_checkpoint(tmp_path, events, mode):
    trainer = {"total_steps": 4, "save_every": 2, "mode": mode, "max_staleness": 1}
    straight = fakes([])
    straight.rollout.answer = by_version
    driver.train(make_cfg(tmp_path / "straight", trainer=trainer), straight)
    # The same run dies in step 3, after its step-2 checkpoint (which kept batch 3, sampled by v1) ...
    dying = fakes(events, fail_at=3)
    dying.rollout.answer = by_version
    with pytest.raises(RuntimeError, match="run.resume=auto"):
        driver.train(make_cfg(tmp_path, trainer=trainer), dying)
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / ckpt.INFLIGHT_FILE).exists()
    # ... and resumes on fresh actors that hold the checkpoint's weights (v2).
    resumed = fakes([], version=2)
    resumed.rollout.answer = by_version
    driver.train(make_cfg(tmp_path, trainer=trainer, run={"resume": "auto"}), resumed)
    # Batch 3 came from the checkpoint (not generated again), batch 4 from where the sampler stood.
    assert resumed.rollout.generated == straight.rollout.generated[3:]
    assert dying.rollout.generated[:3] == straight.rollout.generated[:3]
    got = [(r["step"], r["reward/mean"], r["rollout/staleness_max"]) for r in metric_rows(tmp_path)]
    if mode == "one_step_off":  # every push waits for the batch in generation: which weights sample what is fixed
        want = [(r["step"], r["reward/mean"], r["rollout/staleness_max"]) for r in metric_rows(tmp_path / "straight")]
        assert got == want
        assert [w[1] for w in want] == [0.5, 0.5, 1.0, 0.5]  # batch 3 was sampled by v1
    else:  # async: a batch's weights depend on when its generation started; the kept batch is trained on
        kept = ckpt.load_inflight(tmp_path / "run" / "checkpoints" / "step_000002", driver.INFLIGHT_TYPES)
        assert sorted(kept) == [3]
        assert [g[0] for g in got] == [1, 2, 3, 4] and all(g[2] <= 1 for g in got)
        assert got[2][1] == pytest.approx(float(kept[3].rewards.mean()))


def test_sync_mode_refuses_a_checkpoint_with_batches_in_flight(tmp_path, events):
    dying = fakes(events, fail_at=2)
    with pytest.raises(RuntimeError):
        driver.train(make_cfg(tmp_path, trainer={"total_steps": 3, "mode": "one_step_off"}), dying)
    with pytest.raises(ConfigError, match="trainer.mode=sync"):
        driver.train(make_cfg(tmp_path, trainer={"total_steps": 3}, run={"resume": "auto"}), fakes([], version=1))
