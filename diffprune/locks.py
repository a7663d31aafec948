"""Per-stage file locks shared by the Prefect flow and ``diffprune stage`` (the DVC stage's cmd).

One lock file per stage and workspace: ``.work/locks/NAME.lock`` (``evaluate@teacher`` ->
``evaluate--teacher``), so the flow, ``dvc repro`` and a second ``diffprune stage`` of the same stage
exclude each other. The lock folder must lie inside the workspace: a ``.work`` symlinked out of it
is refused (nothing is written through a link that leaves the project).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Sequence

from filelock import FileLock, Timeout

from .stages import safe_subpath


def stage_lock(root: Path, name: str) -> FileLock:
    """The lock of stage ``name`` in workspace ``root``."""
    folder = safe_subpath(root, ".work/locks")
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name.replace('@', '--')}.lock"))


@contextlib.contextmanager
def exclusive_stage(root: Path, name: str, outs: Sequence[str] = ()) -> Iterator[bool]:
    """Hold stage ``name``'s lock; yields True when another process produced all of ``outs`` (paths
    relative to ``root``) while this one waited for the lock: the same stage with the same inputs
    just ran, so the caller can reuse its outputs instead of computing them a second time."""
    lock = stage_lock(root, name)
    start = time.time()
    try:
        lock.acquire(timeout=0)
        waited = False
    except Timeout:
        lock.acquire()
        waited = True
    try:
        fresh = [safe_subpath(root, o) for o in outs]
        yield waited and bool(fresh) and all(p.exists() and p.stat().st_mtime >= start for p in fresh)
    finally:
        lock.release()
