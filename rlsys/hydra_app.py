"""Shared plumbing for rlsys's Hydra apps (train, eval, sft, difficulty).

The config directory is the repository's top-level ``conf/`` (shipped in the working dir under
``ray job submit``); RLSYS_CONF_DIR points elsewhere.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CONF_DIR = os.environ.get("RLSYS_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


def setup_logging() -> None:
    """One readable line per event on stderr, written at once; quiet the chattiest libraries.

    stdout and stderr become line-buffered so that lines (ours, and the Ray actors' output that
    the driver prints with log_to_driver) reach a pipe or a file as they happen, not in 8 KiB blocks.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError, OSError):  # replaced by a non-TextIOWrapper, or closed
            pass
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("vllm", "ray", "deepspeed", "urllib3", "filelock", "httpx", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # RLSYS_DEBUG=name,...: DEBUG for those loggers (rlsys.signals logs each phase the job enters).
    for name in filter(None, (n.strip() for n in os.environ.get("RLSYS_DEBUG", "").split(","))):
        logging.getLogger(name).setLevel(logging.DEBUG)


def stop_on_signals(app: str):
    """``with stop_on_signals("rlsys.train") as status:`` -- the context every entry point runs its
    work in: SIGINT / SIGTERM stop it within seconds, with one line naming the last checkpoint and
    the resume command, and exit 130 / 143 (rlsys.signals). ``status`` is for the run to fill in."""
    from rlsys import signals

    return signals.stop_on_signals(app)


def fail(msg: str, code: int = 2) -> None:
    print(f"rlsys: {msg}", file=sys.stderr)
    raise SystemExit(code)
