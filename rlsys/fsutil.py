"""Small file-system primitives shared by the caches and checkpoints (tiny models, SFT results,
run checkpoints, HF exports, datasets): an inter-process lock, a build-once cache directory, a
directory swap and atomic file writes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory flock on ``path``, released on exit from the block or process death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_dir_once(
    final: Path, why_unusable: Callable[[Path], str | None], build: Callable[[Path], None], *, what: str
) -> Path:
    """``final``, built first by ``build(tmp_dir)`` unless ``why_unusable(final)`` is None (complete).

    Safe under concurrency: builders serialize on a lock file next to the target, build into a
    private temp dir in the same parent and ``os.rename`` it into place, so the target path either
    does not exist or is complete. A directory at the target that is not usable (an interrupted
    copy, a build by other code, a failed checksum) is logged with ``why_unusable``'s reason, moved
    aside and rebuilt; leftover temp dirs of crashed builders are removed. Readers that find a
    complete directory never take the lock. ``what`` names the cache in the log.
    """
    if final.exists() and why_unusable(final) is None:
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{final.name}.tmp-"
    with file_lock(parent / f".{final.name}.lock"):
        why = why_unusable(final) if final.exists() else None
        if final.exists() and why is None:
            return final  # another process finished while we waited for the lock
        # Holding the lock, any temp dir for this target belongs to a dead builder.
        for stale in parent.glob(f"{tmp_prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            log.warning("%s: %s is unusable (%s); rebuilding it", what, final, why)
            trash = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=parent))
            os.rename(final, trash / "invalid")
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_file(p) as tmp:`` write ``tmp`` (a fresh temp file beside ``p``); on a clean exit it
    is renamed to ``p``, on an exception deleted: a crash never leaves a half-written ``p``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept) atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return Path(path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst`` (same file system), replacing an older ``dst``.

    A rename is atomic, so ``dst`` is never half written; when ``dst`` exists it is first renamed
    aside to a hidden sibling and deleted after the swap, which leaves a window of two renames in
    which ``dst`` is missing (readers then see "no result", never a partial one).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, trash)
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)


# Directories being written (a checkpoint under construction); a stop (rlsys.signals) removes them
# before the process exits. The set lives here, below both, so that rlsys.checkpoint does not import
# rlsys.signals, which imports rlsys.checkpoint to name the last complete checkpoint in its stop line.
partial_dirs: set[str] = set()


def track_partial(path: str | os.PathLike[str]) -> None:
    """``path`` is being written; a stop removes it (rlsys.checkpoint.begin)."""
    partial_dirs.add(str(path))


def untrack_partial(path: str | os.PathLike[str]) -> None:
    """``path`` is complete or gone (rlsys.checkpoint.commit)."""
    partial_dirs.discard(str(path))
