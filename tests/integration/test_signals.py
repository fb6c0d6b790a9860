"""Ctrl-C / SIGTERM / a second Ctrl-C in each phase of real jobs (rlsys.signals).

Each test starts ``python -m rlsys.train`` (or ``rlsys.sft``) as a user would, in its own session
(``start_new_session``: a signal to its process group is what a terminal's Ctrl-C sends to the
foreground job: the driver and the Ray processes it started, which Ray runs with SIGINT blocked;
the actors have process groups of their own), waits until the log shows that the
phase has begun (``RLSYS_DEBUG=rlsys.signals`` logs each phase the driver enters), sends the
signal and checks: exit code 130 / 143, exit within 10 s of the signal, exactly one stop line
naming the phase, the last complete checkpoint and the resume command, no partial checkpoint
(``.tmp-``) or SFT staging directory left, and none of the processes the job had started alive.
The checkpoint test then runs the printed resume command and checks that it finishes the run.

Sizes are tiny (sft.enabled=false: the random tiny model, 8 prompts x 4 samples x 32 tokens); the
time goes into starting Ray, vLLM and DeepSpeed (~20-30 s per job on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STOP_LIMIT_S = 10.0  # the bound: signal -> process gone
HANG = "tests.integration.reward_fns:hang_on_marker"

RL = [
    "sft.enabled=false",
    "trainer.total_steps=3",
    "trainer.prompts_per_step=8",
    "algo.group_size=4",
    "rollout.max_tokens=32",
    "learner.micro_batch_size=32",
    "logger.wandb_mode=disabled",
    "trainer.eval_at_start_end=false",
    "trainer.save_every=1",
    "trainer.log_samples=0",
    "eval.n=4",
    "eval.k=[1,4]",
    "eval.num_prompts=4",
]


def rl(*changes: str) -> list[str]:
    """RL with some keys set otherwise (one value per key on the command line)."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in RL if o.split("=", 1)[0] not in keys] + list(changes)


SFT = [
    "sft.steps=400",
    "sft.batch_size=16",
    "sft.micro_batch_size=16",
    "sft.num_examples=64",
    "sft.log_every=5",
    "sft.warmup_steps=2",
    "sft.eval_prompts=4",
    "sft.eval_samples=4",
    "logger.wandb_mode=disabled",
]


