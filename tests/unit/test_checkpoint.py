"""Checkpoint directories: atomic commit, newest complete one wins, half-written ones never do."""

import json

import pytest

from rlsys import checkpoint as ckpt
from rlsys.sampler import SamplerState


def state(step: int) -> ckpt.DriverState:
    return ckpt.DriverState(
        step=step,
        sampler=SamplerState(1, step * 4),
        weight_version=step,
        wandb_run_id="abc",
        skipped_in_a_row=0,
        first_reward=0.25,
        eval_before={1: 0.1, 16: 0.5},
    )


def save(out, step: int, keep: int = 5):
    tmp = ckpt.begin(out, step)
    (tmp / "model.safetensors").write_bytes(b"w" * step)
    return ckpt.commit(tmp, state(step), keep)


def test_state_round_trips_through_json():
    s = state(7)
    assert ckpt.DriverState.from_json(s.to_json()) == s


def test_newest_complete_checkpoint_is_picked_and_tmp_dirs_are_not(tmp_path):
    assert ckpt.latest(tmp_path) is None
    save(tmp_path, 2)
    save(tmp_path, 4)
    # A save killed half-way: the hidden temp dir exists, the step dir does not.
    half = ckpt.begin(tmp_path, 6)
    (half / "model.safetensors").write_bytes(b"partial")
    # A step-named dir without a driver state (e.g. copied by hand) is not complete either.
    (tmp_path / "checkpoints" / "step_000008").mkdir()
    assert ckpt.latest(tmp_path).name == "step_000004"
    assert ckpt.load_driver_state(ckpt.latest(tmp_path)) == state(4)


def test_rotation_keeps_the_newest_and_sweeps_temp_dirs(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=2)
    ckpt.begin(tmp_path, 4)  # an abandoned temp dir, swept by the next commit
    save(tmp_path, 5, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000003", "step_000005"]


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3)
    tmp = ckpt.begin(tmp_path, 3)
    (tmp / "model.safetensors").write_bytes(b"new")
    ckpt.commit(tmp, state(3), keep=2)
    assert (ckpt.step_dir(tmp_path, 3) / "model.safetensors").read_bytes() == b"new"


def test_truncate_metrics_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "x": s} for s in (0, 1, 2, 3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "x"')
    assert ckpt.truncate_metrics(p, 2) == 2
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [0, 1, 2]


def test_other_format_versions_are_refused():
    text = state(1).to_json().replace('"format_version": 1', '"format_version": 99')
    with pytest.raises(ValueError, match="another rlsys version"):
        ckpt.DriverState.from_json(text)


def test_inflight_batches_round_trip_exactly_as_json(tmp_path):
    import numpy as np
    import torch

    from rlsys import driver
    from rlsys.records import Completion, Grade, PromptRow, RolloutGroup
    from rlsys.workers.vllm_engine import GenerationStats

    comp = Completion(
        token_ids=np.array([5, 6, 7], np.int32),
        logprobs=np.array([-0.1, -1e-8, -3.3333333], np.float32),
        text="Answer: 1",
        finish_reason="stop",
        version_spans=((1, 0, 2), (2, 2, 3)),
    )
    groups = driver.StepGroups(
        rows=[PromptRow("p/1", (("user", "hi"),), "1", "math")],
        groups=[RolloutGroup("p/1", (1, 2), (comp, comp), 1, 0)],
        rewards=torch.tensor([[1.0, 0.1]]),
        correct=torch.tensor([[True, False]]),
        grades=[Grade("p/1", 0, 1.0, True, "ok")],
        gen_stats=[GenerationStats(num_tokens=6, seconds=0.25, worker_id=0)],
        refill={"algo/sampling_rounds": 1, "algo/filtered_groups": 0},
        reward_seconds=0.5,
        collect_seconds=1.5,
    )
    ckpt.save_inflight(tmp_path, {3: groups})
    assert "pickle" not in (tmp_path / ckpt.INFLIGHT_FILE).read_text()
    back = ckpt.load_inflight(tmp_path, driver.INFLIGHT_TYPES)[3]
    assert back.rows == groups.rows and back.grades == groups.grades and back.gen_stats == groups.gen_stats
    assert torch.equal(back.rewards, groups.rewards) and torch.equal(back.correct, groups.correct)
    (g,) = back.groups
    assert (g.prompt_id, g.prompt_token_ids, g.weight_version) == ("p/1", (1, 2), 1)
    c = g.completions[0]
    assert c.token_ids.dtype == np.int32 and np.array_equal(c.token_ids, comp.token_ids)
    assert c.logprobs.dtype == np.float32 and np.array_equal(c.logprobs, comp.logprobs)  # bit for bit
    assert c.version_spans == comp.version_spans and back.refill == groups.refill
    with pytest.raises(ValueError, match="not a record a checkpoint may hold"):
        ckpt.load_inflight(tmp_path, (driver.StepGroups,))
    assert ckpt.load_inflight(tmp_path / "missing", driver.INFLIGHT_TYPES) == {}
