"""A mixture of timestep experts inside diffusers' own pipelines (tiny DiT and SD)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTPipeline, StableDiffusionPipeline

from diffprune.models.dit import GuidedDiT, build_dit_pipeline, decode, sample_latents, to_unit
from diffprune.models.routed import TimestepRouted
from diffprune.models.sd import GuidedSD, build_sd_pipeline, encode_prompts
from diffprune.models.sd import decode as sd_decode
from diffprune.models.sd import sample_latents as sd_latents

STEPS = 4  # DDIM timesteps 750, 500, 250, 0 (DiT's scheduler): experts [0, 0, 1, 1] by boundary 500


def _calls(modules):
    counts = [0] * len(modules)
    hooks = [m.register_forward_pre_hook(lambda *_, k=k: counts.__setitem__(k, counts[k] + 1))
             for k, m in enumerate(modules)]
    return counts, hooks


def test_a_dit_mixture_runs_inside_dit_pipeline_as_our_sampler_does():
    base = build_dit_pipeline(seed=0)
    experts = [build_dit_pipeline(seed=s).transformer for s in (0, 1)]
    mixture = TimestepRouted(experts, [500])
    pipe = DiTPipeline(transformer=mixture, vae=base.vae, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    counts, hooks = _calls(experts)
    try:
        theirs = pipe([3, 7], guidance_scale=2.5, generator=torch.Generator().manual_seed(0),
                      num_inference_steps=STEPS, output_type="pt").images
    finally:
        for h in hooks:
            h.remove()
    ours = to_unit(decode(base.vae, sample_latents(GuidedDiT(mixture, [3, 7], 2.5), base.scheduler, steps=STEPS)))
    assert torch.equal(ours, theirs)
    assert counts == [2, 2]  # the two noisiest steps on expert 1, the others on expert 0
    alone = to_unit(decode(base.vae, sample_latents(GuidedDiT(experts[0], [3, 7], 2.5), base.scheduler, steps=STEPS)))
    assert not torch.equal(alone, ours)


def test_an_sd_mixture_runs_inside_stable_diffusion_pipeline():
    base = build_sd_pipeline(seed=0)
    experts = [build_sd_pipeline(seed=s).unet for s in (0, 1)]
    mixture = TimestepRouted(experts, [500])
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=mixture, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a handwritten 3"], guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=STEPS, output_type="pt", height=16, width=16).images
    den = GuidedSD(mixture, encode_prompts(base, ["a handwritten 3"], True), 7.5)
    ours = to_unit(sd_decode(base.vae, sd_latents(den, base.scheduler, steps=STEPS)))
    assert torch.equal(ours, theirs)


def test_experts_a_pipeline_cannot_run_alike_are_refused():
    small = build_dit_pipeline(seed=0).transformer
    with pytest.raises(ValueError, match="2 experts need 1 ascending"):
        TimestepRouted([small, small], [])
    other = build_sd_pipeline(seed=0).unet
    with pytest.raises(ValueError, match="expert 1 differs"):
        TimestepRouted([small, other], [500])
