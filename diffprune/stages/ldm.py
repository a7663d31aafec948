"""The latent UNet family's stages (``teacher.family: ldm``): a ``UNet2DModel`` of the teacher's
layout (``teacher.block_out_channels``, ``attention``, ...) denoising the latents of the ``latents``
stage's VAE, class-conditional (``ldm.class_conditional``: labels, the null class, guidance) or not.

The common stages (data, features, latents, evaluate, register, report) run as they are: a model
is sampled through :func:`diffprune.sampling.sample` as a :class:`~diffprune.models.dit.ClassCycle`
of :class:`~diffprune.models.ldm.GuidedUNet` (image i is class ``i % n``; the VAE decodes the final
latents). Diff-Pruning is the pixel UNet's own (:func:`~diffprune.pruning.taylor.prune_unet`, each
scored latent with its own label); DiP-GO is the pixel UNet's block graph, on guided, conditioned
trajectories. The timestep-expert stages are the pixel UNet's own (``stages/experts.py``,
``router.py``) on the latents, each row with its label (``stages/ldm_experts.py``); the mixture
samples as kind ``ldm-experts``. The stack stage has no latent version yet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, Params, resolve_device
from ..distributed import follower_result
from ..models.dit import ClassCycle
from ..models.ldm import GuidedUNet, LabelConditioned, build_ldm_unet, ldm_call
from ..targets import load_vae
from . import conditional, safe_subpath, stage
from .core import FAMILY_KINDS, FAMILY_PATHS, ProgressFn
from .latent import AUTOENCODER, LABEL_FREE, PRETRAINED_VAE, load_latents

FAMILY = "ldm"
FAMILY_KINDS[FAMILY] = {"unet": "ldm", "dipgo": "ldm-dipgo", "experts": "ldm-experts"}  # no stack yet
FAMILY_PATHS[FAMILY] = {"vae": AUTOENCODER}
__all__ = ["FAMILY"]


def _no_pretrained(name: str, device):
    raise ConfigError(f"teacher.pretrained = {name!r}: a pretrained latent UNet is not supported for "
                      "teacher.family = 'ldm' yet (its VAE: autoencoder.pretrained; the UNet is trained here)")


PRETRAINED_VAE[FAMILY] = _no_pretrained
LABEL_FREE[FAMILY] = lambda p: not p.ldm.class_conditional  # an unconditional latent DDPM needs no labels


def _class_cycle(model, cond: dict, root: Path, device) -> ClassCycle:
    n = cond["num_classes"]
    return ClassCycle(GuidedUNet(model, list(range(n)), cond["guidance_scale"]), n,
                      load_vae(safe_subpath(root, AUTOENCODER), device))


def dropout(p: Params) -> float:
    """The label dropout of the latent UNet's training (none for an unconditional one)."""
    return p.ldm.label_dropout if p.ldm.class_conditional else 0.0


@stage("teacher", family=FAMILY)
def run_teacher(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                **_: Any) -> dict:
    """Train the latent UNet on the latents (with their labels, ``ldm.label_dropout`` of them dropped to
    the null class, when class-conditional; EMA, resumable)."""
    if p.teacher.pretrained:
        _no_pretrained(p.teacher.pretrained, None)
    device = resolve_device(p.project.device)
    latents, labels = load_latents(root)
    n = int(labels.max()) + 1 if p.ldm.class_conditional else None
    cond = {"num_classes": n or 1, "guidance_scale": float(p.ldm.guidance_scale)}
    t0 = time.time()
    model = build_ldm_unet(p.teacher, latents.shape[1:], n, seed=p.teacher.seed)
    trained = conditional.train_teacher(p, root, FAMILY, model, ldm_call(dropout(p)), latents, labels, progress,
                                        on_progress)
    if trained is None:
        return follower_result("teacher")
    model, scheduler_config, meta = trained
    meta |= {"train_seconds": time.time() - t0, "conditioning": cond}
    return conditional.save_teacher(p, root, FAMILY, model, scheduler_config, meta,
                                    lambda m: _class_cycle(m, cond, root, device), device)


@stage("taylor", family=FAMILY)
def run_taylor(p: Params, root: Path, **_: Any) -> dict:
    """Diff-Pruning of the latent UNet (the pixel UNet's :func:`~diffprune.pruning.taylor.prune_unet`,
    each scored latent with its own label) at ``taylor.ratio`` or the ratio meeting
    ``taylor.target_macs_ratio``; writes models/taylor."""
    from ..pruning.taylor import prune_unet, scoring_indices

    device = resolve_device(p.project.device)

    def prune(model, scheduler, latents, labels, cfg):
        rows = scoring_indices(latents.shape[0], cfg)  # the rows prune_unet scores: their labels go with them
        wrapped, report = prune_unet(LabelConditioned(model, labels[rows]), scheduler, latents, cfg, device=device)
        return wrapped.unet, report

    return conditional.prune(p, root, FAMILY, prune, macs_at=conditional.unet_macs_at(LabelConditioned))


@stage("finetune", family=FAMILY)
def run_finetune(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                 **_: Any) -> dict:
    """Fine-tune the pruned latent UNet on the latents with their labels (:func:`conditional.finetune`)."""
    return conditional.finetune(p, root, FAMILY, ldm_call(dropout(p)), progress, on_progress, key=dropout(p))


@stage("dipgo", family=FAMILY)
def run_dipgo(p: Params, root: Path, progress: bool = True, on_progress: Any = None, **_: Any) -> dict:
    """DiP-GO on the latent UNet's blocks (down levels, mid, up levels with the skip-connection
    cascade), on guided, class-conditioned trajectories with the SSIM of the decoded images as the loss."""
    from ..pruning.dipgo.ldm import ldm_conditioned

    def graph(teacher, cond: dict, device):
        vae = load_vae(safe_subpath(root, AUTOENCODER), device)
        return ldm_conditioned(teacher, cond["num_classes"], cond["guidance_scale"], vae)

    return conditional.dipgo(p, root, FAMILY, graph, progress, on_progress)


conditional.refuse_unsupported(FAMILY, ("stack",))
