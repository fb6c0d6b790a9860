#!/usr/bin/env python
"""The learner's train phase against the bare-PyTorch limit, measured in one run (issue 10, item 3).

The default job's batch: the SFT warm start of the tiny model, B=32 prompts x G=8 = 256 rows,
32 response tokens each, one optimizer step per batch, the resolved ``model.dtype``.

* **bare**: one process, plain transformers forward (full logits) + log-softmax gather + backward +
  AdamW step, ``torch.set_num_threads(T)``; "bare + pi_old" adds the separate no-grad forward a
  trainer without the fused pi_old would run.
* **rlsys**: ``LearnerGroup.train_step`` (DeepSpeed ZeRO-2 in Ray actors, chunked log-prob head),
  timed from the driver like the loop's train phase (batch sharding included), in the layouts:
  1 rank x T threads, 2 ranks x T/2 threads (the default SFT / ``learner.num_workers=2`` layout),
  1 rank x 1 thread (the layout before threads followed the machine), each with pi_old fused (now)
  and with the separate pi_old pass (before).

Prints medians over ``--steps`` timed steps (after ``--warmup``) and the ratios to the bare step on
the same threads; writes JSON with ``--out``. No assertions: numbers, not a test.

    python scripts/bench_learner.py --steps 10 --out reports/bench/learner.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _batch(tokenizer, b: int, g: int, t: int, seed: int):
    """B countdown prompts x G rows, each with T random response tokens and random advantages."""
    import dataclasses

    from rlsys.data import PromptFormat, encode_prompt
    from rlsys.tasks import get_task
    from rlsys.workers.batching import build_train_batch, loss_normalizer_for

    rng = np.random.default_rng(seed)
    rows = get_task("countdown").generate("train", b, seed=seed)
    prompts, responses, lps, advs = [], [], [], []
    for r in rows:
        p = encode_prompt(tokenizer, r, PromptFormat())
        adv = rng.standard_normal(g)
        for j in range(g):
            prompts.append(p)
            responses.append(rng.integers(3, len(tokenizer), t).tolist())
            lps.append((-rng.random(t) * 3).astype(np.float32))
            advs.append(float(adv[j]))
    batch = build_train_batch(prompts, responses, lps, advs, pad_token_id=tokenizer.pad_token_id, loss_normalizer=1.0)
    return dataclasses.replace(batch, loss_normalizer=loss_normalizer_for("token_mean", batch.response_mask))


def bare_step_seconds(model_path: str, dtype: str, batch, threads: int, steps: int, warmup: int, pi_old: bool) -> float:
    """Median seconds of a plain PyTorch policy-gradient step on ``batch`` (optionally + pi_old)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.tensor(batch.input_ids)
    attn = torch.tensor(batch.attention_mask)
    mask = torch.tensor(batch.response_mask)[:, 1:]
    adv = torch.tensor(batch.advantages)[:, None]
    targets = ids[:, 1:]

    def logprobs():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]

    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        if pi_old:
            with torch.no_grad():
                old = logprobs()
        lp = logprobs()
        old_t = old if pi_old else lp.detach()
        loss = -(torch.exp(lp - old_t) * adv * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rlsys_step_seconds(
    cfg, model_path: str, batch, pad_id: int, ranks: int, threads: int, steps: int, warmup: int, separate_pi_old: bool
) -> float:
    """Median seconds of the driver's train phase (shard + LearnerGroup.train_step)."""
    import dataclasses

    import ray

    from rlsys.cluster import actor_options
    from rlsys.driver import learner_spec
    from rlsys.workers.learner import LearnerGroup

    spec = dataclasses.replace(learner_spec(cfg, model_path), lr=1e-6, warmup_steps=0)
    group = LearnerGroup(spec, ranks, actor_options(cfg.learner.num_cpus_per_worker, num_threads=threads))
    try:
        times = []
        for k in range(warmup + steps):
            t0 = time.perf_counter()
            parts = group.shard(batch, pad_id)
            if separate_pi_old:  # what train_step did by itself before pi_old was fused
                olds = ray.get([a.compute_logprobs.remote(p) for a, p in zip(group.actors, parts)])
                parts = [dataclasses.replace(p, old_logprobs=o) for p, o in zip(parts, olds)]
            group.train_step(parts)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
        info = group.ready_info
    finally:
        group.shutdown()
    assert all(i["threads"] == threads for i in info), info
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto", help="model.dtype (auto resolves for this machine)")
    ap.add_argument(
        "--model",
        default=None,
        help="a model directory (default: the SFT warm start, built if "
        "missing; any checkpoint of the same shape times the same)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import dataclasses

    from rlsys import cluster
    from rlsys.config import RLConfig, resolve
    from rlsys.driver import policy_model_path

    cluster.loopback_env()
    cfg = RLConfig()
    cfg = resolve(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=args.dtype)))
    cores = cluster.machine_cores()
    model_path = args.model or policy_model_path(cfg)  # the SFT warm start (cached after the first run)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    batch = _batch(tok, args.prompts, args.group_size, args.tokens, seed=0)
    print(
        f"machine: {cores} cores, torch capability {_capability()}, dtype {cfg.model.dtype} "
        f"({cfg.model.dtype_reason}); batch {batch.num_rows} rows x {batch.input_ids.shape[1]} tokens",
        flush=True,
    )

    res: dict = {
        "cores": cores,
        "dtype": cfg.model.dtype,
        "dtype_reason": cfg.model.dtype_reason,
        "rows": batch.num_rows,
        "width": int(batch.input_ids.shape[1]),
        "bare": {},
        "rlsys": {},
    }
    thread_counts = sorted({cores, 1})
    for th in thread_counts:
        for po in (False, True):
            s = bare_step_seconds(model_path, cfg.model.dtype, batch, th, args.steps, args.warmup, po)
            res["bare"][f"{th}t{'+pi_old' if po else ''}"] = s
            print(f"bare torch, {th} thread(s){' + pi_old pass' if po else ''}: {s:.3f} s/step", flush=True)

    layouts = [(1, cores), (2, max(1, cores // 2)), (1, 1)] if cores >= 2 else [(1, 1)]
    with cluster.session(None, cores, "rlsys-bench"):
        for ranks, th in layouts:
            for sep in (False, True):
                s = rlsys_step_seconds(
                    cfg, model_path, batch, tok.pad_token_id, ranks, th, args.steps, args.warmup, sep
                )
                key = f"{ranks}x{th}t{'+pi_old' if sep else ''}"
                res["rlsys"][key] = s
                print(
                    f"rlsys, {ranks} rank(s) x {th} thread(s), pi_old {'separate' if sep else 'fused'}: {s:.3f} s/step",
                    flush=True,
                )

    print("\nratio to the bare step on the same total threads (goal <= 1.10):")
    for key, s in res["rlsys"].items():
        ranks, th = key.split("+")[0].split("x")
        total = int(ranks) * int(th.rstrip("t"))
        ref_key = f"{total}t{'+pi_old' if '+pi_old' in key else ''}"
        ref = res["bare"].get(ref_key)
        if ref:
            res.setdefault("ratio", {})[key] = s / ref
            print(f"  rlsys {key:<14s} {s:6.3f} s  /  bare {ref_key:<10s} {ref:6.3f} s  = {s / ref:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
