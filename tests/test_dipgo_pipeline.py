"""A DiP-GO skip schedule inside diffusers' own DiTPipeline and StableDiffusionPipeline (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTPipeline, StableDiffusionPipeline

from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import build_dit_pipeline, decode, sample_latents, to_unit
from diffprune.models.sd import build_sd_pipeline, encode_prompts
from diffprune.models.sd import decode as sd_decode
from diffprune.models.sd import sample_latents as sd_latents
from diffprune.pruning.dipgo import Schedule, SkipScheduleDiT, SkipScheduleSD, block_graph
from diffprune.pruning.dipgo.pipeline import ScheduledNetwork

T = 4


def _schedule(model, skips: dict[int, list[int]]) -> Schedule:
    graph = block_graph(model)
    n = len(graph.block_names)
    return Schedule(keep=[[k not in skips.get(s, []) for k in range(n)] for s in range(T)],
                    block_names=graph.block_names, consumers=graph.consumers)


def _dit_images(pipe, labels, **kw):
    return pipe(labels, guidance_scale=2.5, generator=torch.Generator().manual_seed(0), num_inference_steps=T,
                output_type="pt", **kw).images


def test_a_schedule_runs_inside_dit_pipeline_as_our_sampler_runs_it_and_skips_real_work():
    base = build_dit_pipeline(seed=0)
    dit = base.transformer
    sched = _schedule(dit, {1: [0, 2], 2: [1], 3: [0, 1, 2]})
    pipe = DiTPipeline(transformer=ScheduledNetwork(dit, sched, base.scheduler), vae=base.vae,
                       scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    with MacCounter(dit) as gated:
        theirs = _dit_images(pipe, [3, 7])
    ours = to_unit(decode(base.vae, sample_latents(SkipScheduleDiT(dit, sched, [3, 7], 2.5), base.scheduler,
                                                   steps=T)))
    assert torch.equal(theirs, ours)
    assert torch.equal(_dit_images(pipe, [3, 7]), theirs)  # a second run starts from fresh backups
    plain = DiTPipeline(transformer=dit, vae=base.vae, scheduler=base.scheduler)
    plain.set_progress_bar_config(disable=True)
    with MacCounter(dit) as full:
        whole = _dit_images(plain, [3, 7])
    assert gated.total < full.total and not torch.equal(whole, theirs)
    # an all-compute schedule is the plain pipeline, bit for bit
    pipe.transformer = ScheduledNetwork(dit, _schedule(dit, {}), base.scheduler)
    assert torch.equal(_dit_images(pipe, [3, 7]), whole)


def test_a_pipeline_run_with_another_step_count_is_refused_by_name():
    base = build_dit_pipeline(seed=0)
    net = ScheduledNetwork(base.transformer, _schedule(base.transformer, {1: [0]}), base.scheduler)
    pipe = DiTPipeline(transformer=net, vae=base.vae, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="num_inference_steps = 6 .* call it with num_inference_steps=4"):
        pipe([3], num_inference_steps=6, output_type="pt")
    other = build_sd_pipeline(seed=0).unet
    with pytest.raises(ValueError):
        ScheduledNetwork(other, net.schedule, base.scheduler)  # another model's block names


def test_a_schedule_runs_inside_stable_diffusion_pipeline_as_our_sampler_runs_it():
    base = build_sd_pipeline(seed=0)
    sched = _schedule(base.unet, {1: [1, 3], 2: [2], 3: [0, 3]})  # blocks down_0, down_1, mid, up_0, up_1
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=ScheduledNetwork(base.unet, sched, base.scheduler), scheduler=base.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a handwritten 3", "a handwritten 8"]

    def images(p):
        return p(prompts, guidance_scale=7.5, generator=torch.Generator().manual_seed(0), num_inference_steps=T,
                 output_type="pt", height=16, width=16).images

    with MacCounter(base.unet) as gated:
        theirs = images(pipe)
    den = SkipScheduleSD(base.unet, sched, encode_prompts(base, prompts, True), 7.5)
    ours = to_unit(sd_decode(base.vae, sd_latents(den, base.scheduler, steps=T)))
    assert torch.equal(ours, theirs)
    with MacCounter(base.unet) as full:
        whole = images(base)
    assert gated.total < full.total and not torch.equal(whole, theirs)
    pipe.unet = ScheduledNetwork(base.unet, _schedule(base.unet, {}), base.scheduler)  # all compute: the plain one
    assert torch.equal(images(pipe), whole)