class Job:
    """One rlsys CLI process in its own session, its output read line by line as it comes."""

    def __init__(self, tmp_path: Path, module: str, *overrides: str):
        self.tmp_path = tmp_path
        self.out = tmp_path / "run"
        self.cmd = [
            sys.executable,
            "-m",
            module,
            f"run.output_dir={self.out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *overrides,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", RLSYS_DEBUG="rlsys.signals,rlsys.checkpoint")
        env.pop("RAY_ADDRESS", None)
        env.pop("RLSYS_STOP_GRACE_S", None)
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.tree: list[psutil.Process] = []
        self.t_signal: list[float] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 600.0) -> re.Match:
        """Block until an output line matches ``pattern``; fail (with the log tail) if the job ends first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for _, line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self.reader.is_alive():
                    pytest.fail(f"job ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.text[-6000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.text[-6000:]}")
                self.cond.wait(0.5)

    def send(self, sig: int, group: bool) -> None:
        """Signal the driver (``group``: its whole process group, as a terminal's Ctrl-C does)."""
        if not self.tree:  # every process the job started, before the signal
            self.tree = psutil.Process(self.proc.pid).children(recursive=True)
        self.t_signal.append(time.monotonic())
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 60.0) -> tuple[int, float]:
        """(exit code, seconds from the first signal to the exit)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after the signal:\n{self.text[-6000:]}")
        elapsed = time.monotonic() - self.t_signal[0]
        self.reader.join(10)
        return rc, elapsed

    def survivors(self, wait_s: float = 5.0) -> list[str]:
        """Processes of the job still alive (zombies count as gone) after up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = []
            for p in self.tree:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the job and everything it started (clean-up after a failed test)."""
        procs = list(self.tree)
        if self.proc.poll() is None:
            try:
                me = psutil.Process(self.proc.pid)
                procs += [*me.children(recursive=True), me]
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture()
def job_factory(tmp_path):
    jobs: list[Job] = []

    def start(module: str, *overrides: str) -> Job:
        jobs.append(Job(tmp_path, module, *overrides))
        return jobs[-1]

    yield start
    for j in jobs:  # never leave a job behind, whatever failed
        j.kill()


def stop_lines(job: Job) -> list[str]:
    return [line for _, line in job.lines if line.startswith("rlsys: interrupted by ")]


def check_stopped(job: Job, sig: int, phase: str, at: str = "", limit_s: float = STOP_LIMIT_S) -> str:
    """The common checks after a stop (``at``: the step the line names, e.g. "2/3", or "any" for some
    step); returns the stop line."""
    rc, elapsed = job.wait_exit()
    log = job.text
    assert rc == 128 + sig, f"exit code {rc}, want {128 + sig}:\n{log[-6000:]}"
    assert elapsed < limit_s, f"took {elapsed:.1f} s to stop:\n{log[-4000:]}"
    name = signal.Signals(sig).name
    assert f"rlsys: stopping ({name}) during {phase}" in log, log[-4000:]
    lines = stop_lines(job)
    assert len(lines) == 1, lines
    step = r" at step \d+/\d+;" if at == "any" else (f" at step {re.escape(at)};" if at else ";")
    assert re.match(re.escape(f"rlsys: interrupted by {name} during {phase}") + step, lines[0]), lines[0]
    assert not list(job.tmp_path.rglob("*.tmp-*")), f"partial checkpoint left: {list(job.tmp_path.rglob('*.tmp-*'))}"
    assert not list(job.tmp_path.rglob("*.staging-*")), "partial SFT result left"
    alive = job.survivors()
    assert not alive, f"processes of the stopped job still alive: {alive}"
    print(f"\n{phase}/{name}: exit {rc} in {elapsed:.2f} s\n{lines[0]}")
    return lines[0]


def resume_command(line: str) -> list[str]:
    cmd = shlex.split(line.split("resume with: ", 1)[1])
    assert cmd[:3] == ["python", "-m", "rlsys.train"]
    return [sys.executable, *cmd[1:]]


# ================================ SFT ==================================================================


def test_ctrl_c_during_sft(job_factory, tmp_path):
    """The report: Ctrl-C during SFT did nothing for > 50 s. Terminal-style: the whole process group."""
    job = job_factory("rlsys.sft", *SFT, f"sft.output_dir={tmp_path / 'sft'}")
    job.wait_for(r"SFT step [1-9]\d*/")  # the learners are training
    job.send(signal.SIGINT, group=True)
    line = check_stopped(job, signal.SIGINT, "sft", at="any")  # the SFT step it stopped in
    assert "no partial result was kept; run it again with: python -m rlsys.sft" in line
    assert not (tmp_path / "sft").exists()


# ================================ RL phases ============================================================


def test_ctrl_c_during_generate(job_factory):
    job = job_factory("rlsys.train", *rl("trainer.prompts_per_step=16"))  # generate takes ~1 s
    job.wait_for(r"phase generate \(step 2\)")
    job.send(signal.SIGINT, group=True)
    line = check_stopped(job, signal.SIGINT, "generate", "2/3")
    assert f"last complete checkpoint: {job.out / 'checkpoints' / 'step_000001'};" in line
    assert line.endswith(f"run.output_dir={job.out} run.resume=auto")


def test_sigterm_during_grade(job_factory, tmp_path):
    """Every verifier call hangs (until reward.timeout_s): the grade phase is stopped mid-call, the
    verifier sandbox processes go with the reward actor."""
    data = tmp_path / "hang.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write {i}.", "answer": "HANG"}) + "\n" for i in range(16)))
    job = job_factory(
        "rlsys.train",
        *RL,
        "data=file",
        f"data.path={data}",
        f"data.verifier={HANG}",
        f"reward.allowed_functions=[{HANG}]",
        "reward.timeout_s=120",
    )
    job.wait_for(r"phase grade \(step 1\)")
    time.sleep(1.0)  # the sandboxes are inside the hanging verifier now
    job.send(signal.SIGTERM, group=False)
    line = check_stopped(job, signal.SIGTERM, "grade", "1/3")
    assert "last complete checkpoint: none;" in line


def test_second_ctrl_c_during_train_kills_at_once(job_factory):
    job = job_factory("rlsys.train", *RL)
    job.wait_for(r"phase train \(step 1\)")
    job.send(signal.SIGINT, group=True)
    time.sleep(0.2)
    job.send(signal.SIGINT, group=True)
    line = check_stopped(job, signal.SIGINT, "train", "1/3")
    assert "rlsys: second signal (SIGINT): killing the job's processes now" in job.text
    second_to_exit = time.monotonic() - job.t_signal[1]
    assert second_to_exit < 5.0  # generous: the kill itself takes ~0.1 s
    assert "last complete checkpoint: none;" in line


def test_sigterm_during_sync(job_factory):
    job = job_factory("rlsys.train", *RL)
    job.wait_for(r"phase sync \(step 1\)")
    job.send(signal.SIGTERM, group=False)
    check_stopped(job, signal.SIGTERM, "sync", "1/3")


def test_ctrl_c_during_eval(job_factory):
    job = job_factory("rlsys.train", *rl("trainer.eval_at_start_end=true"))
    job.wait_for(r"phase eval \(step 0\)")
    job.send(signal.SIGINT, group=True)
    check_stopped(job, signal.SIGINT, "eval", "0/3")


def test_ctrl_c_during_checkpoint_write_then_resume(job_factory):
    """Stopped while the learners write step 2 into its temporary directory: the directory is
    removed, step 1 is named, and the printed command finishes the run from step 1."""
    job = job_factory("rlsys.train", *RL)
    m = job.wait_for(r"writing step 2 into (\S+)")
    tmp = Path(m.group(1))
    job.send(signal.SIGINT, group=False)
    line = check_stopped(job, signal.SIGINT, "checkpoint", "2/3")
    step1 = job.out / "checkpoints" / "step_000001"
    assert f"last complete checkpoint: {step1};" in line
    assert not tmp.exists() and not (job.out / "checkpoints" / "step_000002").exists()

    resumed = subprocess.run(
        resume_command(line),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    out = resumed.stdout + resumed.stderr
    assert f"resuming from {step1} (step 1" in out, out[-4000:]
    assert f"checkpoint: {job.out / 'checkpoints' / 'step_000003'}" in out
    steps = [json.loads(r)["step"] for r in (job.out / "metrics.jsonl").read_text().splitlines() if r.strip()]
    assert steps == [1, 2, 3]


# ================================ ray job stop ==========================================================

from tests.integration.test_job_submit import _cluster_pids, head_node  # noqa: E402,F401 - the fixture

_ACTOR_TITLES = ("RolloutWorkerActor", "_LearnerActor", "RewardWorker")


def _job_actor_processes(temp_dir: str) -> list[str]:
    """Live rlsys actor processes of the test's cluster (children of its raylet)."""
    found = []
    for pid in _cluster_pids(temp_dir):
        try:
            p = psutil.Process(pid)
            if "raylet" not in " ".join(p.cmdline()[:1]):
                continue
            for c in p.children(recursive=True):
                title = " ".join(c.cmdline())
                if any(t in title for t in _ACTOR_TITLES) and c.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"{c.pid} {title[:80]}")
        except psutil.Error:
            continue
    return found


