"""Run checkpoints on disk: atomic step directories, the driver's state, finding the newest one.

Layout of ``<run.output_dir>/checkpoints/step_NNNNNN/``::

    model.safetensors, config.json, tokenizer files   Hugging Face checkpoint (transformers, vLLM)
    learner_state/                                    optimizer + master weights + RNG, per rank
                                                      (safetensors + JSON; see LearnerGroup.save_state)
    driver_state.json                                 step, data cursor, weight version, W&B run id

A step directory is built under a hidden temporary name and renamed into place only when every
part is written, so a directory named ``step_*`` is always complete: a run killed while saving
leaves only a ``.step_*.tmp-*`` directory, which is never picked and is swept on the next save.
A run stopped by SIGINT / SIGTERM removes its temporary directory before it exits (rlsys.signals).
Nothing here unpickles: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlsys.fsutil import replace_dir, track_partial, untrack_partial
from rlsys.sampler import SamplerState

STATE_FILE = "driver_state.json"
LEARNER_STATE_DIR = "learner_state"
# The off-policy trainer modes: batches generated for steps after the checkpoint's, not yet trained on.
INFLIGHT_FILE = "inflight.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
log = logging.getLogger("rlsys.checkpoint")


@dataclass(frozen=True)
class DriverState:
    """What the driver needs, besides the learners' own state, to continue a run exactly."""

    step: int  # last completed step
    sampler: SamplerState  # prompt stream position
    weight_version: int
    wandb_run_id: str | None
    skipped_in_a_row: int
    first_reward: float  # train reward of step 1 (for the end-of-run summary)
    eval_before: dict[int, float]  # held-out pass@k of the starting policy
    format_version: int = FORMAT_VERSION
    dtype: str = ""  # the run's resolved compute dtype (model.dtype); "" in checkpoints from before it was kept

    def to_json(self) -> str:
        d = asdict(self)
        d["eval_before"] = {str(k): v for k, v in self.eval_before.items()}
        return json.dumps(d, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> DriverState:
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"driver state format {d.get('format_version')} is not {FORMAT_VERSION}; this "
                "checkpoint was written by another rlsys version"
            )
        d["sampler"] = SamplerState(**d["sampler"])
        d["eval_before"] = {int(k): float(v) for k, v in d["eval_before"].items()}
        return DriverState(**d)


def step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def begin(out_dir: str | os.PathLike, step: int) -> Path:
    """A fresh hidden temporary directory to build step ``step``'s checkpoint in (leftovers of a
    killed earlier save are removed first). A stop (rlsys.signals) before :func:`commit` removes it."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    sweep_partial(root.parent)
    tmp = root / f".step_{step:06d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    track_partial(tmp)
    log.debug("writing step %d into %s", step, tmp)
    return tmp


def commit(tmp: Path, state: DriverState, keep: int) -> Path:
    """Write the driver state last, rename ``tmp`` to ``step_NNNNNN`` and keep the newest ``keep``."""
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
        fh.write(state.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    final = tmp.parent / f"step_{state.step:06d}"
    replace_dir(tmp, final)  # re-saving a step after a resume replaces the older copy
    untrack_partial(tmp)
    _fsync_dir(tmp.parent)
    rotate(tmp.parent, keep)
    return final


def sweep_partial(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the hidden leftovers of interrupted saves (``.step_*.tmp-*``, ``.step_*.old-*``)
    under ``out_dir/checkpoints``; returns what was removed."""
    root = Path(out_dir) / "checkpoints"
    stale = sorted(root.glob(".step_*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftover temporary directories."""
    sweep_partial(root.parent)
    for old in complete_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories (renamed into place, with a driver state), oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(out_dir: str | os.PathLike) -> Path | None:
    ckpts = complete_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_driver_state(ckpt: Path) -> DriverState:
    return DriverState.from_json((ckpt / STATE_FILE).read_text(encoding="utf-8"))


def save_inflight(ckpt: Path, batches: dict[int, object]) -> None:
    """Keep the batches in flight at a checkpoint ({step: a frozen dataclass, e.g. the driver's
    StepGroups}) with it, as JSON (no pickle: loading a checkpoint runs no code). Dataclasses, numpy
    arrays, torch tensors, tuples, lists, dicts and scalars are encoded exactly (floats round-trip)."""
    doc = {"format_version": FORMAT_VERSION, "batches": {str(k): _encode(v) for k, v in batches.items()}}
    (ckpt / INFLIGHT_FILE).write_text(json.dumps(doc), encoding="utf-8")


def load_inflight(ckpt: Path, types: Sequence[type]) -> dict[int, Any]:
    """The batches :func:`save_inflight` kept ({} for a checkpoint without any). ``types``: the dataclasses
    the file may hold; any other class name in it is refused."""
    path = ckpt / INFLIGHT_FILE
    if not path.exists():
        return {}
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {doc.get('format_version')} is not {FORMAT_VERSION}")
    known = {f"{t.__module__}.{t.__qualname__}": t for t in types}
    return {int(k): _decode(v, known, path) for k, v in doc["batches"].items()}


def _encode(v: Any) -> Any:
    import dataclasses

    import numpy as np
    import torch

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        cls = type(v)
        fields = {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return {"__dc__": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    if isinstance(v, torch.Tensor):
        return {"__pt__": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "data": v.flatten().tolist()}
    if isinstance(v, np.ndarray):
        return {"__nd__": v.dtype.str, "shape": list(v.shape), "data": v.reshape(-1).tolist()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError(f"save_inflight: dict keys must be strings, got {sorted(map(type, v), key=str)}")
        return {"__dict__": {k: _encode(x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"save_inflight: cannot encode a {type(v).__name__}")


def _decode(v: Any, known: dict[str, type], path: Path) -> Any:
    import numpy as np
    import torch

    if isinstance(v, list):
        return [_decode(x, known, path) for x in v]
    if not isinstance(v, dict):
        return v
    if "__dc__" in v:
        cls = known.get(v["__dc__"])
        if cls is None:
            raise ValueError(f"{path}: holds a {v['__dc__']}, which is not a record a checkpoint may hold")
        return cls(**{k: _decode(x, known, path) for k, x in v["fields"].items()})
    if "__pt__" in v:
        return torch.tensor(v["data"], dtype=getattr(torch, v["__pt__"])).reshape(v["shape"])
    if "__nd__" in v:
        return np.asarray(v["data"], dtype=np.dtype(v["__nd__"])).reshape(v["shape"])
    if "__tuple__" in v:
        return tuple(_decode(x, known, path) for x in v["__tuple__"])
    if "__dict__" in v:
        return {k: _decode(x, known, path) for k, x in v["__dict__"].items()}
    raise ValueError(f"{path}: unknown entry {sorted(v)}")


def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Drop metrics rows of steps after ``last_step`` (written by the run that died after its last
    checkpoint), so a resumed run's rows line up with a straight run's. Returns rows dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    keep, dropped = [], 0
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            dropped += 1
            continue
        if row.get("step", 0) > last_step:
            dropped += 1
        else:
            keep.append(line)
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, p)
    return dropped


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
