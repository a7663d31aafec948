"""The timestep-expert stages on the class-conditional DiT family (``teacher.family: dit``): the
pixel UNet's own stages (``stages/experts.py``, ``router.py``) on the latents, each row with its
label (DiT's label embedding drops them in training, as the teacher's did).

The elastic space of a DiT (:func:`~diffprune.pruning.experts.elastic_space`): every transformer
block's attention (its heads) and feed-forward (its hidden channels in 16 groups), each of which
may also go whole (the block then adds nothing of it to its stream). Its own module, so that the
family's other stages do not depend on the expert stages' code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Params
from ..models.dit import dit_call, null_label_by_default
from ..training import Conditions
from .expert_data import EXPERT_FAMILIES, ExpertData
from .dit import FAMILY
from .latent import load_latents


def _expert_data(p: Params, root: Path) -> tuple[torch.Tensor, Conditions]:
    latents, labels = load_latents(root)
    return latents, Conditions(labels, dit_call)


EXPERT_FAMILIES[FAMILY] = ExpertData(_expert_data, bare_calls=lambda root, net: null_label_by_default(net))
