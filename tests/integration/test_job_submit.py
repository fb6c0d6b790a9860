"""`ray start --head` on this machine, then `ray job submit --working-dir . -- python -m rlsys.train`.

The job joins the running cluster (RAY_ADDRESS is set by the job supervisor) instead of starting
its own. The cluster is this test's alone: its own temp dir and ports, and it is torn down by
killing exactly its processes (``ray stop`` would also stop other clusters on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.netcheck import non_loopback_listeners

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DIGIT = "tests.integration.reward_fns:has_digit"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp_dir: str) -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                pids.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


@pytest.fixture()
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rlsys_ray_")  # short: Ray's unix socket paths are length-limited
    gcs, dash, agent_http, agent_grpc, metrics = (_free_port() for _ in range(5))
    # Ray 2.60 token auth: the head and every client (ray job submit) share a token file; a
    # fresh one per test keeps this cluster's credentials its own.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=4",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Explicit agent ports: the defaults (52365, ...) belong to whichever Ray cluster on
            # this machine took them first, and a node whose job agent cannot bind never
            # accepts a job ("No available agent to submit job").
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "ray": ray_bin, "temp_dir": temp_dir}
    finally:
        procs = [psutil.Process(p) for p in _cluster_pids(temp_dir) if psutil.pid_exists(p)]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_to_a_running_cluster(head_node, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write {i}.", "answer": str(i)}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    cmd = [
        head_node["ray"],
        "job",
        "submit",
        "--address",
        head_node["address"],
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "rlsys.train",
        "cluster=remote",
        f"run.output_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "trainer.total_steps=1",
        "trainer.prompts_per_step=4",
        "algo.group_size=4",
        "rollout.max_tokens=8",
        "eval.n=4",
        "eval.k=[1,4]",
        "eval.num_prompts=4",
        "learner.micro_batch_size=4",
        "logger.wandb_mode=disabled",
        "data=file",
        f"data.path={data}",
        f"data.verifier={DIGIT}",
        f"reward.allowed_functions=[{DIGIT}]",
    ]
    bad: list = []
    # Right after `ray start` the node's job agent may not be up yet; Ray then answers "No available
    # agent to submit job, please try again later" at once. Retry that (and only that), bounded.
    for _attempt in range(20):
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=head_node["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            bad.extend(non_loopback_listeners(_cluster_pids(head_node["temp_dir"])))
            time.sleep(1.0)
        if proc.poll() is None:
            proc.kill()
        stdout = proc.stdout.read()
        if proc.returncode != 0 and "No available agent to submit job" in stdout:
            time.sleep(3)
            continue
        break
    assert proc.returncode == 0, stdout[-6000:]
    assert "succeeded" in stdout, stdout[-3000:]
    assert "joined the Ray cluster" in stdout  # it used the running cluster, not a private one
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # 0: held-out eval before training
    assert (out / "checkpoints" / "step_000001" / "model.safetensors").exists()
    assert not bad, f"the cluster bound sockets off loopback: {sorted(set(bad))}"
