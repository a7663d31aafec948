"""The ``latents`` stage of a latent family: its VAE, and the training split encoded by it once.

Outputs (DVC-tracked): ``models/autoencoder`` (a diffusers ``AutoencoderKL`` folder, safetensors) and
``data/latents`` (``latents.safetensors``: the scaled latents of the train split and its labels;
``autoencoder.json``: where the VAE came from and how well it reconstructs). Every later stage of
the family trains and prunes on these latents; evaluation decodes samples with the same VAE.

The VAE is, in order: ``autoencoder.pretrained`` (a folder or Hub id of an ``AutoencoderKL``), the
``vae/`` of ``teacher.pretrained`` (a ``DiTPipeline``: its VAE belongs to it), or one fitted to
the dataset here (:func:`diffprune.models.autoencoder.fit_autoencoder`, the embedded presets).
A family with other frozen parts (sd: the text encoder) writes them here too (:data:`FROZEN_PARTS`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, Params, resolve_device, to_dict
from ..data import load_split
from ..data.latents import encode_images
from ..io import ArtifactError, atomic_path, write_json
from . import safe_subpath, stage
from .core import DATASET

LATENTS = "data/latents"
AUTOENCODER = "models/autoencoder"
# latent family -> its hooks, filled by the family's stage module (stages/dit.py, stages/sd.py):
# the VAE of its pretrained pipeline (``teacher.pretrained``), and the frozen parts it writes
# beside the VAE (the text encoder of sd), as ``fn(params, root, device) -> info``
PRETRAINED_VAE: dict[str, Callable[[str, Any], Any]] = {}
FROZEN_PARTS: dict[str, Callable[[Params, Path, Any], dict]] = {}
# latent family -> whether its params need no labels (an unconditional latent UNet): its data may be unlabelled
LABEL_FREE: dict[str, Callable[[Params], bool]] = {}


def _vae(p: Params, images: torch.Tensor, device, progress: bool) -> tuple[Any, dict]:
    from ..models.unet import check_pretrained_source

    if p.autoencoder.pretrained:
        from ..targets import load_vae

        check_pretrained_source(p.autoencoder.pretrained, "autoencoder.pretrained")
        return load_vae(p.autoencoder.pretrained, device), {"source": p.autoencoder.pretrained}
    if p.teacher.pretrained:
        return PRETRAINED_VAE[p.teacher.family](p.teacher.pretrained, device), {"source": f"{p.teacher.pretrained} (vae/)"}
    from ..models.autoencoder import build_autoencoder, fit_autoencoder

    vae = build_autoencoder(p.autoencoder, p.data.channels, p.data.image_size, seed=p.autoencoder.seed)
    vae, fit = fit_autoencoder(vae, images, p.autoencoder, device=device, progress=progress)
    return vae, {"source": "trained", **fit, "params": to_dict(p.autoencoder)}


@stage("latents")
def run_latents(p: Params, root: Path, progress: bool = True, **_: Any) -> dict:
    """Get the family's VAE and encode the train split with it (one pass, deterministic: the mode)."""
    if p.teacher.family not in PRETRAINED_VAE:
        raise ConfigError(f"stage latents: teacher.family = {p.teacher.family!r} is not a latent family "
                          f"(latent families: {', '.join(PRETRAINED_VAE)})")
    device = resolve_device(p.project.device)
    images, labels = load_split(safe_subpath(root, DATASET), "train")
    if bool((labels < 0).any()) and not LABEL_FREE.get(p.teacher.family, lambda _: False)(p):
        raise ConfigError(f"data.source = {p.data.source!r}: unlabelled images, but teacher.family = "
                          f"{p.teacher.family!r} is class-conditional (give a folder with one sub-folder per class)")
    t0 = time.time()
    vae, info = _vae(p, images, device, progress)
    latents = encode_images(vae, images)
    info |= {"seconds": time.time() - t0, "latent_shape": list(latents.shape[1:]), "num_images": len(latents),
             "num_classes": int(labels.max()) + 1}
    with atomic_path(safe_subpath(root, AUTOENCODER), is_dir=True) as tmp:
        vae.cpu().save_pretrained(tmp, safe_serialization=True)
    with atomic_path(safe_subpath(root, LATENTS), is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        save_file({"latents": latents.contiguous(), "labels": labels.contiguous()}, str(tmp / "latents.safetensors"))
        write_json(tmp / "autoencoder.json", info)
    extra = FROZEN_PARTS[p.teacher.family](p, root, device) if p.teacher.family in FROZEN_PARTS else {}
    return {**extra, "latents": str(safe_subpath(root, LATENTS)), "autoencoder": str(safe_subpath(root, AUTOENCODER)),
            "latent_shape": info["latent_shape"], "recon_psnr": info.get("recon_psnr")}


def load_latents(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split's latents ``(N, C, h, w)`` and labels ``(N,)`` written by :func:`run_latents`."""
    f = safe_subpath(root, LATENTS) / "latents.safetensors"
    if not f.exists():
        raise ConfigError(f"{f}: no latents (run the latents stage first)")
    try:
        d = load_file(str(f))
        return d["latents"], d["labels"].long()
    except Exception as e:  # a damaged or foreign file: name it
        raise ArtifactError(f"{f}: not a latents file ({str(e).splitlines()[0]})") from e


def latents_sha(root: Path) -> str:
    """The latents file's identity (a new VAE or dataset never resumes an old training run)."""
    from ..io import sha256_file

    return sha256_file(safe_subpath(root, LATENTS) / "latents.safetensors")


def train_scheduler(p: Params, steps_offset: int = 0):
    """The DDPM noise schedule of a latent teacher; latents are unbounded, so no clipping of x_0.
    ``steps_offset``: carried into the sampling scheduler (DDIM's timesteps shift by it)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=p.teacher.num_train_timesteps, beta_schedule=p.teacher.beta_schedule,
                         clip_sample=False, steps_offset=steps_offset)
