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
# (teacher.family, name) -> the family's own function for that stage (stages/dit.py, sd.py, ldm.py), where it differs
FAMILY_STAGES: dict[tuple[str, str], Callable[..., dict]] = {}


def stage(name: str, family: str | None = None) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Register ``fn`` as stage ``name``; with ``family``, as that model family's version of it."""
    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if family is None:
            STAGES[name] = fn
        else:
            FAMILY_STAGES[(family, name)] = fn
        return fn

    return deco


# the names the stage modules register, known without importing them (torch, diffusers: ~10 s on 2 cores),
# so a mistyped name fails at once; a test checks that it equals what the modules register
NAMES = ("data", "dipgo", "evaluate", "experts", "features", "finetune", "intervals", "latents", "prune-experts",
         "register", "report", "router", "stack", "taylor", "teacher")


def stage_function(name: str, family: str = "unet") -> Callable[..., dict]:
    """The function that runs stage ``name`` for the model family ``family``: the family's own where
    :data:`FAMILY_STAGES` has one, else the common one."""
    if name not in NAMES:
        raise ConfigError(f"unknown stage {name!r} (known: {', '.join(NAMES)})")
    _load_all()
    return FAMILY_STAGES.get((family, name), STAGES[name])


def get_stage(name: str) -> Callable[..., dict]:
    """Stage ``name``: a function ``(params, root, **kwargs)`` running :func:`stage_function` of
    ``params.teacher.family``."""
    stage_function(name)  # an unknown name fails here, not at the call

    def run(p, root, **kwargs) -> dict:
        return stage_function(name, p.teacher.family)(p, root, **kwargs)

    run.__name__ = run.__qualname__ = f"stage_{name.replace('-', '_')}"
    return run


def _load_all() -> None:
    # importing a stage module registers its stages (and its models in core.TARGETS)
    from . import (core, dipgo, dit, dit_experts, experts, latent, ldm, ldm_experts, report, router, sd, sd_experts, stack,
                   taylor)  # noqa: F401


def safe_subpath(root: Path, rel: str | Path) -> Path:
    """``root / rel``, refusing paths that escape ``root`` (``../``, absolute paths)."""
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise ConfigError(f"output path {str(rel)!r} escapes the project folder {root}")
    return p
