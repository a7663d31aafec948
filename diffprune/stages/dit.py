"""The class-conditional DiT family's stages (``teacher.family: dit``): the teacher, Diff-Pruning and
DiP-GO on a ``DiTTransformer2DModel`` denoising the latents of the ``latents`` stage's VAE.

The common stages (data, features, latents, evaluate, register, report) run as they are: a DiT
model is sampled through :func:`diffprune.sampling.sample` as a :class:`~diffprune.models.dit.ClassCycle`
(image i of a set is class ``i % num_classes``; the VAE decodes the final latents), so FID, the
paired fidelity to the teacher, MACs (guidance doubling counted) and latency are the house's. Every
model's checkpoint records its ``conditioning`` (class count, guidance scale), and loads back into
diffusers' ``DiTPipeline`` (:func:`diffprune.models.dit.dit_pipeline`). The timestep-expert stages are
the pixel UNet's own on the labelled latents (``stages/dit_experts.py``; the mixture samples as kind
``dit-experts``); the stack stage has no DiT version yet (a DiT workspace's ``dvc.yaml`` leaves it out).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Params, resolve_device
from ..distributed import follower_result
from ..models.dit import ClassCycle, GuidedDiT, build_dit, dit_call
from ..targets import load_vae
from . import conditional, safe_subpath, stage
from .core import FAMILY_KINDS, FAMILY_PATHS, ProgressFn
from .latent import AUTOENCODER, PRETRAINED_VAE, load_latents

FAMILY = "dit"
FAMILY_KINDS[FAMILY] = {"unet": "dit", "dipgo": "dit-dipgo", "experts": "dit-experts"}  # no stack yet
FAMILY_PATHS[FAMILY] = {"vae": AUTOENCODER}


def _pretrained_vae(name: str, device):
    from ..models.dit import load_dit

    return load_dit(name, device).vae


PRETRAINED_VAE[FAMILY] = _pretrained_vae


def _class_cycle(model, cond: dict, root: Path, device) -> ClassCycle:
    return ClassCycle(GuidedDiT(model, list(range(cond["num_classes"])), cond["guidance_scale"]),
                      cond["num_classes"], load_vae(safe_subpath(root, AUTOENCODER), device))


@stage("teacher", family=FAMILY)
def run_teacher(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                **_: Any) -> dict:
    """Train the DiT on the latents with their labels (EMA, resumable; DiT's 10% label dropout), or
    load ``teacher.pretrained``'s transformer (a ``DiTPipeline``; the latents stage then used its VAE)."""
    device = resolve_device(p.project.device)
    latents, labels = load_latents(root)
    cond = {"num_classes": int(labels.max()) + 1, "guidance_scale": float(p.dit.guidance_scale)}
    t0 = time.time()
    if p.teacher.pretrained:
        from ..models.dit import load_dit

        pipe = load_dit(p.teacher.pretrained)
        model, scheduler_config, meta = pipe.transformer, dict(pipe.scheduler.config), {"source": p.teacher.pretrained}
    else:
        d = p.dit
        model = build_dit(d.num_layers, d.num_heads, d.head_dim, d.patch_size, latents.shape[1:], seed=p.teacher.seed)
        trained = conditional.train_teacher(p, root, FAMILY, model, dit_call, latents, labels, progress, on_progress)
        if trained is None:
            return follower_result("teacher")
        model, scheduler_config, meta = trained
    meta |= {"train_seconds": time.time() - t0, "conditioning": cond}
    return conditional.save_teacher(p, root, FAMILY, model, scheduler_config, meta,
                                    lambda m: _class_cycle(m, cond, root, device), device)


@stage("taylor", family=FAMILY)
def run_taylor(p: Params, root: Path, **_: Any) -> dict:
    """Diff-Pruning of the DiT (:func:`diffprune.pruning.dit_taylor.prune_dit`): ``taylor.ratio`` (or the
    ratio meeting ``taylor.target_macs_ratio``) of every block's attention heads and MLP hidden
    channels; writes models/taylor."""
    from ..pruning.dit_taylor import prune_dit

    def macs_at(teacher, latents, labels, ratio: float) -> float:  # every block cut alike: the ratio alone decides
        cfg = dataclasses.replace(p.taylor, importance="magnitude", batch_size=1, ratio=ratio, target_macs_ratio=None)
        rep = prune_dit(teacher, None, latents, labels, cfg)[1]
        return rep["macs_after"] / rep["macs_before"]

    return conditional.prune(p, root, FAMILY, prune_dit, macs_at=macs_at)


@stage("finetune", family=FAMILY)
def run_finetune(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                 **_: Any) -> dict:
    """Fine-tune the pruned DiT on the latents with their labels (:func:`conditional.finetune`)."""
    return conditional.finetune(p, root, FAMILY, dit_call, progress, on_progress)


@stage("dipgo", family=FAMILY)
def run_dipgo(p: Params, root: Path, progress: bool = True, on_progress: Any = None, **_: Any) -> dict:
    """DiP-GO on the DiT: the pruner learns which transformer blocks reuse their previous step's
    residual update, on guided, class-conditioned trajectories (row i of the noise pool is class
    ``i % num_classes``, as the evaluation draws them) with the SSIM of the decoded images as the loss."""
    from ..pruning.dipgo.conditioned import dit_conditioned

    def graph(teacher, cond: dict, device):
        vae = load_vae(safe_subpath(root, AUTOENCODER), device)
        return dit_conditioned(teacher, torch.arange(cond["num_classes"]), cond["guidance_scale"], vae)

    return conditional.dipgo(p, root, FAMILY, graph, progress, on_progress)


conditional.refuse_unsupported(FAMILY, ("stack",))
