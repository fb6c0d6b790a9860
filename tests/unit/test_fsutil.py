"""rlsys.fsutil: the directory swap leaves exactly the new copy; the lock excludes another process."""

from __future__ import annotations

import multiprocessing as mp
import time

from rlsys.fsutil import file_lock, replace_dir


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
