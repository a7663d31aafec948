"""DiP-GO on the class-conditional DiT: residual-update reuse, guidance through the cache, MACs (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch

from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import GuidedDiT, build_dit_pipeline, decode, sample_latents
from diffprune.pruning.dipgo import OUTPUT, DiTGraph, Schedule, SkipScheduleDiT, block_costs, block_graph
from diffprune.pruning.dipgo import guided_schedule_macs, save_heatmap, schedule_from_scores
from diffprune.sampling import initial_noise, trajectory

T = 4
LABELS = [3, 7]
G = 2.5


@pytest.fixture(scope="module")
def pipe():
    return build_dit_pipeline(seed=0)


@pytest.fixture(scope="module")
def graph(pipe):
    return DiTGraph(pipe.transformer)


def _keep(n_blocks: int, skips: dict[int, list[int]]) -> list[list[bool]]:
    return [[k not in skips.get(s, []) for k in range(n_blocks)] for s in range(T)]


def _schedule(graph, skips=None) -> Schedule:
    return Schedule(keep=_keep(len(graph.block_names), skips or {}), block_names=graph.block_names,
                    consumers=graph.consumers)


# block 0 (whose label embedding the head also calls) and the last block are skipped somewhere
SKIPS = {1: [0, 2], 2: [1], 3: [0, 1, 2]}


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m)
               and not hasattr(m, "_diffusers_hook") for m in model.modules())


def test_graph_blocks_consumers_and_dispatch(pipe, graph):
    assert graph.block_names == ["block_0", "block_1", "block_2"]
    assert graph.consumers == [[OUTPUT]] * 3  # the residual stream reads every update
    assert isinstance(block_graph(pipe.transformer), DiTGraph)


def test_graph_forward_equals_model(pipe, graph):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 900]), torch.tensor([3, 1000])
    with graph.conditioned(y):
        out = graph.forward(x, t, lambda k, compute: compute())
    assert torch.equal(out, pipe.transformer(x, timestep=t, class_labels=y).sample)
    assert _no_hooks(pipe.transformer)


def test_a_reused_block_adds_its_last_update_to_the_current_stream(pipe):
    """Step 1 reuses block 1: its output = its current input + (output - input) of step 0."""
    block = pipe.transformer.transformer_blocks[1]
    seen = []
    handle = block.register_forward_hook(lambda m, inp, out: seen.append((inp[0].clone(), out.clone())))
    try:
        den = SkipScheduleDiT(pipe.transformer, _schedule(DiTGraph(pipe.transformer), {1: [1]}), LABELS, G)
        sample_latents(den, pipe.scheduler, steps=T, seed=0)
    finally:
        handle.remove()
    (in0, out0), (in1, out1) = seen[:2]
    assert not torch.equal(in1, in0)  # the stream upstream changed between the steps ...
    assert torch.equal(out1, in1 + (out0 - in0))  # ... and the reused update lands on it
    assert in0.shape[0] == 2 * len(LABELS)  # guided: the doubled batch goes through the cache


@pytest.mark.parametrize("g", [1.0, G])
def test_all_compute_schedule_equals_plain_guided_sampler(pipe, graph, g):
    plain = sample_latents(GuidedDiT(pipe.transformer, LABELS, g), pipe.scheduler, steps=T, seed=0)
    gated = sample_latents(SkipScheduleDiT(pipe.transformer, _schedule(graph), LABELS, g), pipe.scheduler,
                           steps=T, seed=0)
    assert torch.equal(gated, plain)
    assert torch.equal(decode(pipe.vae, gated), decode(pipe.vae, plain))


@pytest.mark.parametrize("g", [1.0, G])
def test_skipping_schedule_changes_samples_and_its_counted_macs_equal_the_prediction(pipe, graph, g):
    sched = _schedule(graph, SKIPS)
    den = SkipScheduleDiT(pipe.transformer, sched, LABELS, g)
    with MacCounter(pipe.transformer) as counted:
        lat = sample_latents(den, pipe.scheduler, steps=T, seed=0)
    with MacCounter(pipe.transformer) as full:
        plain = sample_latents(GuidedDiT(pipe.transformer, LABELS, g), pipe.scheduler, steps=T, seed=0)
    assert not torch.allclose(lat, plain, atol=1e-3)
    assert counted.total == guided_schedule_macs(pipe.transformer, sched, g, num_images=len(LABELS))
    assert full.total == guided_schedule_macs(pipe.transformer, _schedule(graph), g, num_images=len(LABELS))
    assert counted.total < full.total


def test_conditioning_passes_through_the_cache_by_rows(pipe, graph):
    """Each image's skipped updates are its own: a batch equals its images sampled one by one."""
    sched = _schedule(graph, SKIPS)
    both = sample_latents(SkipScheduleDiT(pipe.transformer, sched, LABELS, G), pipe.scheduler, steps=T, seed=0)
    noise = initial_noise(len(LABELS), (4, 8, 8), 0)  # the batch's start noise; row i alone below
    alone = [trajectory(SkipScheduleDiT(pipe.transformer, sched, [y], G), pipe.scheduler, noise[i : i + 1], T,
                        clamp=False) for i, y in enumerate(LABELS)]
    # float tolerance: a batch of 1 and of 2 round matrix products differently (measured: 2e-5 on
    # latents of magnitude ~75, the same with every block computed)
    assert torch.allclose(both, torch.cat(alone), atol=1e-4, rtol=1e-5)
    swapped = sample_latents(SkipScheduleDiT(pipe.transformer, sched, LABELS[::-1], G), pipe.scheduler,
                             steps=T, seed=0)
    assert not torch.allclose(swapped, both, atol=1e-3)  # the labels, not the row, drive each image


