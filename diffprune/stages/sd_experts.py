"""The timestep-expert stages on the text-to-image UNet family (``teacher.family: sd``): the pixel
UNet's own stages (``stages/experts.py``, ``router.py``) on the latents, each row with its caption's
embeddings (dropped to the empty prompt in training as the teacher's were). The elastic space has
the resnets' widths and depths and the heads of self- and cross-attention (whose residual is the
transformer block's, so attention is elastic in width only); the feed-forward widths stay whole
(a deviation from the paper's space, which has no text-to-image UNet). Its own module, so that the
family's other stages do not depend on the expert stages' code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Params
from ..models.sd import CaptionCall, empty_prompt_by_default
from ..targets import captions_of
from ..training import Conditions
from . import safe_subpath
from .core import TEACHER
from .expert_data import EXPERT_FAMILIES, ExpertData
from .latent import load_latents
from .sd import FAMILY, caption_table


def _table(root: Path):
    return caption_table(root, captions_of(safe_subpath(root, TEACHER)))


def _expert_data(p: Params, root: Path) -> tuple[torch.Tensor, Conditions]:
    """The latents and their labels, each fed as its caption's embeddings (the teacher's training call)."""
    latents, labels = load_latents(root)
    return latents, Conditions(labels, CaptionCall(_table(root), p.sd.caption_dropout))


EXPERT_FAMILIES[FAMILY] = ExpertData(
    _expert_data, bare_calls=lambda root, net: empty_prompt_by_default(net, _table(root)),
    key=lambda p: {"sd": p.sd.caption_dropout})
