"""What the timestep-expert stages (``stages/experts.py``, ``router.py``) take from a model family:
its training data and conditions (:class:`ExpertData`), one entry per family in
:data:`EXPERT_FAMILIES` (the pixel UNet here; the latent families in ``stages/{dit,sd,ldm}_experts.py``)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch

from ..config import ConfigError, Params
from ..data import load_split
from ..training import Conditions
from . import core, safe_subpath


@dataclass(frozen=True)
class ExpertData:
    """What the timestep-expert stages take from a model family: ``load(p, root) -> (images,
    conditions)`` (its training images or latents, and their :class:`~diffprune.training.Conditions`
    or ``None``); ``bare_calls(root, net)``, the context in which its network takes the bare call
    ``net(x, t)`` that MACs counting and shape checks make; ``key(p)``, what else defines its
    training (a conditional family's label dropout)."""

    load: Callable[[Params, Path], tuple[torch.Tensor, Optional[Conditions]]]
    bare_calls: Callable[[Path, torch.nn.Module], ContextManager[None]] = lambda root, net: nullcontext()
    key: Callable[[Params], Any] = lambda p: None


def _pixels(p: Params, root: Path) -> tuple[torch.Tensor, None]:
    return load_split(safe_subpath(root, core.DATASET), "train")[0], None


# teacher.family -> its ExpertData; a latent family adds itself (stages/{dit,sd,ldm}_experts.py). A family not here has
# its own refusing versions of these stages.
EXPERT_FAMILIES: dict[str, ExpertData] = {"unet": ExpertData(_pixels)}


def expert_family(p: Params) -> ExpertData:
    fam = EXPERT_FAMILIES.get(p.teacher.family)
    if fam is None:
        raise ConfigError(f"teacher.family = {p.teacher.family!r}: no timestep experts for this family yet "
                          f"(they run on: {', '.join(sorted(EXPERT_FAMILIES))})")
    return fam


def train_conditions(cond: Optional[Conditions]) -> dict:
    """``train_or_resume``'s ``conditions=`` and ``call=`` for a family's conditions (none without)."""
    return {} if cond is None else {"conditions": cond.values, "call": cond.call}
