#!/usr/bin/env python
"""Behaviour fingerprint of a short CPU training run: its metrics and the hashes of its checkpoint.

A refactor that preserves behaviour must leave both unchanged (CPU runs are bitwise deterministic
given the seed). Run it before and after, then compare::

    python scripts/fingerprint_run.py --out /tmp/before.json
    ...change the code...
    python scripts/fingerprint_run.py --out /tmp/after.json --compare /tmp/before.json

The run is the integration tests' 2-step ``SMALL`` job on a prompt file graded by a user function
(so a randomly initialised tiny model gets mixed groups and a real gradient), with 2 learner ranks
(ZeRO-2) and one vLLM engine, W&B offline off, and a checkpoint at each step. Measured keys that
vary run to run (``time/*``, ``cpu/*``, throughputs, seconds) are dropped from the metrics; every
file of every checkpoint is hashed except the ones that record wall-clock times. Extra arguments
are Hydra overrides appended to the job. Exit code 1 when ``--compare`` finds a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DIGIT = "tests.integration.reward_fns:has_digit"
JOB = [
    "trainer.total_steps=2",
    "trainer.prompts_per_step=4",
    "algo.group_size=4",
    "rollout.max_tokens=16",
    "learner.micro_batch_size=4",
    "logger=disabled",
    "learner.lr=1e-3",
    "learner.warmup_steps=0",
    "eval.n=4",
    "eval.k=[1,4]",
    "eval.num_prompts=4",
    "trainer.save_every=1",
    "trainer.keep_checkpoints=5",
    "learner.num_workers=2",
    "cluster.num_cpus=4",
    "data=file",
    f"data.verifier={DIGIT}",
    f"reward.allowed_functions=[{DIGIT}]",
]
# Metric keys measured from the clock or the machine, not computed by the algorithm.
VOLATILE_PREFIXES = ("time/", "cpu/", "progress/")
VOLATILE_SUBSTRINGS = ("seconds", "per_s", "_s_", "eta")
# Checkpoint files that record wall-clock facts (when, how long) next to the state.
VOLATILE_FILES = ("driver_state.json",)
# Keys of the learner-state manifests that differ between identical runs: the write time, the
# rank files' sizes (which vary with the RNG text), and Python's and numpy's global RNG states,
# which each rank saves for resume but nothing in training draws from (they are seeded from the OS);
# the torch RNG states, which training does use, are in the hashed .safetensors files.
VOLATILE_JSON_KEYS = ("created_unix", "files", "python", "numpy")


def _stable_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable_json(v) for k, v in sorted(obj.items()) if k not in VOLATILE_JSON_KEYS}
    if isinstance(obj, list):
        return [_stable_json(v) for v in obj]
    return obj


def _normalised(value: str | None) -> str | None:
    """A recorded value with the volatile JSON keys dropped (hashes pass through unchanged)."""
    if value is None or not value.startswith(("{", "[")):
        return value
    return json.dumps(_stable_json(json.loads(value)), sort_keys=True)


def stable_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        rows.append(
            {
                k: v
                for k, v in sorted(row.items())
                if not k.startswith(VOLATILE_PREFIXES) and not any(s in k for s in VOLATILE_SUBSTRINGS)
            }
        )
    return rows


def stable_driver_state(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text())
    return {k: v for k, v in sorted(state.items()) if not any(s in k for s in ("time", "seconds", "wall"))}


def checkpoint_hashes(ckpt_root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in sorted(p for p in ckpt_root.rglob("*") if p.is_file()):
        rel = str(f.relative_to(ckpt_root))
        if f.name in VOLATILE_FILES:
            out[rel] = json.dumps(stable_driver_state(f), sort_keys=True)
        elif f.suffix == ".json" and f.stat().st_size < 100_000:
            out[rel] = json.dumps(_stable_json(json.loads(f.read_text())), sort_keys=True)  # readable when it differs
        else:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run(overrides: list[str], work: Path) -> dict[str, Any]:
    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as fh:
        for i in range(32):
            fh.write(json.dumps({"prompt": f"Write a number near {i}.", "answer": str(i)}) + "\n")
    out = work / "run"
    cmd = [
        sys.executable,
        "-m",
        "rlsys.train",
        f"run.output_dir={out}",
        f"hydra.run.dir={work / 'hydra'}",
        *JOB,
        f"data.path={prompts}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-6000:])
        raise SystemExit(f"the run failed with exit code {res.returncode}: {' '.join(cmd)}")
    return {
        "command": cmd[1:],
        "metrics": stable_metrics(out / "metrics.jsonl"),
        "checkpoints": checkpoint_hashes(out / "checkpoints"),
    }


def diff(a: dict[str, Any], b: dict[str, Any], ignore_keys: tuple[str, ...]) -> list[str]:
    problems = []
    ma, mb = a["metrics"], b["metrics"]
    if len(ma) != len(mb):
        problems.append(f"metrics: {len(ma)} rows vs {len(mb)}")
    for i, (ra, rb) in enumerate(zip(ma, mb)):
        for k in sorted(set(ra) | set(rb)):
            if k.startswith(ignore_keys):
                continue
            if ra.get(k, "<missing>") != rb.get(k, "<missing>"):
                problems.append(f"metrics row {i} {k}: {ra.get(k, '<missing>')!r} vs {rb.get(k, '<missing>')!r}")
    ca = {k: _normalised(v) for k, v in a["checkpoints"].items()}
    cb = {k: _normalised(v) for k, v in b["checkpoints"].items()}
    for f in sorted(set(ca) | set(cb)):
        if ca.get(f) != cb.get(f):
            problems.append(f"checkpoint file {f}: {_differing(ca.get(f), cb.get(f))}")
    return problems


def _differing(a: str | None, b: str | None) -> str:
    """The first differing region of two recorded values (JSON text or hashes)."""
    if a is None or b is None:
        return f"{str(a)[:80]} vs {str(b)[:80]}"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 60)
    return f"...{a[lo : i + 60]}... vs ...{b[lo : i + 60]}..."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where to write this run's fingerprint (JSON)")
    p.add_argument("--compare", type=Path, help="a fingerprint to compare with")
    p.add_argument("--ignore", nargs="*", default=[], help="metric key prefixes allowed to differ (e.g. train/kl)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = p.parse_args(argv)
    # A fixed work directory: paths recorded in the checkpoint (model path, run dir) are then equal.
    work = Path(tempfile.gettempdir()) / "rlsys-fingerprint-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        fp = run(args.overrides, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {len(fp['metrics'])} metric rows, {len(fp['checkpoints'])} checkpoint files")
    if args.compare:
        problems = diff(json.loads(args.compare.read_text()), fp, tuple(args.ignore))
        for line in problems:
            print("DIFFERS:", line)
        print("identical" if not problems else f"{len(problems)} differences")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
