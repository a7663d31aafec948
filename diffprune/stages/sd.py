"""The text-to-image latent UNet family's stages (``teacher.family: sd``): Stable Diffusion's classes
(``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder and tokenizer) on the latents of
the ``latents`` stage's VAE, prompted by one caption per class (``sd.caption``: "a handwritten 7").

The ``latents`` stage writes the frozen text encoder beside the VAE (``models/text-encoder``: the
tiny CLIP text model initialised here, or ``teacher.pretrained``'s own); every method touches the
UNet only. The common stages (data, features, latents, evaluate, register, report) run as they are:
a model is sampled through :func:`diffprune.sampling.sample` as a :class:`~diffprune.models.sd.PromptCycle`
(image i is prompted with caption ``i % n``; the VAE decodes the final latents), so FID, the paired
fidelity to the teacher, MACs (guidance doubling counted) and latency are the house's. Every model
loads back into diffusers' ``StableDiffusionPipeline`` (:func:`diffprune.models.sd.sd_pipeline`).
The timestep-expert stages are the pixel UNet's own on the captioned latents (``stages/sd_experts.py``;
the mixture samples as kind ``sd-experts``); the stack stage has no version here yet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Params, resolve_device
from ..data import class_names
from ..distributed import follower_result
from ..models.sd import (CaptionCall, CaptionTable, PromptCycle, GuidedSD, build_sd_unet, build_text_encoder,
                         class_captions, load_text_encoder, save_text_encoder, sd_pipeline)
from ..targets import captions_of, load_vae
from . import conditional, safe_subpath, stage
from .core import DATASET, FAMILY_KINDS, FAMILY_PATHS, ProgressFn
from .latent import AUTOENCODER, FROZEN_PARTS, PRETRAINED_VAE, load_latents

FAMILY = "sd"
TEXT_ENCODER = "models/text-encoder"
FAMILY_KINDS[FAMILY] = {"unet": "sd", "dipgo": "sd-dipgo", "experts": "sd-experts"}  # no stack yet
FAMILY_PATHS[FAMILY] = {"vae": AUTOENCODER, "text": TEXT_ENCODER}
__all__ = ["FAMILY", "TEXT_ENCODER", "caption_table"]


def _pretrained_vae(name: str, device):
    from ..models.sd import load_sd

    return load_sd(name, device).vae


def _write_text_encoder(p: Params, root: Path, device) -> dict:
    """models/text-encoder: ``teacher.pretrained``'s text encoder and tokenizer, or a tiny CLIP text
    model initialised from ``sd`` (seeded; frozen: no method trains it)."""
    if p.teacher.pretrained:
        from ..models.sd import load_sd

        pipe = load_sd(p.teacher.pretrained)
        encoder, tokenizer, source = pipe.text_encoder, pipe.tokenizer, f"{p.teacher.pretrained} (text_encoder/)"
    else:
        encoder, tokenizer = build_text_encoder(p.sd.text_width, p.sd.text_layers, p.sd.text_heads, seed=p.sd.seed)
        source = "initialised"
    out = save_text_encoder(encoder, tokenizer, safe_subpath(root, TEXT_ENCODER))
    return {"text_encoder": str(out), "text_encoder_source": source}


PRETRAINED_VAE[FAMILY] = _pretrained_vae
FROZEN_PARTS[FAMILY] = _write_text_encoder


def caption_table(root: Path, captions: list[str], device="cpu") -> CaptionTable:
    """The text embeddings of ``captions`` by the workspace's frozen text encoder (models/text-encoder)."""
    encoder, tokenizer = load_text_encoder(safe_subpath(root, TEXT_ENCODER), device)
    return CaptionTable(sd_pipeline(None, None, encoder, tokenizer), captions)


def _prompt_cycle(model, cond: dict, root: Path, device) -> PromptCycle:
    table = caption_table(root, cond["captions"], device)
    n = len(cond["captions"])
    guided = GuidedSD(model, table.text(torch.arange(n), cond["guidance_scale"] > 1), cond["guidance_scale"])
    return PromptCycle(guided, table, load_vae(safe_subpath(root, AUTOENCODER), device))


def _captions(p: Params, root: Path, num_classes: int) -> list[str]:
    """The class prompts: ``sd.captions`` (one per class, in label order) or ``sd.caption`` with each
    class's name."""
    if p.sd.captions is None:
        return class_captions(p.sd.caption, num_classes, class_names(safe_subpath(root, DATASET)))
    if len(p.sd.captions) != num_classes:
        raise ConfigError(f"sd.captions has {len(p.sd.captions)} prompts, the dataset {num_classes} classes: "
                          "give one prompt per class, in label order")
    return list(p.sd.captions)


