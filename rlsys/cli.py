"""The Hydra plumbing shared by rlsys's four entry points: ``python -m rlsys.train | eval | sft | difficulty``.

Each entry module is only its job function and how to report the result::

    main = hydra_entry("rlsys.eval", run_eval, format_report, phase="eval")

:func:`hydra_entry` composes ``conf/config.yaml`` over the schema (:mod:`rlsys.config`), sets up
logging, runs the job inside :func:`rlsys.signals.stop_on_signals` (SIGINT / SIGTERM stop it within
seconds and exit 130 / 143), turns a :class:`~rlsys.config.ConfigError` into one ``rlsys: ...`` line
and exit code 2, and prints the report.

The config directory is the repository's top-level ``conf/`` (shipped in the working dir under
``ray job submit``); RLSYS_CONF_DIR points elsewhere.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

CONF_DIR = os.environ.get("RLSYS_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))

#: The commands: name -> (entry module, what it does). Console scripts ``rlsys-<name>`` (pyproject.toml),
#: ``python -m rlsys.<name>``, and ``rlsys <name>`` (rlsys/__main__.py) all run the module's ``main``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rlsys.train", "RL post-training (F-GRPO by default; algo= picks GRPO, DAPO, CISPO, RLOO, MaxRL)"),
    "eval": ("rlsys.eval", "held-out pass@k of a model or checkpoint (model.path=...)"),
    "sft": ("rlsys.sft", "the SFT warm start of the built-in tiny model (cached; rlsys-train runs it)"),
    "difficulty": ("rlsys.difficulty", "per-prompt pass rates from K samples, and a hardest / easiest selection"),
}


def usage(app: str) -> str:
    """The lines ``--help`` prints above Hydra's list of config groups and keys."""
    name = app.rsplit(".", 1)[-1]
    what = COMMANDS[name][1] if name in COMMANDS else ""
    return "\n".join(
        [
            f"usage: rlsys-{name} [group=option ...] [key=value ...]   (or: python -m {app})",
            "",
            f"{what[:1].upper()}{what[1:]}.",
            "Config groups pick YAML files under conf/; keys override one value. Every key, its default",
            "and its meaning: docs/config.md. Other commands: rlsys --help.",
            "",
        ]
    )


T = TypeVar("T")


def setup_logging() -> None:
    """One readable line per event on stderr, written at once; quiet the chattiest libraries.

    stdout and stderr become line-buffered so that lines (ours, and the Ray actors' output that
    the driver prints with log_to_driver) reach a pipe or a file as they happen, not in 8 KiB blocks.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # replaced by a non-TextIOWrapper, or closed
            pass
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    for noisy in ("vllm", "ray", "deepspeed", "urllib3", "filelock", "httpx", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # RLSYS_DEBUG=name,...: DEBUG for those loggers (rlsys.signals logs each phase the job enters).
    for name in filter(None, (n.strip() for n in os.environ.get("RLSYS_DEBUG", "").split(","))):
        logging.getLogger(name).setLevel(logging.DEBUG)


def stop_on_signals(app: str) -> Any:
    """``with stop_on_signals("rlsys.train") as status:`` -- the context every entry point runs its
    work in: SIGINT / SIGTERM stop it within seconds, with one line naming the last checkpoint and
    the resume command, and exit 130 / 143 (rlsys.signals). ``status`` is for the run to fill in."""
    from rlsys import signals

    return signals.stop_on_signals(app)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print ``rlsys: <msg>`` on stderr and exit with ``code`` (2: a usage / config error)."""
    print(f"rlsys: {msg}", file=sys.stderr)
    raise SystemExit(code)


def hydra_entry(
    app: str,
    run: Callable[[Any], T],
    report: Callable[[T], str | None],
    *,
    phase: str | None = None,
    resumable: bool = False,
) -> Callable[[], None]:
    """The console main of ``python -m <app>``: compose the config, run ``run(cfg)``, print ``report(result)``.

    ``app``: the module name (``"rlsys.train"``), used in the stop line and as Hydra's job name.
    ``run``: the job, given the typed, resolved :class:`~rlsys.config.RLConfig`; a ConfigError it (or
    the composition) raises becomes ``rlsys: <message>`` and exit code 2. ``report``: the text printed
    on stdout after the job (None: nothing). ``phase``: the phase the stop line names until the job
    sets its own. ``resumable``: the stop line also gives the command that resumes the run (jobs with
    checkpoints under ``run.output_dir``).
    """

    def main() -> None:
        if any(a in ("--help", "-h") for a in sys.argv[1:]):
            print(usage(app))  # then Hydra's own: the config groups and the composed config
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import DictConfig

        from rlsys.config import ConfigError, register_configs, sweep_labels, to_dataclass

        register_configs()

        def task(dcfg: DictConfig) -> None:
            setup_logging()
            with stop_on_signals(app) as status:
                if phase is not None:
                    status.phase = phase
                try:
                    cfg = to_dataclass(dcfg)
                    hydra_cfg = HydraConfig.get()
                    if hydra_cfg.mode == RunMode.MULTIRUN:  # a sweep's job: group and label it for W&B
                        cfg = sweep_labels(cfg, hydra_cfg.sweep.dir, list(hydra_cfg.overrides.task))
                    if resumable:
                        from rlsys.signals import rerun_command

                        status.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))
                        status.command = rerun_command(app, sys.argv[1:], status.output_dir)
                    result = run(cfg)
                except ConfigError as e:
                    fail(str(e))
            text = report(result)
            if text is not None:
                print(text)

        # Hydra names the job after the module defining the task function: keep the entry module's name
        # (train, eval, ...) rather than "cli".
        task.__module__ = app
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(task)()

    return main


__all__ = ["COMMANDS", "CONF_DIR", "setup_logging", "stop_on_signals", "fail", "hydra_entry", "usage"]
