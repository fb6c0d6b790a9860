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
from rlsys.hydra_app import CONF_DIR, fail, setup_logging

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(dcfg: DictConfig) -> None:
    setup_logging()
    from rlsys.driver import train

    try:
        cfg = to_dataclass(dcfg)
        summary = train(cfg)
    except ConfigError as e:
        fail(str(e))
    print(f"\nrlsys: done. {summary.steps} steps; train reward {summary.first_reward:.3f} -> "
          f"{summary.last_reward:.3f}\n  metrics:    {summary.metrics_path}\n  checkpoint: {summary.checkpoint}")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
