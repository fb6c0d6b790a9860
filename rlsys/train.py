"""``python -m rlsys.train [overrides...]`` / ``rlsys-train``: one F-GRPO job on a Ray cluster.

Examples::

    python -m rlsys.train                                   # F-GRPO, tiny model, local Ray
    python -m rlsys.train algo=grpo trainer.total_steps=50
    python -m rlsys.train algo=f_dapo algo.gamma=1.0 rollout.num_workers=2 learner=zero3
    ray job submit --working-dir . -- python -m rlsys.train cluster=remote
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rlsys.config import ConfigError, register_configs, to_dataclass
from rlsys.hydra_app import CONF_DIR, fail, setup_logging, stop_on_signals

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(dcfg: DictConfig) -> None:
    setup_logging()
    # SIGINT / SIGTERM: stop within seconds, name the last checkpoint and the resume command, exit 130 / 143.
    with stop_on_signals("rlsys.train") as status:
        import os
        import sys

        from rlsys.driver import train
        from rlsys.signals import rerun_command

        try:
            cfg = to_dataclass(dcfg)
            status.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))
            status.command = rerun_command("rlsys.train", sys.argv[1:], status.output_dir)
            summary = train(cfg)
        except ConfigError as e:
            fail(str(e))
    print(format_summary(summary))


def format_summary(s) -> str:
    """The few lines a user reads at the end of a run."""
    lines = [f"\nrlsys: done. {s.steps} steps",
             f"  train reward (mean, first -> last step): {s.first_reward:.3f} -> {s.last_reward:.3f}"]
    for k in sorted(s.eval_after):
        before = s.eval_before.get(k, float("nan"))
        lines.append(f"  held-out pass@{k:<4d} before -> after: {before:.3f} -> {s.eval_after[k]:.3f}")
    lines += [f"  metrics:    {s.metrics_path}", f"  checkpoint: {s.checkpoint}"]
    if s.eval_plot:
        lines.append(f"  pass@k plot: {s.eval_plot}")
    return "\n".join(lines)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
