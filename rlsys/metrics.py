"""Metrics: one JSON line per step in ``metrics.jsonl`` and the same dict to W&B.

Keys are namespaced (``reward/``, ``algo/``, ``train/``, ``rollout/``, ``sync/``, ``time/``,
``eval/``); docs/metrics.md is the glossary. Secrets never reach this file: only numbers do.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

log = logging.getLogger("rlsys.metrics")


UPDATES_FILE = "updates.jsonl"  # one row per optimizer step when a rollout batch takes several


class MetricsLogger:
    """Append-only metrics sink. ``log(step, metrics)`` writes one line and forwards to W&B."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        wandb_mode: str = "offline",
        project: str = "rlsys",
        entity: str | None = None,
        run_name: str | None = None,
        config: dict | None = None,
        run_id: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the logger's lifetime, see close()
        self._wandb = None
        self.run_id = run_id
        if wandb_mode != "disabled":
            import wandb

            # W&B writes its offline run under output_dir/wandb; `wandb sync` uploads it later.
            self._wandb = wandb.init(
                project=project,
                entity=entity,
                name=run_name,
                # rlsys.config validated it against choices.WANDB_MODES; wandb's stub wants the literal type.
                mode=cast(Literal["offline", "online", "disabled"], wandb_mode),
                dir=str(self.dir),
                config=config or {},
                group=group,
                tags=list(tags) if tags else None,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
            )
            self.run_id = self._wandb.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            if isinstance(v, bool):
                v = int(v)
            if isinstance(v, (int, float)):
                # JSON has no NaN/inf: keep them visible as strings rather than dropping them.
                row[k] = v if math.isfinite(v) else str(v)
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(step))

    def log_updates(self, step: int, rows: list[dict[str, Any]]) -> None:
        """``updates.jsonl``: one row per optimizer step of ``step`` (PPO mini-batches and epochs), so the
        clip fraction and ratio extremes of each update can be read; nothing when the step took one."""
        if len(rows) < 2:
            return
        with open(self.dir / UPDATES_FILE, "a", encoding="utf-8") as fh:
            for k, r in enumerate(rows):
                row = {"step": int(step), "update": k, **r}
                fh.write(
                    json.dumps(
                        {
                            key: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                            for key, v in row.items()
                        },
                        sort_keys=True,
                    )
                    + "\n"
                )

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Decoded samples etc. go to W&B as a table (and nowhere else: the log prints them)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=list(columns), data=rows)}, step=int(step))

    def log_histograms(self, step: int, values: Mapping[str, tuple[Sequence[float], int]]) -> None:
        """Per-step distributions as W&B histograms, ``{key: (values, bins)}`` over [0, 1] (the B
        groups' success rates, their focal weights). W&B only: metrics.jsonl keeps their summaries."""
        if self._wandb is None:
            return
        import numpy as np
        import wandb

        self._wandb.log(
            {
                key: wandb.Histogram(
                    np_histogram=np.histogram(np.asarray(v, dtype=np.float64), bins=bins, range=(0.0, 1.0))
                )
                for key, (v, bins) in values.items()
            },
            step=int(step),
        )

    def log_pass_at_k(self, label: str, step: int, pass_at_k: Mapping[int, float]) -> None:
        """One evaluation's pass@k as a W&B table (``eval/pass_at_k_<label>``: k, log2 k, pass@k) and a
        native W&B line plot of pass@k against log2 k (``eval/pass_at_k_plot_<label>``; W&B's line
        plot has no log axis, so the x column is log2 k)."""
        if self._wandb is None:
            return
        import wandb

        rows = [[int(k), math.log2(k), float(v)] for k, v in sorted(pass_at_k.items())]
        table = wandb.Table(columns=["k", "log2_k", "pass@k"], data=rows)
        plot = wandb.plot.line(
            table, "log2_k", "pass@k", title=f"held-out pass@k against log2 k ({label}, step {step})"
        )
        self._wandb.log({f"eval/pass_at_k_{label}": table, f"eval/pass_at_k_plot_{label}": plot}, step=int(step))

    def log_image(self, key: str, path: str, step: int | None = None) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(path)}, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
