"""Exact resume: a 4-step run straight, and the same run SIGKILLed once its step-2 checkpoint exists
and resumed with run.resume=auto, produce the same metrics and the same weights for steps 3-4.

Everything that decides a step is either in the checkpoint (learner weights, AdamW state, RNG,
prompt cursor, weight version) or a pure function of it (per-prompt sampling seeds, grading), so
the CPU path is compared bitwise; only wall-clock metrics differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DIGIT = "tests.integration.reward_fns:has_digit"
WALL_CLOCK = ("time/", "cpu/", "rollout/tokens_per_s", "sync/seconds")  # measured, not computed


def _cmd(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Write {i}.", "answer": str(i)}) + "\n" for i in range(32)))
    return [
        sys.executable,
        "-m",
        "rlsys.train",
        f"run.output_dir={out}",
        f"hydra.run.dir={out}/hydra",
        "trainer.total_steps=4",
        "trainer.save_every=2",
        "trainer.keep_checkpoints=3",
        "trainer.prompts_per_step=4",
        "algo.group_size=4",
        "rollout.max_tokens=12",
        "learner.micro_batch_size=4",
        "learner.lr=1e-3",
        "trainer.eval_at_start_end=false",
        "logger.wandb_mode=disabled",
        "cluster.num_cpus=4",
        "data=file",
        f"data.path={data}",
        f"data.verifier={DIGIT}",
        f"reward.allowed_functions=[{DIGIT}]",
        *extra,
    ]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert len(by_step) == len(rows), "a step appears twice in metrics.jsonl"
    return {s: {k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for s, r in by_step.items()}


def test_sigkill_after_step_2_then_resume_matches_a_straight_run(tmp_path):
    straight = tmp_path / "straight"
    res = subprocess.run(_cmd(tmp_path, straight), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(tmp_path, killed),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 900
    while not (killed / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, "the run ended before its step-2 checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session, mid-run
    proc.wait(timeout=60)

    res = subprocess.run(
        _cmd(tmp_path, killed, "run.resume=auto"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "resuming from" in res.stdout + res.stderr

    a, b = _rows(straight), _rows(killed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step] == b[step], f"step {step} differs after resume"
    wa = load_file(str(straight / "checkpoints" / "step_000004" / "model.safetensors"))
    wb = load_file(str(killed / "checkpoints" / "step_000004" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    (out / "checkpoints" / "step_000002" / "driver_state.json").write_text("{}")
    res = subprocess.run(_cmd(tmp_path, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "run.resume=auto" in res.stderr


def _learner_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("_LearnerActor" in part for part in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def test_a_dead_learner_stops_the_run_naming_the_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(tmp_path, out, "trainer.save_every=1"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 900
    while not (out / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, "the run ended before its step-2 checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    before = set(_learner_pids())
    assert before, "no learner actor process found"
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=600)
    # The kill lands within 0.2 s of the step-2 checkpoint appearing, with two steps still to run.
    assert proc.returncode != 0, "the run survived the death of its learner"
    assert "learner rank 0" in stdout and "Last good checkpoint" in stdout, stdout[-4000:]
    assert "run.resume=auto" in stdout

    res = subprocess.run(
        _cmd(tmp_path, out, "trainer.save_every=1", "run.resume=auto"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert sorted(_rows(out)) == [1, 2, 3, 4]
