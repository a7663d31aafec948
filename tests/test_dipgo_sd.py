"""DiP-GO on the text-to-image UNet: the skip-connection cascade, text and guidance through the cache, MACs."""

from __future__ import annotations

import pytest
import torch

from diffprune.metrics.cost import MacCounter
from diffprune.models.sd import GuidedSD, build_sd_pipeline, decode, encode_prompts, sample_latents
from diffprune.pruning.dipgo import OUTPUT, Schedule, SDUNetGraph, SkipScheduleSD, block_costs, block_graph
from diffprune.pruning.dipgo import executed_blocks, guided_sd_schedule_macs, schedule_from_scores
from diffprune.sampling import initial_noise, trajectory

T = 4
PROMPTS = ["a handwritten 3", "a handwritten 7"]
G = 7.5


@pytest.fixture(scope="module")
def pipe():
    return build_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def graph(pipe):
    return SDUNetGraph(pipe.unet)


def _text(pipe, prompts=PROMPTS, g=G):
    return encode_prompts(pipe, prompts, g > 1)


def _schedule(graph, skips=None) -> Schedule:
    n = len(graph.block_names)
    keep = [[k not in (skips or {}).get(s, []) for k in range(n)] for s in range(T)]
    return Schedule(keep=keep, block_names=graph.block_names, consumers=graph.consumers)


# down_0 skipped at step 2 while up_1 (its skip-connection reader) computes; mid and up_0 skipped at 3
SKIPS = {1: [1], 2: [0, 2], 3: [2, 3]}


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m)
               and not hasattr(m, "_diffusers_hook") for m in model.modules())


def test_blocks_and_the_skip_connection_cascade(pipe, graph):
    assert graph.block_names == ["down_0", "down_1", "mid", "up_0", "up_1"]
    # the residual stack [stem, down_0, down_0, down_1]: up_0 pops (down_0, down_1), up_1 (stem, down_0)
    assert graph.consumers == [[1, 3, 4], [2, 3], [3], [4], [OUTPUT]]
    assert isinstance(block_graph(pipe.unet), SDUNetGraph)
    # up_0 reuses its backup: the mid block and down_1, read by nothing else computed, are not run
    assert executed_blocks(graph.consumers, [True, True, True, False, True]) == [True, False, False, False, True]


def test_the_sd15_unet_has_the_papers_nine_blocks():
    from diffusers import UNet2DConditionModel

    from diffprune.models.sd import SD15_UNET

    with torch.device("meta"):  # the real architecture, no memory, no weights
        unet = UNet2DConditionModel(**SD15_UNET)
    g = SDUNetGraph(unet)
    assert g.block_names == [f"down_{i}" for i in range(4)] + ["mid"] + [f"up_{i}" for i in range(4)]
    assert g.consumers[0] == [1, 7, 8] and g.consumers[3] == [4, 5] and g.consumers[-1] == [OUTPUT]


def test_graph_forward_equals_the_unet(pipe, graph):
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, text = torch.tensor([10, 900, 10, 900]), _text(pipe)
    with graph.conditioned(text):
        out = graph.forward(x, t, lambda k, compute: compute())
    assert torch.equal(out, pipe.unet(x, t, encoder_hidden_states=text).sample)
    assert _no_hooks(pipe.unet)


@pytest.mark.parametrize("g", [1.0, G])
def test_all_compute_schedule_equals_the_plain_guided_sampler_bit_for_bit(pipe, graph, g):
    text = _text(pipe, g=g)
    plain = sample_latents(GuidedSD(pipe.unet, text, g), pipe.scheduler, steps=T, seed=0)
    gated = sample_latents(SkipScheduleSD(pipe.unet, _schedule(graph), text, g), pipe.scheduler, steps=T, seed=0)
    assert torch.equal(gated, plain)
    assert torch.equal(decode(pipe.vae, gated), decode(pipe.vae, plain))


@pytest.mark.parametrize("g", [1.0, G])
def test_skipping_changes_samples_and_counted_macs_equal_the_prediction(pipe, graph, g):
    text, sched = _text(pipe, g=g), _schedule(graph, SKIPS)
    with MacCounter(pipe.unet) as counted:
        lat = sample_latents(SkipScheduleSD(pipe.unet, sched, text, g), pipe.scheduler, steps=T, seed=0)
    with MacCounter(pipe.unet) as full:
        plain = sample_latents(GuidedSD(pipe.unet, text, g), pipe.scheduler, steps=T, seed=0)
    assert not torch.allclose(lat, plain, atol=1e-4)
    tokens = text.shape[1]
    assert counted.total == guided_sd_schedule_macs(pipe.unet, sched, g, len(PROMPTS), tokens)
    assert full.total == guided_sd_schedule_macs(pipe.unet, _schedule(graph), g, len(PROMPTS), tokens)
    assert counted.total < full.total


