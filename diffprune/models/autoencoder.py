"""The VAE of a latent family: diffusers' ``AutoencoderKL``, built from a config and fitted to a dataset.

A latent model (DiT, an LDM, Stable Diffusion) denoises a VAE's latents. Users of the Hub presets
bring the VAE with the model (``DiTPipeline``'s ``vae/``); the embedded digits preset has none, so
:func:`fit_autoencoder` trains a tiny one here in about a minute on 2 cores (reconstruction MSE plus a
small KL term, as the KL-regularised autoencoder of LDM), then sets ``scaling_factor`` to 1 / the
standard deviation of the training latents, the LDM recipe (SD's 0.18215 was found the same way). It
is a short full-batch-free fit without checkpoints: a rerun repeats it bit for bit (seeded generator).
"""

from __future__ import annotations

import math
import torch
from diffusers import AutoencoderKL
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..config import AutoencoderConfig


def build_autoencoder(cfg: AutoencoderConfig, channels: int, image_size: int, seed: int = 0) -> AutoencoderKL:
    """A fresh ``AutoencoderKL`` for ``channels``-channel images: one level per ``block_out_channels``
    entry (``len - 1`` downsamplings), ``cfg.latent_channels`` latent channels; seeded, global RNG untouched."""
    levels = len(cfg.block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"autoencoder.block_out_channels = {list(cfg.block_out_channels)}: {levels - 1} "
                         f"downsamplings do not divide data.image_size = {image_size}")
    groups = math.gcd(*cfg.block_out_channels, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=channels, out_channels=channels,
                             down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels,
                             block_out_channels=tuple(cfg.block_out_channels), layers_per_block=1,
                             latent_channels=cfg.latent_channels, norm_num_groups=groups, sample_size=image_size)


def fit_autoencoder(vae: AutoencoderKL, images: torch.Tensor, cfg: AutoencoderConfig, *,
                    device: torch.device | str = "cpu", progress: bool = True) -> tuple[AutoencoderKL, dict]:
    """Train ``vae`` on ``images (N, C, H, W)`` in [-1, 1]; returns it in eval mode with its
    ``scaling_factor`` set, and ``{"recon_mse", "recon_psnr", "kl", "latent_std"}`` on the images."""
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = vae.to(device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    bar = tqdm(range(cfg.steps), desc="autoencoder", disable=not progress, leave=False)
    for _ in bar:
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)  # our generator
        rec = vae.decode(z).sample
        mse, kl = F.mse_loss(rec, x), post.kl().mean() / x[0].numel()
        loss = mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    return vae, _calibrate(vae, images, device)


@torch.no_grad()
def _calibrate(vae: AutoencoderKL, images: torch.Tensor, device, batch_size: int = 256) -> dict:
    """Set ``scaling_factor`` = 1 / std of the latent means; the reconstruction of the posterior mode."""
    means, mse, kl = [], 0.0, 0.0
    for b in images.split(batch_size):
        b = b.to(device)
        post = vae.encode(b).latent_dist
        means.append(post.mean.cpu())
        mse += F.mse_loss(vae.decode(post.mode()).sample.clamp(-1, 1), b, reduction="sum").item()
        kl += post.kl().sum().item()
    std = float(torch.cat(means).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    mse /= images.numel()
    return {"recon_mse": mse, "recon_psnr": 10 * math.log10(4.0 / max(mse, 1e-12)), "kl": kl / len(images),
            "latent_std": std, "scaling_factor": 1.0 / std}
