"""The timestep-expert stages on the latent UNet family (``teacher.family: ldm``): the pixel UNet's
own stages (``stages/experts.py``, ``router.py``) on the latents, each row with its label (dropped to
the null class in training as the teacher's were). Its own module, so that the family's other stages
do not depend on the expert stages' code (nor they on the family's)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Params
from ..models.ldm import ldm_call, null_class_by_default
from ..training import Conditions
from .expert_data import EXPERT_FAMILIES, ExpertData
from .latent import load_latents
from .ldm import FAMILY, dropout


def _expert_data(p: Params, root: Path) -> tuple[torch.Tensor, Conditions]:
    """The latents and their labels, fed as the training call feeds them (an unconditional UNet ignores them)."""
    latents, labels = load_latents(root)
    return latents, Conditions(labels, ldm_call(dropout(p)))


EXPERT_FAMILIES[FAMILY] = ExpertData(_expert_data, bare_calls=lambda root, net: null_class_by_default(net),
                                     key=lambda p: {"ldm": dropout(p)})
