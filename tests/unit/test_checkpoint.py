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
