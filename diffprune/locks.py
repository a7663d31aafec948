"""Per-stage file locks shared by the Prefect flow and ``diffprune stage`` (the DVC stage's cmd).

One lock file per stage and workspace: ``.work/locks/NAME.lock`` (``evaluate@teacher`` ->
``evaluate--teacher``), so the flow, ``dvc repro`` and a second ``diffprune stage`` of the same stage
exclude each other. The lock folder must lie inside the workspace: a ``.work`` symlinked out of it
is refused (nothing is written through a link that leaves the project).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import psutil
from filelock import FileLock

from .stages import safe_subpath


def stage_lock(root: Path, name: str) -> FileLock:
    """The lock of stage ``name`` in workspace ``root``."""
    folder = safe_subpath(root, ".work/locks")
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name.replace('@', '--')}.lock"))


@contextlib.contextmanager
def exclusive_stage(root: Path, name: str, outs: Sequence[str] = ()) -> Iterator[bool]:
    """Hold stage ``name``'s lock; yields True when all of ``outs`` (paths relative to ``root``) were
    written by another process since this one started: the same stage with the same inputs ran
    concurrently (DVC runs one command per stage; a user started a second one), so the caller can
    reuse its outputs instead of computing them a second time. Otherwise the caller runs the stage."""
    started = psutil.Process().create_time()
    with stage_lock(root, name):
        paths = [safe_subpath(root, o) for o in outs]
        yield bool(paths) and all(p.exists() and p.stat().st_mtime >= started for p in paths)