def test_text_passes_through_the_cache_by_rows(pipe, graph):
    """Each image's backups are its own: a batch equals its images sampled one by one."""
    sched = _schedule(graph, SKIPS)
    both = sample_latents(SkipScheduleSD(pipe.unet, sched, _text(pipe), G), pipe.scheduler, steps=T, seed=0)
    noise = initial_noise(len(PROMPTS), (4, 8, 8), 0)
    alone = [trajectory(SkipScheduleSD(pipe.unet, sched, _text(pipe, [p]), G), pipe.scheduler, noise[i:i + 1], T,
                        clamp=False) for i, p in enumerate(PROMPTS)]
    # float tolerance: a batch of 1 and of 2 round matrix products differently (measured with one
    # thread: 1.2e-5 with this schedule and 1.6e-5 with every block computed, on latents up to 16)
    assert torch.allclose(both, torch.cat(alone), atol=1e-4, rtol=1e-5)
    swapped = sample_latents(SkipScheduleSD(pipe.unet, sched, _text(pipe, PROMPTS[::-1]), G), pipe.scheduler,
                             steps=T, seed=0)
    assert not torch.allclose(swapped, both, atol=1e-4)  # the prompts, not the rows, drive each image


def test_models_untouched_and_no_hooks_left(pipe, graph):
    before = {n: _state(m) for n, m in (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder))}
    decode(pipe.vae, sample_latents(SkipScheduleSD(pipe.unet, _schedule(graph, SKIPS), _text(pipe), G),
                                    pipe.scheduler, steps=T, seed=0))
    block_costs(graph, (4, 8, 8))
    for name, m in (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder)):
        assert _no_hooks(m), name
        after = _state(m)
        assert all(torch.equal(before[name][k], after[k]) for k in after), name


def test_schedule_from_scores_reaches_the_target_and_runs(pipe, graph):
    costs = block_costs(graph, (4, 8, 8))
    assert all(b > 0 for b in costs.blocks) and costs.full == costs.always + sum(costs.blocks)
    scores = torch.rand(T, len(graph.block_names), generator=torch.Generator().manual_seed(0))
    sched = schedule_from_scores(scores, graph, costs, target_ratio=0.6, tolerance=0.1)
    text = _text(pipe)
    with MacCounter(pipe.unet) as c:
        sample_latents(SkipScheduleSD(pipe.unet, sched, text, G), pipe.scheduler, steps=T, seed=0)
    full = guided_sd_schedule_macs(pipe.unet, _schedule(graph), G, len(PROMPTS), text.shape[1])
    assert c.total / full == pytest.approx(sched.macs_ratio, abs=1e-12)


def test_deepcache_runs_on_the_text_to_image_unet_at_its_counted_cost(pipe, graph):
    """DeepCache, the digits' baseline, on the SD UNet's graph: interval 1 is the plain guided sampler,
    a wider interval reuses the cached deep features between full steps and costs what it predicts."""
    from diffprune.pruning.dipgo import deepcache_schedule

    text = _text(pipe)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    plain = sample_latents(GuidedSD(pipe.unet, text, G), pipe.scheduler, steps=T, seed=0)
    one = deepcache_schedule(graph, T, 1, 0, shape)
    assert torch.equal(sample_latents(SkipScheduleSD(pipe.unet, one, text, G), pipe.scheduler, steps=T, seed=0), plain)
    sched = deepcache_schedule(graph, T, 2, 0, shape)
    assert sched.meta["cached"] == "up_0" and sched.macs_ratio < 1.0  # only down_0 and up_1 run between full steps
    with MacCounter(pipe.unet) as counted:
        lat = sample_latents(SkipScheduleSD(pipe.unet, sched, text, G), pipe.scheduler, steps=T, seed=0)
    assert counted.total == guided_sd_schedule_macs(pipe.unet, sched, G, len(PROMPTS), text.shape[1])
    assert not torch.allclose(lat, plain, atol=1e-4)