def test_models_untouched_and_no_hooks_left(pipe, graph):
    before_t, before_v = _state(pipe.transformer), _state(pipe.vae)
    den = SkipScheduleDiT(pipe.transformer, _schedule(graph, SKIPS), LABELS, G)
    decode(pipe.vae, sample_latents(den, pipe.scheduler, steps=T, seed=0))
    block_costs(graph, (4, 8, 8))
    assert _no_hooks(pipe.transformer) and _no_hooks(pipe.vae)
    after_t, after_v = _state(pipe.transformer), _state(pipe.vae)
    assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)
    assert all(torch.equal(before_v[k], after_v[k]) for k in before_v)


def test_block_costs_sum_to_one_full_call(pipe, graph):
    costs = block_costs(graph, (4, 8, 8))
    x, t = torch.zeros(1, 4, 8, 8), torch.ones(1, dtype=torch.long)
    with MacCounter(pipe.transformer) as c:
        graph.call_model(x, t)
    assert costs.full == c.total and all(b > 0 for b in costs.blocks) and costs.always > 0
    assert len(set(costs.blocks)) == 1  # identical blocks cost the same


def test_schedule_from_scores_on_dit_reaches_target_and_runs(pipe, graph, tmp_path):
    costs = block_costs(graph, (4, 8, 8))
    scores = torch.rand(T, 3, generator=torch.Generator().manual_seed(0))
    sched = schedule_from_scores(scores, graph, costs, target_ratio=0.6, tolerance=0.1)
    assert abs(sched.macs_ratio - 0.6) <= 0.1
    den = SkipScheduleDiT(pipe.transformer, sched, LABELS, G)
    with MacCounter(pipe.transformer) as c:
        sample_latents(den, pipe.scheduler, steps=T, seed=0)
    full = guided_schedule_macs(pipe.transformer, _schedule(graph), G, num_images=len(LABELS))
    assert c.total / full == pytest.approx(sched.macs_ratio, abs=1e-12)
    png = save_heatmap(sched, tmp_path / "heatmap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_of_another_model_or_length_is_refused(pipe, graph):
    with pytest.raises(ValueError, match="do not match"):
        SkipScheduleDiT(pipe.transformer, Schedule(keep=[[True]], block_names=["down_0"]), LABELS, G)
    den = SkipScheduleDiT(pipe.transformer, _schedule(graph), LABELS, G)
    with pytest.raises(ValueError, match="runs 2 steps but the schedule has 4"):
        sample_latents(den, pipe.scheduler, steps=2, seed=0)


def test_soft_gates_match_hard_forward_and_reach_a_skipped_gate(pipe, graph):
    """The SuperNet path of pruner training: 0/1 soft gates give the hard step's values, and a
    reusing block's gate gets a gradient (<dL/d out, computed - backup>)."""
    from diffprune.pruning.dipgo import GatedRunner

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 1000])
    hard, soft = GatedRunner(graph), GatedRunner(graph)
    gates = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    with graph.conditioned(y):
        for r in (hard, soft):
            r.step_hard(x, torch.tensor([900, 900]), [True] * 3)
        x1 = x * 0.9
        ref = hard.step_hard(x1, torch.tensor([600, 600]), [True, False, True])
        out = soft.step_soft(x1, torch.tensor([600, 600]), gates)
    assert torch.allclose(out, ref, atol=1e-5)  # h + (1 * delta) vs the block's own output: rounding only
    out.square().sum().backward()
    pipe.transformer.zero_grad(set_to_none=True)  # the shared teacher keeps no gradients
    assert gates.grad is not None and gates.grad[1] != 0
    assert _no_hooks(pipe.transformer)
