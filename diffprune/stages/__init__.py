"""Pipeline stages: each one library function, called alike by ``diffprune stage NAME`` (the DVC
stage's ``cmd``) and by the Prefect task of the same name.

A stage reads its inputs from fixed paths under the project root, writes its outputs atomically,
saves the resolved config beside them, and returns a small dict of output paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import ConfigError

# name -> (function(params, root, **kwargs) -> dict). Filled by the stage modules below.
STAGES: dict[str, Callable[..., dict]] = {}


def stage(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        STAGES[name] = fn
        return fn

    return deco


# the names the stage modules register, known without importing them (torch, diffusers: ~10 s on 2 cores),
# so a mistyped name fails at once; a test checks that it equals what the modules register
NAMES = ("data", "dipgo", "evaluate", "experts", "features", "finetune", "intervals", "prune-experts", "register",
         "report", "router", "taylor", "teacher")


def get_stage(name: str) -> Callable[..., dict]:
    if name not in NAMES:
        raise ConfigError(f"unknown stage {name!r} (known: {', '.join(NAMES)})")
    _load_all()
    return STAGES[name]


def _load_all() -> None:
    # importing a stage module registers its stages (and its models in core.TARGETS)
    from . import core, dipgo, experts, report, router, taylor  # noqa: F401


def safe_subpath(root: Path, rel: str | Path) -> Path:
    """``root / rel``, refusing paths that escape ``root`` (``../``, absolute paths)."""
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise ConfigError(f"output path {str(rel)!r} escapes the project folder {root}")
    return p
