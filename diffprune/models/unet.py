"""Build, load and describe diffusers UNets and their noise schedulers.

A teacher is either built from a :class:`~diffprune.config.TeacherConfig` (trained by
:mod:`diffprune.training`) or loaded with ``from_pretrained`` from a local diffusers folder or a Hub id.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from ..config import ConfigError, DataConfig, TeacherConfig


def build_unet(cfg: TeacherConfig, data: DataConfig) -> UNet2DModel:
    """A fresh UNet2DModel: one resolution level per entry of ``cfg.block_out_channels``."""
    return unet_of(cfg, data.channels, data.image_size)


def unet_of(cfg: TeacherConfig, channels: int, size: int, num_class_embeds: int | None = None) -> UNet2DModel:
    """A fresh UNet2DModel of ``cfg``'s layout for ``channels`` x ``size`` x ``size`` inputs (pixels or
    latents); ``num_class_embeds``: a class embedding table of that many rows."""
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)]
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=num_class_embeds,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
        add_attention=any(cfg.attention),
    )


def build_scheduler(cfg: TeacherConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)


SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}


def sampling_scheduler(train_scheduler_config: dict, sampler: str):
    """The inference scheduler named ``sampler`` with the teacher's noise schedule."""
    try:
        cls = SAMPLERS[sampler]
    except KeyError:
        raise ConfigError(f"evaluate.sampler = {sampler!r}: expected one of {sorted(SAMPLERS)}") from None
    return cls.from_config(dict(train_scheduler_config))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_pretrained_source(name_or_path: str, key: str) -> None:
    """Raise :class:`ConfigError` (naming ``key``) unless ``name_or_path`` is a local folder, or a Hub
    id (``owner/name``) while the Hub is reachable: offline, a Hub id fails at once."""
    if Path(name_or_path).exists():
        return
    if name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise ConfigError(f"{key} = {name_or_path!r}: no such folder, and not a Hub id (owner/name)")
    if not _hub_reachable():
        raise ConfigError(
            f"{key} = {name_or_path!r}: the Hugging Face Hub is not reachable (offline?); "
            "download the model elsewhere and pass its local folder"
        )


def load_pretrained(name_or_path: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a diffusers UNet2DModel + scheduler from a local folder or a Hub id.

    Supports both layouts: the UNet config at the root (google/ddpm-cifar10-32) or in ``unet/``.
    Offline, a Hub id fails at once with a clear :class:`ConfigError`.
    """
    local = Path(name_or_path)
    check_pretrained_source(name_or_path, "teacher.pretrained")
    subfolder = "unet" if (local / "unet" / "config.json").exists() else None
    try:
        unet = UNet2DModel.from_pretrained(name_or_path, subfolder=subfolder, use_safetensors=None)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"teacher.pretrained = {name_or_path!r}: cannot load a UNet2DModel ({e})") from e
    sched_sub = "scheduler" if (local / "scheduler").exists() or subfolder else None
    try:
        scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder=sched_sub)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"teacher.pretrained = {name_or_path!r}: cannot load its scheduler ({e})") from e
    return unet, scheduler


# config.json of google/ddpm-cifar10-32 (diffusers 0.0.4), every architectural key: the real
# architecture of the Diff-Pruning paper's CIFAR-10 table, built locally (counting needs no weights)
CIFAR10_DDPM: dict = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, norm_eps=1e-6,
    attention_head_dim=None, act_fn="silu", center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, mid_block_scale_factor=1, time_embedding_type="positional",
)
