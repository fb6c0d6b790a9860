"""rlsys.fsutil: the directory swap leaves exactly the new copy; the lock excludes another process; a
build-once cache directory is built once, rebuilt when unusable and never left half-built."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from rlsys.fsutil import atomic_file, build_dir_once, file_lock, replace_dir, write_jsonl


def test_replace_dir_moves_into_place_and_replaces_an_older_copy(tmp_path):
    new, final = tmp_path / ".staging", tmp_path / "final"
    new.mkdir()
    (new / "a").write_text("1")
    replace_dir(new, final)
    assert (final / "a").read_text() == "1" and not new.exists()
    newer = tmp_path / ".staging2"
    newer.mkdir()
    (newer / "b").write_text("2")
    replace_dir(newer, final)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no trash or staging left behind


def _hold(path, started, seconds):
    with file_lock(path):
        started.set()
        time.sleep(seconds)


def test_file_lock_excludes_another_process(tmp_path):
    lock = tmp_path / "sub" / ".x.lock"
    started = mp.get_context("fork").Event()
    holder = mp.get_context("fork").Process(target=_hold, args=(lock, started, 0.5))
    holder.start()
    assert started.wait(10)
    t0 = time.monotonic()
    with file_lock(lock):
        waited = time.monotonic() - t0
    holder.join(10)
    assert waited > 0.2  # blocked until the holder released it


def test_build_dir_once_builds_once_rebuilds_an_unusable_dir_and_cleans_up_a_failed_build(tmp_path, caplog):
    final = tmp_path / "cache" / "thing"
    builds: list[Path] = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        (tmp / "ok").write_text("1")

    def why(d: Path) -> str | None:
        return None if (d / "ok").is_file() else "no ok file"

    assert build_dir_once(final, why, build, what="things") == final
    assert build_dir_once(final, why, build, what="things") == final
    assert len(builds) == 1 and (final / "ok").read_text() == "1"
    assert oct(final.stat().st_mode & 0o777) == "0o755"

    (final / "ok").unlink()  # an unusable directory at the target: named in the log, moved aside, rebuilt
    (final / "junk").write_text("x")
    with caplog.at_level("WARNING", logger="rlsys.fsutil"):
        build_dir_once(final, why, build, what="things")
    assert len(builds) == 2 and sorted(p.name for p in final.iterdir()) == ["ok"]
    assert "things" in caplog.text and "no ok file" in caplog.text

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    other = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError, match="disk full"):
        build_dir_once(other, why, broken, what="things")
    assert not other.exists()
    assert [p.name for p in other.parent.iterdir() if p.name.startswith(".other.tmp-")] == []


def test_atomic_file_keeps_the_old_contents_when_the_writer_fails(tmp_path):
    p = write_jsonl([{"a": "é"}, {"b": 2}], tmp_path / "d" / "rows.jsonl")
    assert p.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'

    def rows():
        yield {"c": 3}
        raise RuntimeError("the generator died half way")

    with pytest.raises(RuntimeError, match="half way"):
        write_jsonl(rows(), p)
    assert p.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'  # not the half-written new file
    assert sorted(x.name for x in p.parent.iterdir()) == ["rows.jsonl"]  # and no temp file left
    with atomic_file(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"x")
        assert not (tmp_path / "new.bin").exists()  # visible only after the block
    assert (tmp_path / "new.bin").read_bytes() == b"x"