@stage("teacher", family=FAMILY)
def run_teacher(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                **_: Any) -> dict:
    """Train the text-to-image UNet on the latents, each prompted by its class's caption (dropped to
    the empty prompt with ``sd.caption_dropout``, for guidance; EMA, resumable), or load
    ``teacher.pretrained``'s UNet (a ``StableDiffusionPipeline``; the latents stage used its VAE and
    text encoder)."""
    device = resolve_device(p.project.device)
    latents, labels = load_latents(root)
    captions = _captions(p, root, int(labels.max()) + 1)
    cond = {"num_classes": len(captions), "guidance_scale": float(p.sd.guidance_scale), "captions": captions}
    t0 = time.time()
    if p.teacher.pretrained:
        from ..models.sd import load_sd

        pipe = load_sd(p.teacher.pretrained)
        model, scheduler_config, meta = pipe.unet, dict(pipe.scheduler.config), {"source": p.teacher.pretrained}
    else:
        s = p.sd
        table = caption_table(root, captions, device)
        model = build_sd_unet(s.block_out_channels, s.layers_per_block, s.attention_head_dim, s.norm_num_groups,
                              table.cond.shape[-1], latents.shape[1:], seed=p.teacher.seed)
        # steps_offset 1: StableDiffusionPipeline rewrites any scheduler's steps_offset to 1 (its legacy-config
        # fix), so the family's checkpoints carry it and the house sampler takes the pipeline's timesteps
        # (with 0 the images of the same prompts and seed differed by 2e-3 on the tiny preset)
        trained = conditional.train_teacher(p, root, FAMILY, model, CaptionCall(table, s.caption_dropout), latents,
                                            labels, progress, on_progress, steps_offset=1)
        if trained is None:
            return follower_result("teacher")
        model, scheduler_config, meta = trained
    meta |= {"train_seconds": time.time() - t0, "conditioning": cond}
    return conditional.save_teacher(p, root, FAMILY, model, scheduler_config, meta,
                                    lambda m: _prompt_cycle(m, cond, root, device), device)


def _teacher_captions(root: Path) -> list[str]:
    from .core import TEACHER

    return captions_of(safe_subpath(root, TEACHER))


@stage("taylor", family=FAMILY)
def run_taylor(p: Params, root: Path, **_: Any) -> dict:
    """Diff-Pruning of the UNet (:func:`diffprune.pruning.sd_taylor.prune_sd_unet`): ``taylor.ratio``
    (or the ratio meeting ``taylor.target_macs_ratio``) of its conv channels, attention heads (self and
    cross, pruned whole) and MLP widths, gradients taken with each latent's own caption; the text
    encoder and VAE untouched. Writes models/taylor."""
    from ..pruning.sd_taylor import TextConditioned, prune_sd_unet

    device = resolve_device(p.project.device)
    table = caption_table(root, _teacher_captions(root), device)
    return conditional.prune(
        p, root, FAMILY, lambda m, s, x, y, cfg: prune_sd_unet(m, s, x, table.cond.to(device)[y], cfg, device=device),
        macs_at=conditional.unet_macs_at(lambda m, y: TextConditioned(m, table.cond.to(device)[y])))


@stage("finetune", family=FAMILY)
def run_finetune(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                 **_: Any) -> dict:
    """Fine-tune the pruned UNet on the captioned latents (:func:`conditional.finetune`; the captions
    dropped as the teacher's were)."""
    table = caption_table(root, _teacher_captions(root), resolve_device(p.project.device))
    return conditional.finetune(p, root, FAMILY, CaptionCall(table, p.sd.caption_dropout), progress, on_progress,
                                key=(p.sd.caption_dropout, table.captions))


@stage("dipgo", family=FAMILY)
def run_dipgo(p: Params, root: Path, progress: bool = True, on_progress: Any = None, **_: Any) -> dict:
    """DiP-GO on the UNet's 9-ish gateable blocks (down levels, mid, up levels, with the skip-connection
    cascade), on guided, prompted trajectories (row i of the noise pool is caption ``i % n``) with the
    SSIM of the decoded images as the loss."""
    from ..pruning.dipgo.conditioned import sd_conditioned

    def graph(teacher, cond: dict, device):
        table = caption_table(root, _teacher_captions(root), device)
        vae = load_vae(safe_subpath(root, AUTOENCODER), device)
        return sd_conditioned(teacher, table.cond.to(device), table.negative.to(device), cond["guidance_scale"], vae)

    return conditional.dipgo(p, root, FAMILY, graph, progress, on_progress)


conditional.refuse_unsupported(FAMILY, ("stack",))
