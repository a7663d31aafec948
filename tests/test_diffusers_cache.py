"""diffusers' FirstBlockCache on the DiT as a baseline: installed and removed cleanly, exact at threshold 0,
cheaper as the threshold grows, searched to a MACs target."""

from __future__ import annotations

import pytest
import torch

from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import GuidedDiT, build_dit_pipeline, sample_latents
from diffprune.pruning.dipgo.diffusers_cache import first_block_cache, first_block_cache_for_macs, trajectory_macs

STEPS, LABELS, G = 10, [3, 7], 2.5


@pytest.fixture(scope="module")
def pipe():
    return build_dit_pipeline(seed=0)


def _no_hooks(model) -> bool:
    return all("forward" not in vars(m) and not hasattr(m, "_diffusers_hook") for m in model.modules())


def _run(pipe):
    return lambda den: sample_latents(den, pipe.scheduler, steps=STEPS, seed=0)


def test_threshold_zero_is_the_plain_sampler_and_no_hook_stays(pipe):
    den = GuidedDiT(pipe.transformer, LABELS, G)
    plain = _run(pipe)(den)
    with first_block_cache(pipe.transformer, 0.0) as wrap:
        cached = _run(pipe)(wrap(den))
        again = _run(pipe)(wrap(den))  # the cached state is reset at each trajectory's start
    assert torch.equal(cached, plain) and torch.equal(again, plain)
    assert _no_hooks(pipe.transformer)
    assert torch.equal(_run(pipe)(den), plain)


def test_a_higher_threshold_runs_fewer_blocks_and_changes_samples(pipe):
    den = GuidedDiT(pipe.transformer, LABELS, G)
    full = trajectory_macs(_run(pipe), den, pipe.transformer)
    with first_block_cache(pipe.transformer, 10.0) as wrap:  # everything after step 0 is skipped
        with MacCounter(pipe.transformer) as c:
            lat = _run(pipe)(wrap(den))
    assert c.total < 0.6 * full
    assert not torch.allclose(lat, _run(pipe)(den), atol=1e-4)
    assert _no_hooks(pipe.transformer)


def test_threshold_search_meets_a_reachable_target(pipe):
    den = GuidedDiT(pipe.transformer, LABELS, G)
    full = trajectory_macs(_run(pipe), den, pipe.transformer)
    with first_block_cache(pipe.transformer, 10.0) as wrap:
        floor = trajectory_macs(_run(pipe), wrap(den), pipe.transformer) / full
    target = (1 + floor) / 2
    found = first_block_cache_for_macs(_run(pipe), den, pipe.transformer, target, tolerance=0.1)
    assert found.within and abs(found.macs_ratio - target) <= 0.1 * target and found.threshold > 0
    with pytest.raises(ValueError, match="target_ratio = 0"):
        first_block_cache_for_macs(_run(pipe), den, pipe.transformer, 0)
    with pytest.raises(ValueError, match="threshold = -1"):
        with first_block_cache(pipe.transformer, -1):
            pass
