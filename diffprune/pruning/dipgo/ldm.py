"""DiP-GO on a latent UNet (LDM): the ``UNet2DModel``'s blocks (:class:`~.graph.UNet2DGraph`: down
levels, mid, up levels with the skip-connection cascade), each image's class label passed through the
cache by rows, guidance against the null class on the doubled batch as the plain sampler does.

:class:`SkipScheduleGuidedUNet` is :class:`~diffprune.models.ldm.GuidedUNet` with its model call
replaced by the schedule's gated step; :func:`ldm_conditioned` is the graph the pruner trains on
(row i of the noise pool is class ``i % n``; SSIM on the VAE-decoded images).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from ...models.ldm import GuidedUNet
from .conditioned import ConditionedGraph
from .graph import UNet2DGraph
from .schedule import Schedule
from .supernet import ScheduledCall


class SkipScheduleGuidedUNet(ScheduledCall, GuidedUNet):
    """:class:`GuidedUNet` running a skip :class:`Schedule` over the UNet's blocks with real savings.

    Args:
        unet: the (frozen) latent ``UNet2DModel``; left unchanged.
        schedule: gates ``[T][N]`` for :class:`UNet2DGraph`'s block names.
        class_labels, guidance_scale: as :class:`GuidedUNet`.
    """

    def __init__(self, unet: UNet2DModel, schedule: Schedule, class_labels: Sequence[int] | torch.Tensor,
                 guidance_scale: float = 1.0) -> None:
        super().__init__(unet, class_labels, guidance_scale, call=self._gated)
        self._schedule_over(UNet2DGraph(unet), schedule)


def ldm_conditioned(unet: UNet2DModel, num_classes: int, guidance_scale: float,
                    vae: Optional[nn.Module] = None) -> ConditionedGraph:
    """A latent UNet's :class:`ConditionedGraph`: row i carries class ``rows[i] % num_classes``,
    guided as :class:`GuidedUNet`."""
    labels = torch.arange(num_classes)

    def make(rows: torch.Tensor, call):
        return GuidedUNet(unet, labels[rows], guidance_scale, call=call)

    return ConditionedGraph(UNet2DGraph(unet), num_classes, make, vae)


__all__ = ["SkipScheduleGuidedUNet", "ldm_conditioned"]
