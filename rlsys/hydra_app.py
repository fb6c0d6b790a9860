"""Kept for scripts written against it (scripts/study_fgrpo.py): the Hydra plumbing is :mod:`rlsys.cli`."""

from __future__ import annotations

from rlsys.cli import CONF_DIR, fail, setup_logging, stop_on_signals

__all__ = ["CONF_DIR", "fail", "setup_logging", "stop_on_signals"]
