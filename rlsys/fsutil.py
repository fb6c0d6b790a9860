"""Small file-system primitives shared by the caches and checkpoints (tiny models, SFT results,
run checkpoints, HF exports): an inter-process lock and a directory swap."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


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
