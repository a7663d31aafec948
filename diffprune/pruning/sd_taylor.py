"""Diff-Pruning on a text-to-image UNet (Stable Diffusion's ``UNet2DConditionModel``).

The same pipeline as :func:`~.taylor.prune_unet` (one scoring batch, gradients accumulated over the
early timesteps, the reference's Taylor score, GroupNorm-aware channel selection, whole heads), run
on the UNet with each scoring image's own text embeddings passed as ``encoder_hidden_states``:
:class:`TextConditioned` is the ``(x, t) -> eps`` view torch-pruning traces and scores. What goes:
conv channels of every resnet and resampler, the residual stream of every level, self- and
cross-attention heads whole (q/k/v rows and output columns; the cross-attention keys and values
keep their input width, the text encoder's), and the GEGLU feed-forward's hidden channels.
What never changes: the text encoder, the VAE, ``conv_in``'s input and ``conv_out``'s output.

Measured deviation (tiny UNet, ratio 0.3): torch-pruning's dependency graph follows the GEGLU
projection's ``chunk`` and keeps value and gate rows paired (a test checks it), but it ranks the
``2 x hidden`` rows as one group of ``2 x hidden`` channels, so the number of hidden pairs removed
depends on how the low scores fall between the two halves: 13 of 32 (41%) there, not
``floor(0.3 * 32) = 9``. The convolution and attention widths follow the reference's counts.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..config import TaylorConfig
from ..metrics.cost import unet_macs
from .surgery import attention_layers
from .taylor import prune_unet, scoring_indices


class TextConditioned(nn.Module):
    """``(x (B, C, h, w), t (B,)) -> eps`` of ``unet`` with row i attending to ``text[i]``.

    A call on fewer rows than ``text`` uses its first rows (the trace and the MACs count use one).
    ``conv_out`` is the UNet's, so :func:`~.taylor.prune_unet` protects it.
    """

    def __init__(self, unet: UNet2DConditionModel, text: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("text", text, persistent=False)

    @property
    def conv_out(self) -> nn.Module:
        return self.unet.conv_out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.text.shape[0]:
            raise ValueError(f"a batch of {x.shape[0]} latents, but text embeddings for {self.text.shape[0]}")
        return self.unet(x, t, encoder_hidden_states=self.text[: x.shape[0]]).sample


def sd_unet_macs(unet: UNet2DConditionModel, tokens: int) -> int:
    """MACs of one unguided UNet call on ONE latent attending to ``tokens`` text tokens (guidance doubles it)."""
    c = unet.config
    p = next(unet.parameters())
    text = torch.zeros(1, tokens, c.cross_attention_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        return unet_macs(TextConditioned(unet, text), (c.in_channels, c.sample_size, c.sample_size))


def prune_sd_unet(unet: UNet2DConditionModel, scheduler, latents: torch.Tensor, text: torch.Tensor,
                  cfg: TaylorConfig, device: str | torch.device = "cpu") -> tuple[UNet2DConditionModel, dict]:
    """Prune ``cfg.ratio`` of the UNet's channels and heads (Diff-Pruning); the teacher is left untouched.

    Args:
        unet: the pre-trained ``UNet2DConditionModel``.
        scheduler: its training noise scheduler.
        latents: ``(N, C, h, w)`` VAE latents (scaled) of real images, and
        text: ``(N, L, D)`` the text embeddings of their captions (row for row).
        cfg: as :func:`~.taylor.prune_unet`.

    Returns:
        ``(pruned, report)``: :func:`~.taylor.prune_unet`'s report (its MACs: one call on one latent with
        ``L`` tokens) plus the heads of every attention layer after pruning.
    """
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"prune_sd_unet: expected a UNet2DConditionModel, got {type(unet).__name__}")
    if latents.ndim != 4 or text.ndim != 3 or latents.shape[0] != text.shape[0] or latents.shape[0] == 0:
        raise ValueError(f"latents {tuple(latents.shape)} and text embeddings {tuple(text.shape)}: need (N, C, h, w) "
                         "and (N, L, D) with the same N >= 1")
    if text.shape[-1] != unet.config.cross_attention_dim:
        raise ValueError(f"text embeddings of width {text.shape[-1]}: the UNet attends to width "
                         f"{unet.config.cross_attention_dim}")
    idx = scoring_indices(latents.shape[0], cfg)  # the rows prune_unet scores: their captions go with them
    wrapped, report = prune_unet(TextConditioned(unet, text[idx].to(device)), scheduler, latents, cfg, device=device)
    pruned = wrapped.unet
    report["heads"] = {name: attn.heads for name, attn in attention_layers(pruned).items()}
    return pruned, report
