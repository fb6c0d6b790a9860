"""docs/config.md is the configuration reference generated from rlsys/config.py's typed schema
(scripts/config_reference.py): it must be current, name every key with its default, and a key
without a comment in the schema must stop the generator."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from rlsys.config import RLConfig
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script("config_reference")


def test_docs_config_md_is_current():
    text = _script().render()
    assert (ROOT / "docs" / "config.md").read_text() == text, (
        "docs/config.md is out of date: run python scripts/config_reference.py"
    )


def test_every_key_is_listed_with_its_default():
    text = _script().render()
    cfg = RLConfig()
    for section in dataclasses.fields(RLConfig):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"| `{section.name}.{f.name}` |" in text, f"{section.name}.{f.name}"
    assert "| `trainer.total_steps` | `int` | `80` |" in text
    assert "| `algo.tis_cap` | `float \\| None` | `null` |" in text
    assert "| `eval.k` | `list[int]` | `[1, 4, 16, 64]` |" in text


def test_the_meaning_is_the_comment_above_and_beside_a_field():
    mod = _script()
    source = (
        "class C:\n"
        "    # what a means,\n"
        "    # on two lines\n"
        "    a: int = 1  # and a note\n"
        "    b: str = 'x'  # b's inline one\n"
        "    c: int = 2\n"
    )
    fields = mod._fields(ast.parse(source), source.splitlines())["C"]
    assert fields == [
        ("a", "int", "what a means, on two lines and a note"),
        ("b", "str", "b's inline one"),
        ("c", "int", ""),
    ]


def test_a_key_without_a_comment_stops_the_generator(monkeypatch, tmp_path):
    mod = _script()
    source = (ROOT / "rlsys" / "config.py").read_text()
    line = next(x for x in source.splitlines() if x.startswith("    total_steps: int = 80  # "))
    edited = tmp_path / "config.py"
    edited.write_text(source.replace(line, "    total_steps: int = 80"))
    monkeypatch.setattr(mod, "SOURCE", edited)
    with pytest.raises(ValueError, match=r"keys without a comment in rlsys/config.py .*trainer\.total_steps"):
        mod.render()