def test_ray_job_stop(head_node, tmp_path):  # noqa: F811 - the fixture imported above
    """`ray job stop` sends SIGTERM to the entrypoint and SIGKILL 3 s later: the job prints its stop
    line before that, its actors are killed, and the cluster it joined keeps running."""
    ray_cmd = [head_node["ray"], "job"]
    addr = ["--address", head_node["address"]]
    env = head_node["env"]
    sub_id = f"rlsys-sigtest-{os.getpid()}-{int(time.time())}"
    out = tmp_path / "run"
    entry = [
        "env",
        "RLSYS_DEBUG=rlsys.signals",
        "python",
        "-m",
        "rlsys.train",
        "cluster=remote",
        f"run.output_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *rl("trainer.total_steps=40"),
    ]  # still running when `ray job stop` comes (the log polling is slow)
    for _attempt in range(20):  # the job agent may not be up right after `ray start` (see test_job_submit)
        r = subprocess.run(
            [
                *ray_cmd,
                "submit",
                *addr,
                "--no-wait",
                "--submission-id",
                sub_id,
                "--working-dir",
                str(ROOT),
                "--",
                *entry,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0 and "No available agent to submit job" in r.stdout + r.stderr:
            time.sleep(3)
            continue
        break
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    def logs() -> str:
        return subprocess.run(
            [*ray_cmd, "logs", *addr, sub_id], env=env, capture_output=True, text=True, timeout=60
        ).stdout

    def job_status() -> str:
        return subprocess.run(
            [*ray_cmd, "status", *addr, sub_id], env=env, capture_output=True, text=True, timeout=60
        ).stdout

    deadline = time.monotonic() + 600
    while "phase train (step 1)" not in (text := logs()):
        st = job_status()
        assert time.monotonic() < deadline and not any(s in st.lower() for s in ("failed", "succeeded", "stopped")), (
            f"{st}\n{text[-4000:]}"
        )
        time.sleep(2.0)
    assert _job_actor_processes(head_node["temp_dir"])  # the job's actors are up
    t0 = time.monotonic()
    stop = subprocess.run([*ray_cmd, "stop", *addr, sub_id], env=env, capture_output=True, text=True, timeout=120)
    stop_s = time.monotonic() - t0
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = job_status()
    assert "stopped" in status.lower(), status
    text = logs()
    lines = [line for line in text.splitlines() if line.startswith("rlsys: interrupted by ")]
    assert len(lines) == 1, text[-4000:]
    assert lines[0].startswith("rlsys: interrupted by SIGTERM during "), lines[0]
    assert "resume with: python -m rlsys.train" in lines[0] and "cluster=remote" in lines[0]
    deadline = time.monotonic() + 10
    while (left := _job_actor_processes(head_node["temp_dir"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"actors of the stopped job still alive: {left}"
    assert not list(tmp_path.rglob("*.tmp-*"))
    # The cluster it joined is still up (only this job's actors were killed).
    assert any(
        "gcs_server" in " ".join(psutil.Process(p).cmdline()[:1])
        for p in _cluster_pids(head_node["temp_dir"])
        if psutil.pid_exists(p)
    )
    # Ray's job supervisor logs "... force-killed with SIGKILL" when SIGTERM did not end the job in 3 s.
    assert "force-killed" not in text, text[-3000:]
    how = "by the watchdog" if "killing the job's processes now" in text else "gracefully"
    print(f"\nray job stop: returned in {stop_s:.1f} s; the job stopped {how}\n{lines[0]}")
    assert stop_s < STOP_LIMIT_S
