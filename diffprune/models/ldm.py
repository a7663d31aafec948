"""Latent UNets (LDM): diffusers' ``UNet2DModel`` denoising an ``AutoencoderKL``'s latents, class-
conditional (``num_class_embeds`` = n classes + the null class of classifier-free guidance) or not.

The latent DDPMs the Diff-Pruning reference prunes are of this kind. :class:`GuidedUNet` is the house
denoiser ``(x_t, t, step) -> eps`` for one batch of class labels (guidance as DiT's,
:class:`~diffprune.models.guidance.LabelGuided`); :func:`~diffprune.models.dit.ClassCycle` samples
a balanced class cycle with it and decodes the final latents. An unconditional one is the same
class with no embedding table: it takes the labels and ignores them (one class, nothing to guide).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from ..config import ConfigError, TeacherConfig
from .guidance import LabelDropout, LabelGuided, ModelCall, bare_call_defaults
from .unet import unet_of


def build_ldm_unet(cfg: TeacherConfig, latent_shape: Sequence[int], num_classes: Optional[int],
                   seed: int = 0) -> UNet2DModel:
    """A fresh ``UNet2DModel`` of the teacher's layout on latents ``(C, h, w)``; with ``num_classes``,
    ``num_classes + 1`` class embeddings (the last: the null class). Seeded, the global RNG untouched."""
    c, h, w = (int(v) for v in latent_shape)
    levels = len(cfg.block_out_channels)
    if h != w or h % 2 ** (levels - 1):
        raise ConfigError(f"teacher.block_out_channels = {list(cfg.block_out_channels)}: {levels - 1} "
                          f"downsamplings do not divide the square latent side ({h} x {w})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return unet_of(cfg, c, h, None if num_classes is None else num_classes + 1)


def classes_of(unet: UNet2DModel) -> int:
    """The classes a latent UNet is conditioned on (1 for an unconditional one)."""
    n = unet.config.num_class_embeds
    return 1 if n is None else int(n) - 1


def null_class(unet: UNet2DModel) -> int:
    """The id of the null class (the embedding table's last row; 0 for an unconditional UNet)."""
    return classes_of(unet) if unet.config.num_class_embeds is not None else 0


def _forward(model: UNet2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if model.config.num_class_embeds is None:
        return model(x, t).sample
    return model(x, t, class_labels=labels).sample


def unet_forward(model: UNet2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """eps of a latent UNet for labels ``(B,)`` (ignored by an unconditional one)."""
    return _forward(model, x, t, labels)


@contextmanager
def null_class_by_default(unet: nn.Module) -> Iterator[None]:
    """Within it, a bare call ``unet(x, t)`` of a class-conditional latent UNet runs the null class
    (:func:`~.guidance.bare_call_defaults`); a no-op for an unconditional one."""
    if getattr(unet.config, "num_class_embeds", None) is None:
        yield
        return
    null = null_class(unet)
    with bare_call_defaults(unet, lambda x: {"class_labels": torch.full((x.shape[0],), null, dtype=torch.long,
                                                                        device=x.device)}):
        yield


def ldm_call(label_dropout: float = 0.0) -> LabelDropout:
    """The training call of a latent UNet: its labels as ``class_labels`` (none for an unconditional
    one), each dropped to the null class with probability ``label_dropout`` in training mode."""
    return LabelDropout(_forward, null_class, label_dropout)


class GuidedUNet(LabelGuided):
    """A latent ``UNet2DModel`` as a house denoiser for class labels ``(B,)``, guided against the null
    class when ``guidance_scale > 1`` (one UNet call on the doubled batch). ``call``: as GuidedDiT's."""

    def __init__(self, unet: UNet2DModel, class_labels: Sequence[int] | torch.Tensor, guidance_scale: float = 1.0, *,
                 call: Optional[ModelCall] = None) -> None:
        cfg = unet.config
        if cfg.num_class_embeds is None and guidance_scale > 1:
            raise ValueError(f"guidance_scale = {guidance_scale}: an unconditional UNet has nothing to guide")
        self.unet = unet
        super().__init__(class_labels, classes_of(unet), null_class(unet),
                         (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)), guidance_scale, call=call)

    def _plain(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        return _forward(self.unet, x, t, y)


class LabelConditioned(nn.Module):
    """``(x (B, C, h, w), t (B,)) -> eps`` of ``unet`` with row i conditioned on ``labels[i]``: the
    network :func:`~diffprune.pruning.taylor.prune_unet` scores (``conv_out`` is the UNet's, so it
    is protected). A call on fewer rows than ``labels`` uses the first rows (the trace, the MACs)."""

    def __init__(self, unet: UNet2DModel, labels: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("labels", labels.long(), persistent=False)

    @property
    def conv_out(self) -> nn.Module:
        return self.unet.conv_out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.labels.shape[0]:
            raise ValueError(f"a batch of {x.shape[0]} latents, but labels for {self.labels.shape[0]}")
        return _forward(self.unet, x, t, self.labels[: x.shape[0]])


__all__ = ["GuidedUNet", "LabelConditioned", "build_ldm_unet", "classes_of", "ldm_call", "null_class",
           "null_class_by_default", "unet_forward"]
