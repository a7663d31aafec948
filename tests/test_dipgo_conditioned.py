"""DiP-GO's pruner on conditional latent models (tiny DiT and SD): guided per-row conditions, unclamped
latents, the loss on decoded images; the learned schedule runs in the family's skip-schedule sampler."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffprune.config import DipgoConfig
from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import GuidedDiT, build_dit_pipeline, sample_latents
from diffprune.models.sd import build_sd_pipeline, encode_prompts
from diffprune.pruning.dipgo import (SkipScheduleDiT, SkipScheduleSD, dit_conditioned, guided_schedule_macs,
                                     sd_conditioned, train_pruner)
from diffprune.pruning.dipgo.pruner import _PrunerRun
from diffprune.sampling import trajectory

T, G = 4, 2.5
LABELS = torch.tensor([3, 7, 1])
CFG = DipgoConfig(target_ratio=0.5, steps=6, lr=0.5, warmup_steps=1, dim=16, batch_size=2, pool_size=4,
                  tolerance=0.1)


@pytest.fixture(scope="module")
def dit():
    return build_dit_pipeline(seed=0)


def _sched_cfg(pipe) -> dict:
    return dict(DDIMScheduler.from_config(pipe.scheduler.config).config)


def test_the_pool_is_the_guided_sampler_per_row_and_not_clamped(dit):
    graph = dit_conditioned(dit.transformer, LABELS, G, vae=dit.vae)
    run = _PrunerRun.build(graph, _sched_cfg(dit), CFG, T, (4, 8, 8), torch.device("cpu"), "ddim", 2)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([2, 0, 1, 2])
    got = run.full_samples(noise, idx)
    want = trajectory(GuidedDiT(dit.transformer, LABELS[idx], G), run.sched, noise, T, clamp=False)
    assert torch.equal(got, want)
    assert got.abs().max() > 1  # latents, never clamped to the pixel range


def test_without_a_vae_the_model_is_in_pixel_space_and_its_samples_are_clamped(dit):
    graph = dit_conditioned(dit.transformer, LABELS, G)  # no VAE: pixel space
    run = _PrunerRun.build(graph, _sched_cfg(dit), CFG, T, (4, 8, 8), torch.device("cpu"), "ddim", 2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = run.full_samples(noise, torch.tensor([0, 1]))
    assert not graph.latent and got.abs().max() <= 1 and torch.equal(run.decoded(got), got)


def test_pruner_on_a_guided_dit_reaches_the_target_and_its_schedule_runs(dit):
    graph = dit_conditioned(dit.transformer, LABELS, G, vae=dit.vae)
    before = {k: v.clone() for k, v in dit.vae.state_dict().items()}
    schedule, info = train_pruner(graph, _sched_cfg(dit), CFG, steps=T, sample_shape=(4, 8, 8), progress=False)
    assert schedule.block_names == ["block_0", "block_1", "block_2"] and len(schedule.keep) == T
    assert abs(schedule.macs_ratio - CFG.target_ratio) <= CFG.tolerance and all(schedule.keep[0])
    assert len(info["history"]) == CFG.steps and all(h["consistency"] >= 0 for h in info["history"])
    # the VAE's loss gradients are not kept, nor its weights changed
    assert all(p.grad is None for p in dit.vae.parameters()) and all(p.requires_grad for p in dit.vae.parameters())
    assert all(torch.equal(v, dit.vae.state_dict()[k]) for k, v in before.items())
    den = SkipScheduleDiT(dit.transformer, schedule, [3, 7], G)
    with MacCounter(dit.transformer) as c:
        sample_latents(den, dit.scheduler, steps=T, seed=0)
    assert c.total == guided_schedule_macs(dit.transformer, schedule, G, num_images=2)


def test_pruner_on_a_text_to_image_unet_runs_with_prompts():
    sd = build_sd_pipeline(seed=0)
    text = encode_prompts(sd, ["a handwritten 3", "a handwritten 7"], False)
    negative = encode_prompts(sd, [""], False)
    graph = sd_conditioned(sd.unet, text, negative, 7.5, vae=sd.vae)
    schedule, _ = train_pruner(graph, _sched_cfg(sd), CFG, steps=T, sample_shape=(4, 8, 8), progress=False)
    assert schedule.block_names == ["down_0", "down_1", "mid", "up_0", "up_1"]
    assert abs(schedule.macs_ratio - CFG.target_ratio) <= CFG.tolerance
    den = SkipScheduleSD(sd.unet, schedule, encode_prompts(sd, ["a handwritten 3"], True), 7.5)
    out = trajectory(den, sd.scheduler, torch.randn(1, 4, 8, 8), T, clamp=False)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
