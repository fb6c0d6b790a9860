"""Read an offline W&B run file (``run-<id>.wandb``) back, for tests that check what a job sent W&B.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log blocks
of 32 KiB, each record a protobuf ``wandb_internal_pb2.Record`` split into FULL / FIRST / MIDDLE /
LAST chunks behind a 7-byte chunk header (crc32, length, type). wandb 0.31 ships no Python reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    """Every record of the run file, parsed, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            whole = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            whole = pending + chunk
        record = pb.Record()
        record.ParseFromString(whole)
        out.append(record)
    return out


def history(path: str | Path) -> list[dict[str, Any]]:
    """Each history row (one per logged step) as ``{"a/b": value}``, nested keys joined by "/"."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_config(path: str | Path) -> dict[str, Any]:
    """The run config the job gave ``wandb.init`` (top-level keys -> values)."""
    config: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for u in items:
            if u.key and not u.key.startswith("_"):
                config[u.key] = json.loads(u.value_json)
    return config


def run_file(run_dir: str | Path) -> Path:
    """The one offline run file under a job's output directory."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}, found {files}"
    return files[0]


def run_info(path: str | Path) -> dict[str, Any]:
    """The run's name, group and tags as the job gave them to ``wandb.init``."""
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return {"name": r.run.display_name, "group": r.run.run_group, "tags": list(r.run.tags)}
    raise AssertionError(f"{path}: no run record")
