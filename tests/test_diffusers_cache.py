"""diffusers' FirstBlockCache and TaylorSeer on the DiT as baselines: installed and removed cleanly,
exact at threshold 0 / interval 1, cheaper as they skip more, searched to a MACs target."""

from __future__ import annotations

import pytest
import torch

from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import GuidedDiT, build_dit_pipeline, sample_latents
from diffprune.pruning.dipgo.diffusers_cache import (first_block_cache, first_block_cache_for_macs, taylorseer_cache,
                                                     taylorseer_for_macs, trajectory_macs)

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


def test_taylorseer_at_interval_one_is_the_plain_sampler_longer_intervals_compute_less(pipe):
    den = GuidedDiT(pipe.transformer, LABELS, G)
    plain = _run(pipe)(den)
    full = trajectory_macs(_run(pipe), den, pipe.transformer)
    with taylorseer_cache(pipe.transformer, 1, 1) as wrap:
        assert torch.equal(_run(pipe)(wrap(den)), plain)
    assert _no_hooks(pipe.transformer)
    ratios = []
    for interval in (2, 4):
        with taylorseer_cache(pipe.transformer, interval, 2) as wrap:
            with MacCounter(pipe.transformer) as c:
                lat = _run(pipe)(wrap(den))
            assert torch.equal(_run(pipe)(wrap(den)), lat)  # the series is reset at each trajectory's start
        ratios.append(c.total / full)
        assert not torch.allclose(lat, plain, atol=1e-4)
    assert 1.0 > ratios[0] > ratios[1]
    assert _no_hooks(pipe.transformer)


def test_taylorseer_search_meets_a_reachable_target_and_bad_settings_are_refused(pipe):
    den = GuidedDiT(pipe.transformer, LABELS, G)
    found = taylorseer_for_macs(_run(pipe), den, pipe.transformer, 0.5, tolerance=0.05, intervals=range(2, 5),
                                warmups=range(1, 4), orders=(1, 2))
    assert found.within and abs(found.macs_ratio - 0.5) <= 0.05 * 0.5 and found.probe_mse is not None
    full = trajectory_macs(_run(pipe), den, pipe.transformer)
    with taylorseer_cache(pipe.transformer, found.cache_interval, found.warmup, found.max_order) as wrap:
        assert trajectory_macs(_run(pipe), wrap(den), pipe.transformer) == pytest.approx(found.macs_ratio * full)
    # no setting lands exactly on an odd target: the cheapest at or above it, never a cheaper one
    grid = dict(intervals=range(2, 5), warmups=range(1, 4), orders=(1,))
    off = taylorseer_for_macs(_run(pipe), den, pipe.transformer, 0.513, tolerance=0.0, **grid)
    assert not off.within and off.probe_mse is None and off.macs_ratio > 0.513
    for bad, match in (((0, 1), "cache_interval = 0"), ((2, 0), "warmup = 0"), ((2, 1, -1), "max_order = -1")):
        with pytest.raises(ValueError, match=match):
            with taylorseer_cache(pipe.transformer, *bad):
                pass
    assert _no_hooks(pipe.transformer)
