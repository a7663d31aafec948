"""Latent datasets: a dataset's images encoded once by a VAE, cached by content.

A latent model (LDM, DiT, Stable Diffusion) trains and is fine-tuned on the VAE's latents, not on
pixels. :func:`cached_latents` encodes the images once (the posterior's mode times the VAE's
``scaling_factor``, deterministic) and keeps them in ``cache_dir/latents-KEY.safetensors``, KEY the
hash of the VAE (config and weights) and of the images: another VAE or other images get their own
file, the same ones are read back. Files are written atomically; a damaged one is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_path

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_images(vae: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents ``(N, C, h, w)`` of ``images (N, c, H, W)`` in [-1, 1]; one-channel images are
    repeated to the VAE's input channels (grayscale digits through an RGB VAE)."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images {tuple(images.shape)}: need a non-empty (N, C, H, W) batch")
    want = int(vae.config.in_channels)
    if images.shape[1] != want:
        if images.shape[1] != 1:
            raise ValueError(f"images with {images.shape[1]} channels: the VAE takes {want} (or 1, repeated)")
        images = images.repeat(1, want, 1, 1)
    p = next(vae.parameters())
    out = [vae.encode(b.to(p.device, p.dtype)).latent_dist.mode() * vae.config.scaling_factor
           for b in images.split(batch_size)]
    return torch.cat(out).cpu()


def latent_cache_key(vae: nn.Module, images: torch.Tensor) -> str:
    """16 hex digits of the SHA-256 of the VAE's config and weights and of the images."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, v in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_latents(vae: nn.Module, images: torch.Tensor, cache_dir: str | Path, batch_size: int = 64) -> torch.Tensor:
    """:func:`encode_images` of ``images``, read from ``cache_dir`` when encoded before by this VAE."""
    path = Path(cache_dir) / f"latents-{latent_cache_key(vae, images)}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["latents"]
        except (SafetensorError, OSError, KeyError) as e:
            log.warning("%s: unreadable (%s); encoding again", path, e)
    latents = encode_images(vae, images, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp))
    return latents
