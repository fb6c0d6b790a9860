#!/usr/bin/env python
"""Weight-sync speed per transport, against a memcpy and the raw broadcast bandwidth, in one run (issue 13, item 7).

For each model: one DeepSpeed learner (ZeRO-2, a Ray actor) and one vLLM (CPU) rollout engine started
with the torchdist backend, on a local Ray cluster. The learner starts from a perturbed copy of the
model's weights, so each push really changes the engine. Per transport, ``--repeats`` pushes, timed
from the driver like the loop's sync phase (without the probe check, timed separately):

* **object_store**: rank 0 ``ray.put``s buckets, the engine pulls them into one ``reload_weights``;
* **torchdist**: learner rank 0 broadcasts packed buckets over a stateless gloo group into vLLM's
  start/update/finish protocol; the engine reports its receive, ``load_weights`` and finalize time.

References measured in the same run on the same bytes: a ``memcpy`` (``torch.Tensor.copy_``) and a
raw 2-process gloo broadcast in the same pieces (the transport's ceiling on this host). Prints a
table of medians and ratios; ``--out`` writes JSON. No assertions: numbers, not a test.

    python scripts/bench_sync.py --models tiny,100m,smollm2 --repeats 5 --out reports/bench/sync.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def model_path(name: str) -> str:
    from rlsys.models import ensure_tiny_model
    from rlsys.models.smollm2 import ensure_smollm2

    return str(ensure_smollm2() if name == "smollm2" else ensure_tiny_model(name))


def perturbed_copy(src: str, dest: Path, dtype: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.01 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    shutil.copytree(src, dest)
    model.save_pretrained(dest)
    return str(dest)


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _raw_rank(addr, rank, nbytes, piece, repeats, queue):
    import torch

    from rlsys.workers.torchdist import init_group

    group = init_group(addr, rank, "gloo", 60.0)
    buf = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for a in range(0, nbytes, piece):
            group.broadcast(buf[a : a + piece], 0).wait()
        times.append(time.perf_counter() - t0)
    queue.put(statistics.median(times[1:]))
    group.shutdown()


def raw_broadcast_seconds(nbytes: int, piece: int, repeats: int = 3) -> float:
    """Median seconds of a bare 2-process gloo broadcast of ``nbytes`` in ``piece``-byte pieces."""
    from rlsys.workers.torchdist import GroupAddress

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    addr = GroupAddress("127.0.0.1", port, 2, "raw")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_raw_rank, args=(addr, r, nbytes, piece, repeats, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = max(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
    return out


def bench_model(name: str, args, tmp: Path) -> dict:

    from rlsys.cluster import actor_options
    from rlsys.workers.learner import LearnerGroup, LearnerSpec
    from rlsys.workers.rollout import RolloutPool, RolloutSpec
    from rlsys.workers.weight_path import ObjectStorePath, TorchDistPath

    base = model_path(name)
    start = perturbed_copy(base, tmp / f"{name}-perturbed", args.dtype)
    t0 = time.perf_counter()
    learners = LearnerGroup(
        LearnerSpec(model_path=start, zero_stage=2, dtype=args.dtype), 1, actor_options(1), init_dir=str(tmp)
    )
    pool = RolloutPool(
        RolloutSpec(model_path=base, dtype=args.dtype, max_tokens=8, transport="torchdist", max_model_len=512),
        1,
        num_cpus=1,
        timeout_s=600,
        ready_timeout_s=600,
    )
    print(f"[{name}] actors up in {time.perf_counter() - t0:.1f} s", flush=True)
    # Each transport's own default bucket (rlsys.config.sync_bucket_bytes) unless --bucket-mb is given.
    buckets = {t: (args.bucket_mb or (256 if t == "object_store" else 32)) << 20 for t in ("object_store", "torchdist")}
    piece = args.piece_mb << 20
    result: dict = {"model": name, "dtype": args.dtype}
    try:
        torchdist = TorchDistPath(
            learners, pool, backend="gloo", bucket_bytes=buckets["torchdist"], piece_bytes=piece, timeout_s=600
        )
        paths: dict[str, Any] = {
            "object_store": ObjectStorePath(learners, pool, buckets["object_store"]),
            "torchdist": torchdist,
        }
        torchdist.start()
        nbytes = sum(m.nbytes for m in torchdist.meta)
        result["nbytes"] = nbytes
        result["tensors"] = len(torchdist.meta)
        version = 0
        for transport in args.transports:
            path = paths[transport]
            if transport == "object_store":
                pool.set_weight_feed(None)
            else:
                pool.set_weight_feed(torchdist)
            rows = []
            for _ in range(args.repeats + 1):  # the first push warms up and is not counted
                version += 1
                t0 = time.perf_counter()
                report = path.push(version)
                rows.append((time.perf_counter() - t0, report))
            secs = [s for s, _ in rows[1:]]
            entry: dict = {"seconds": statistics.median(secs), "all_seconds": secs}
            if transport == "torchdist":
                eng = [r.engines[0][0] for _, r in rows[1:]]
                entry["send_seconds"] = statistics.median(r.send_seconds for _, r in rows[1:])
                entry["send_wait_seconds"] = statistics.median(r.send_wait_seconds for _, r in rows[1:])
                for key in ("receive_s", "load_s", "wait_s", "finalize_s"):
                    entry[key] = statistics.median(e[key] for e in eng)
            result[transport] = entry
            print(f"[{name}] {transport}: {entry['seconds']:.3f} s per sync (median of {args.repeats})", flush=True)
        # The loop's probe check, for the phase's share.
        from rlsys.workers.batching import build_train_batch

        probe = list(range(10, 74))
        pb = build_train_batch(
            [probe[:1]], [probe[1:]], [np.zeros(len(probe) - 1, np.float32)], [0.0], pad_token_id=0, loss_normalizer=1.0
        )
        for _ in range(2):  # the first call warms the learner's forward up; the loop's checks are warm
            t0 = time.perf_counter()
            ref = np.asarray(learners.compute_logprobs(pb))[0, 1:]
            diff = float(np.abs(pool.sequence_logprobs(probe)[0] - ref).mean())
            result["probe_check_seconds"] = time.perf_counter() - t0
        result["probe_diff"] = diff
    finally:
        pool.shutdown()
        learners.shutdown()
    time.sleep(5)  # the references want a quiet machine: let the actors' processes exit
    result["memcpy_seconds"] = memcpy_seconds(nbytes)
    result["raw_gloo_seconds"] = raw_broadcast_seconds(nbytes, piece)
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| model | MB | transport | sync s | x memcpy | x raw gloo | send s (waiting) | receive s "
        "| of which waiting s | of which load_weights s | finalize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mb = r["nbytes"] / 1e6
        for transport in ("object_store", "torchdist"):
            e = r.get(transport)
            if e is None:
                continue
            extra = (
                f"{e['send_seconds']:.3f} ({e['send_wait_seconds']:.3f}) | {e['receive_s']:.3f} | {e['wait_s']:.3f} "
                f"| {e['load_s']:.3f} | {e['finalize_s']:.3f}"
                if transport == "torchdist"
                else "- | - | - | - | -"
            )
            lines.append(
                f"| {r['model']} | {mb:.1f} | {transport} | {e['seconds']:.3f} "
                f"| {e['seconds'] / r['memcpy_seconds']:.0f} | {e['seconds'] / r['raw_gloo_seconds']:.1f} | {extra} |"
            )
        if "object_store" in r and "torchdist" in r:
            lines.append(
                f"| {r['model']} | | torchdist speed-up "
                f"| {r['object_store']['seconds'] / r['torchdist']['seconds']:.1f}x "
                f"| memcpy {r['memcpy_seconds'] * 1e3:.1f} ms | raw gloo {r['raw_gloo_seconds'] * 1e3:.0f} ms "
                f"| probe check {r['probe_check_seconds']:.2f} s | | | | |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,100m,smollm2")
    ap.add_argument("--transports", default="object_store,torchdist")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--bucket-mb", type=int, default=None, help="default: each transport's own (256 / 32)")
    ap.add_argument("--piece-mb", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.transports = args.transports.split(",")

    from rlsys.cluster import connect, loopback_env
    from rlsys.hardware import native_bf16, probe

    hw = probe("cpu")
    cpu = {"torch_cpu_capability": hw.torch_cpu_capability, "native_bf16": native_bf16(hw)[1]}
    print(f"cpu: {cpu}", flush=True)

    loopback_env()
    connect(None, num_cpus=2)
    results = []
    with tempfile.TemporaryDirectory(prefix="rlsys-bench-sync-") as tmp:
        for name in args.models.split(","):
            results.append(bench_model(name, args, Path(tmp)))
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu, "args": vars(args), "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
