"""rlsys.cli: the four entry points share one Hydra main (config error -> one line and exit 2, the job
name Hydra records stays the entry module's), and tokenizers load as model.* says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "app, override, message",
    [
        ("train", "trainer.total_steps=0", "invalid config trainer.total_steps=0: must be > 0"),
        ("eval", "eval.max_tokens=0", "invalid config eval.max_tokens=0: must be >= 1"),
        ("sft", "sft.steps=0", "invalid config sft.steps=0: must be > 0"),
        ("difficulty", "difficulty.k=0", "invalid config difficulty.k=0: must be > 0"),
    ],
)
def test_a_config_error_is_one_line_and_exit_code_2(tmp_path, app, override, message):
    out = subprocess.run(
        [sys.executable, "-m", f"rlsys.{app}", override, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"rlsys: {message}" in out.stderr
    hydra_yaml = (tmp_path / ".hydra" / "hydra.yaml").read_text()
    assert f"    name: {app}\n" in hydra_yaml  # Hydra's job name is the entry module's, not "cli"


def test_hydra_app_still_exports_the_plumbing():
    from rlsys import cli, hydra_app

    assert hydra_app.CONF_DIR == cli.CONF_DIR and hydra_app.setup_logging is cli.setup_logging


def test_tokenizers_load_with_model_trust_remote_code(monkeypatch):
    import dataclasses

    import transformers

    from rlsys.config import ModelConfig
    from rlsys.models import base_model_path, load_tokenizer

    seen = []
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: seen.append((path, kw)) or "tok"
    )
    assert load_tokenizer(dataclasses.replace(ModelConfig(), trust_remote_code=True), "/m") == "tok"
    assert load_tokenizer(ModelConfig(), "/n") == "tok"
    assert seen == [("/m", {"trust_remote_code": True}), ("/n", {"trust_remote_code": False})]
    assert base_model_path(dataclasses.replace(ModelConfig(), path="/ckpt")) == "/ckpt"


def test_rlsys_lists_every_command_and_refuses_an_unknown_one(capsys):
    from rlsys.__main__ import main
    from rlsys.cli import COMMANDS

    main([])
    out = capsys.readouterr().out
    assert out.startswith("usage: rlsys <command>")
    for name, (_, what) in COMMANDS.items():
        assert f"  {name}" in out and what in out
    with pytest.raises(SystemExit) as info:
        main(["trian"])
    assert info.value.code == 2
    assert "unknown command 'trian'; choose one of: train, eval, sft, difficulty" in capsys.readouterr().err


def test_every_command_is_a_console_script_that_resolves():
    import importlib
    import tomllib

    from rlsys.cli import COMMANDS

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"rlsys"} | {f"rlsys-{name}" for name in COMMANDS}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    for name, (module, _) in COMMANDS.items():
        assert scripts[f"rlsys-{name}"] == f"{module}:main"


@pytest.mark.parametrize("app", ["train", "eval", "sft", "difficulty"])
def test_help_shows_usage_config_groups_and_keys(app):
    """Through ``rlsys <app> --help`` (the same main as ``rlsys-<app>``): the usage line, then Hydra's
    config groups and the composed config with its defaults."""
    out = subprocess.run(
        [sys.executable, "-m", "rlsys", app, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.startswith(f"usage: rlsys-{app} [group=option ...] [key=value ...]")
    assert "docs/config.md" in text
    assert "== Configuration groups ==" in text and "is powered by Hydra" not in text
    assert "\nalgo: cispo, dapo, " in text and "f_grpo" in text and "\nmodel: hf, smollm2, tiny" in text
    assert "\ntrainer:\n  total_steps: 80\n" in text  # the composed config, defaults included
