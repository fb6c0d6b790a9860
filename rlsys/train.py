"""``python -m rlsys.train [overrides...]`` / ``rlsys-train``: one F-GRPO job on a Ray cluster.

Examples::

    python -m rlsys.train                                   # F-GRPO, tiny model, local Ray
    python -m rlsys.train algo=grpo trainer.total_steps=50
    python -m rlsys.train algo=f_dapo algo.gamma=1.0 rollout.num_workers=2 learner=zero3
    ray job submit --working-dir . -- python -m rlsys.train cluster=remote
"""

from __future__ import annotations

from typing import Any

from rlsys.cli import hydra_entry


def _train(cfg: Any) -> Any:
    from rlsys.driver import train  # the loop's imports (torch, numpy) only when a run starts

    return train(cfg)


def format_summary(s: Any) -> str:
    """The few lines a user reads at the end of a run."""
    lines = [
        f"\nrlsys: done. {s.steps} steps",
        f"  train reward (mean, first -> last step): {s.first_reward:.3f} -> {s.last_reward:.3f}",
    ]
    for k in sorted(s.eval_after):
        before = s.eval_before.get(k, float("nan"))
        lines.append(f"  held-out pass@{k:<4d} before -> after: {before:.3f} -> {s.eval_after[k]:.3f}")
    lines += [f"  metrics:    {s.metrics_path}", f"  checkpoint: {s.checkpoint}"]
    if s.eval_plot:
        lines.append(f"  pass@k plot: {s.eval_plot}")
    return "\n".join(lines)


# SIGINT / SIGTERM: stop within seconds, name the last checkpoint and the resume command, exit 130 / 143.
main = hydra_entry("rlsys.train", _train, format_summary, resumable=True)


if __name__ == "__main__":
    main()
