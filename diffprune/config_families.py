"""The params sections of the latent model families (``teacher.family: dit | sd | ldm``) and their VAE.

Part of :mod:`diffprune.config`, which imports them from here (kept apart so that each module stays
under 400 lines).
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, Strict, model_validator

from .config_base import (PATH_LEN, WIDTH, Batch, Channels, ConfigError, Float, Int, Positive, Seed, Steps, Str,
                          _r, _section)


@_section("dit")
class DitConfig:
    """The class-conditional DiT of ``teacher.family: dit`` (trained with teacher's steps, lr, batch)."""

    num_layers: Int = Field(4, ge=1, le=64)
    num_heads: Int = Field(2, ge=1, le=64)
    head_dim: Int = Field(16, ge=1, le=WIDTH)
    patch_size: Int = Field(1, ge=1, le=16)     # must divide the latent side
    guidance_scale: Float = Field(1.0, ge=0.0, le=50.0)  # > 1: classifier-free guidance (doubles the batch)


@_section("sd")
class SdConfig:
    """The text-to-image latent UNet of ``teacher.family: sd`` (a ``UNet2DConditionModel`` as in
    Stable Diffusion: cross-attention in every level but the last), prompted by one caption per
    class, and the tiny CLIP text encoder initialised here (frozen: never trained nor pruned)."""

    block_out_channels: list[Channels] = Field([32, 64], min_length=2, max_length=4)  # one per level
    layers_per_block: Int = Field(1, ge=1, le=4)
    attention_head_dim: Int = Field(8, ge=1, le=WIDTH)  # diffusers' (legacy) name: the heads per attention
    norm_num_groups: Int = Field(8, ge=1, le=WIDTH)
    text_width: Int = Field(32, ge=2, le=WIDTH)  # the text encoder's width = the UNet's cross_attention_dim
    text_layers: Int = Field(2, ge=1, le=24)
    text_heads: Int = Field(2, ge=1, le=64)
    caption: Str = Field("a handwritten {label}", max_length=200)  # {label}: the class name (folder, Hub label; digits: the digit)
    # the prompts themselves, one per class in label order (instead of `caption`): its own prompt each
    captions: Optional[list[Annotated[Str, Field(min_length=1, max_length=200)]]] = Field(None, min_length=1,
                                                                                          max_length=100_000)
    caption_dropout: Float = Field(0.1, ge=0.0, le=1.0)  # captions dropped to "" in training (for guidance)
    guidance_scale: Float = Field(1.0, ge=0.0, le=50.0)  # > 1: classifier-free guidance (doubles the batch)
    seed: Seed = 0  # the text encoder's initialisation

    @model_validator(mode="after")
    def _widths_agree(self) -> "SdConfig":
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"sd.block_out_channels = {_r(self.block_out_channels)}: each must be a "
                              f"positive multiple of norm_num_groups={self.norm_num_groups}")
        if self.text_width % self.text_heads:
            raise ConfigError(f"sd.text_width = {self.text_width}: must be a multiple of sd.text_heads = "
                              f"{self.text_heads}")
        if self.caption.count("{label}") != 1:
            raise ConfigError(f"sd.caption = {self.caption!r}: needs exactly one '{{label}}' (the class name)")
        return self


@_section("clip")
class ClipConfig:
    """The CLIP score of a text-to-image model's samples against their prompts (the ``evaluate`` stage
    of ``teacher.family: sd``). Its own section: changing it re-evaluates, never retrains."""

    # a CLIP folder (CLIPModel + CLIPProcessor) or Hub id (openai/clip-vit-large-patch14: the DiP-GO
    # paper's); None = not measured, and the metrics say so
    weights: Optional[Str] = Field(None, max_length=PATH_LEN)


@_section("ldm")
class LdmConfig:
    """The latent UNet of ``teacher.family: ldm`` (a ``UNet2DModel`` of the teacher's layout on the
    ``latents`` stage's latents, trained with the teacher's recipe)."""

    class_conditional: Annotated[bool, Strict()] = True  # a class embedding (n classes + the null class)
    label_dropout: Float = Field(0.1, ge=0.0, le=1.0)  # labels dropped to the null class in training
    guidance_scale: Float = Field(1.0, ge=0.0, le=50.0)  # > 1: classifier-free guidance (doubles the batch)


@_section("autoencoder")
class AutoencoderConfig:
    """The VAE of a latent family, trained on the dataset by the ``latents`` stage (unless pretrained)."""

    pretrained: Optional[Str] = Field(None, max_length=PATH_LEN)  # AutoencoderKL folder / Hub id; None = train
    latent_channels: Int = Field(4, ge=1, le=64)
    block_out_channels: list[Channels] = Field([32, 32], min_length=1, max_length=4)  # levels - 1 downsamplings
    steps: Steps = 1500
    batch_size: Batch = 128
    lr: Positive = 2e-3
    kl_weight: Float = Field(1e-6, ge=0.0, le=1.0)
    seed: Seed = 0
