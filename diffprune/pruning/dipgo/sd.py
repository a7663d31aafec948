"""DiP-GO on a text-to-image UNet (Stable Diffusion's ``UNet2DConditionModel``): the paper's own setting.

The SD UNet has the same block structure as ``UNet2DModel``: down blocks that push their residuals
on a stack, a mid block, up blocks that pop them (SD-1.5: down 0-3, mid, up 0-3, the 9 gateable
blocks of the DiP-GO paper). :class:`SDUNetGraph` reuses :class:`~.graph.UNet2DGraph`'s consumer
derivation (the skip-connection cascade: a block is not needed when every block reading it reuses
its backup) and adds the text conditioning: the embeddings of a call are set with
``conditioned(text)`` and passed as ``encoder_hidden_states``; the cross-attention blocks
receive them from the UNet's own forward.

Conditioning passes through the cache by rows: with guidance the runner sees the doubled batch
``[uncond, cond]`` on every step, so row i's backup is always row i's own (its prompt or the negative
prompt). :class:`SkipScheduleSD` is :class:`~diffprune.models.sd.GuidedSD` with its UNet call routed
through a :class:`~.supernet.GatedRunner`.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ...models.sd import TOKENS, GuidedSD
from .graph import UNet2DGraph
from .schedule import Schedule, schedule_macs
from .supernet import ScheduledCall


class SDUNetGraph(UNet2DGraph):
    """Adapter for diffusers' ``UNet2DConditionModel``: blocks ``down_0.., mid, up_0..``.

    Args:
        model: the UNet (eval mode).
        tokens: text length of a call outside :meth:`conditioned` (costing: zero embeddings of
            ``tokens`` tokens; the cross-attention's cost grows with it). SD-1.5: 77.
    """

    def __init__(self, model: UNet2DConditionModel, tokens: int = TOKENS) -> None:
        if not isinstance(model, UNet2DConditionModel):
            raise TypeError(f"SDUNetGraph: expected a UNet2DConditionModel, got {type(model).__name__}")
        if model.config.addition_embed_type is not None:
            raise NotImplementedError(f"SDUNetGraph: addition_embed_type = {model.config.addition_embed_type!r} "
                                      "(SDXL's added conditioning) is not supported")
        super().__init__(model)
        self.tokens = int(tokens)

    def call_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``UNet2DConditionModel.forward``'s sample ``(B', C, h, w)`` for ``x: (B', C, h, w)``, ``t: (B',)``."""
        text = self.condition
        if text is None:
            text = torch.zeros(x.shape[0], self.tokens, self.model.config.cross_attention_dim, device=x.device)
        return self.model(x, t, encoder_hidden_states=text, return_dict=False)[0]


class SkipScheduleSD(ScheduledCall, GuidedSD):
    """:class:`GuidedSD` running a skip :class:`Schedule` over the UNet's blocks with real savings.

    Args:
        unet: the (frozen) ``UNet2DConditionModel``; left unchanged.
        schedule: gates ``[T][N]`` for :class:`SDUNetGraph`'s block names.
        text, guidance_scale: as :class:`GuidedSD`.
    """

    def __init__(self, unet: UNet2DConditionModel, schedule: Schedule, text: torch.Tensor,
                 guidance_scale: float = 1.0) -> None:
        super().__init__(unet, text, guidance_scale, call=self._gated)
        self._schedule_over(SDUNetGraph(unet, tokens=text.shape[1]), schedule)


def guided_sd_schedule_macs(unet: UNet2DConditionModel, schedule: Schedule, guidance_scale: float,
                            num_images: int = 1, tokens: int = TOKENS) -> int:
    """Trajectory MACs of sampling ``num_images`` latents under ``schedule`` with prompts of ``tokens``
    tokens; guidance (``guidance_scale > 1``) runs every call on the doubled batch: twice the MACs."""
    c = unet.config
    per_image = schedule_macs(SDUNetGraph(unet, tokens), schedule, (c.in_channels, c.sample_size, c.sample_size))
    return per_image * (2 if guidance_scale > 1 else 1) * num_images
