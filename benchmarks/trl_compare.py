#!/usr/bin/env python
"""rlsys against TRL's GRPOTrainer on the same job, in one sitting (issue 14, item 4).

The job: the default tiny job's policy (the SFT warm start of the built-in tiny Qwen2), the countdown
training prompts rlsys's default run takes in its first steps (the same prompts, rendered by the same
chat template), G = 8, 32 prompts per step, 32 new tokens, temperature 1, one optimizer step per
batch, no KL term, the same precision (``model.dtype`` as resolved here), the countdown verifier as
the reward.

* **TRL** runs in its own virtualenv (``benchmarks/.trl-venv``, made on first use: torch, transformers
  and TRL pinned below; TRL's vLLM extra stops below vllm 0.32, so it generates with transformers'
  ``generate``, its configuration that runs here). One process, every core; one
  ``GRPOTrainer.train`` of ``--steps`` steps; a callback times each optimizer step.
* **rlsys** runs ``python -m rlsys.train`` with the same settings in each ``--modes``, through
  ``scripts/bench_modes.py`` (its phase split per mode).

Both leave out step 1 (start-up effects) and report medians. Prints completions per second for each,
the ratio, rlsys's phase split per mode, and this machine's CPU kind; ``--out`` writes JSON.

    python benchmarks/trl_compare.py --steps 8 --out reports/bench/trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "benchmarks" / ".trl-venv"
# The TRL side's pins: the torch and transformers rlsys runs, TRL as its latest release here.
TRL_PINS = ["torch==2.13.0", "transformers==5.19.0", "trl==1.16.0", "accelerate", "datasets"]
B, G, T = 32, 8, 32


# ================================ the TRL side (runs in its own venv) ================================


def trl_worker(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))  # the countdown verifier only: pure Python, numpy
    from rlsys.tasks.countdown import verify

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])

    def countdown_reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(verify(t, a)) for t, a in zip(texts, answer)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter())

    bf16 = args.dtype == "bfloat16"
    cfg = GRPOConfig(
        output_dir=args.work,
        per_device_train_batch_size=B * G,  # one forward/backward over the whole batch ...
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # ... and one optimizer step per generated batch
        num_generations=G,
        max_completion_length=T,
        temperature=1.0,
        beta=0.0,
        learning_rate=1e-4,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=bf16,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(args.model)
    timer = Timer()
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=[countdown_reward],
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[timer],
    )
    if bf16:
        trainer.model.to(torch.bfloat16)
    trainer.train()
    steps = [b - a for a, b in zip(timer.t, timer.t[1:])]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    out = {
        "versions": {"trl": __import__("trl").__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "dtype": str(next(trainer.model.parameters()).dtype),
        "step_s": steps,
        "rewards": rewards,
    }
    Path(args.result).write_text(json.dumps(out))


# ================================ the rlsys side =====================================================


def job_inputs(work: Path, steps: int) -> tuple[str, str, Path]:
    """(policy path, resolved dtype, prompts JSONL): what rlsys's default run trains on in its first steps."""
    from rlsys.config import RLConfig, resolve
    from rlsys.data import load_train_rows
    from rlsys.driver import policy_model_path
    from rlsys.sampler import PromptSampler

    cfg = resolve(RLConfig())
    model = policy_model_path(cfg)
    rows = load_train_rows(cfg)
    sampler = PromptSampler(len(rows), seed=cfg.trainer.seed)
    path = work / "prompts.jsonl"
    with open(path, "w") as fh:
        for _ in range(steps):
            for i in sampler.take(B):
                r = rows[i]
                msgs = [{"role": role, "content": text} for role, text in r.messages]
                fh.write(json.dumps({"messages": msgs, "answer": r.answer}) + "\n")
    return model, cfg.model.dtype, path


def ensure_trl_venv() -> Path:
    py = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".pins"
    if py.exists() and stamp.exists() and stamp.read_text() == " ".join(TRL_PINS):
        return py
    print(f"creating {TRL_VENV} with {' '.join(TRL_PINS)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    stamp.write_text(" ".join(TRL_PINS))
    return py


def cpu_kind() -> str:
    with open("/proc/cpuinfo") as fh:
        flags = fh.read()
    kind = "AVX-512 with AVX512_BF16" if "avx512_bf16" in flags else "AVX2 only"
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        kind += " (emulating AVX2)"
    return f"{os.cpu_count()} cores, {kind}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="sync,one_step_off")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "prompts", "work", "result", "dtype"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    import tempfile

    print(f"CPU: {cpu_kind()}; {args.steps} steps each, B x G = {B} x {G}, {T} new tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="rlsys-trl-") as tmp:
        work = Path(tmp)
        model, dtype, prompts = job_inputs(work, args.steps)
        py = ensure_trl_venv()
        result = work / "trl.json"
        t0 = time.perf_counter()
        cmd = [str(py), __file__, "--trl-worker", "--steps", str(args.steps), "--model", model, "--prompts"]
        cmd += [str(prompts), "--work", str(work / "trl"), "--result", str(result), "--dtype", dtype]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
        if res.returncode != 0:
            sys.exit(f"TRL failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
        trl = json.loads(result.read_text())
        print(f"  TRL: {args.steps} steps in {time.perf_counter() - t0:.0f} s (with start-up)", flush=True)
        modes_json = work / "modes.json"
        bench = [sys.executable, str(ROOT / "scripts" / "bench_modes.py"), "--steps", str(args.steps)]
        subprocess.run([*bench, "--modes", args.modes, "--out", str(modes_json)], check=True, cwd=ROOT)
        rlsys = json.loads(modes_json.read_text())["results"]

    trl_step = statistics.median(trl["step_s"][1:])
    trl_cps = B * G / trl_step
    print(
        f"\nTRL {trl['versions']['trl']} GRPOTrainer (transformers generate, {trl['dtype']}, {trl['threads']} threads):"
    )
    print(
        f"  step {trl_step:.2f} s, {trl_cps:.1f} completions/s, mean reward {statistics.mean(trl['rewards'][1:]):.3f}"
    )
    print("\n| trainer | step s | completions/s | vs TRL |\n|---|---|---|---|")
    print(f"| TRL GRPOTrainer | {trl_step:.2f} | {trl_cps:.1f} | 1.00x |")
    for mode, s in rlsys.items():
        cps = s["completions_per_s"]
        print(f"| rlsys {mode} | {s['step_s']:.2f} | {cps:.1f} | {cps / trl_cps:.2f}x |")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"cpu": cpu_kind(), "steps": args.steps, "dtype": dtype, "trl": trl, "rlsys": rlsys}, indent=1)
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
