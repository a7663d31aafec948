"""DeepCache as DiP-GO's baseline: its schedule's structure, its MACs, and DeepCache at a budget (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch

from diffprune.metrics.cost import MacCounter
from diffprune.pruning.dipgo import SkipScheduleDenoiser, block_costs, deepcache_for_macs, deepcache_schedule, schedule_macs
from diffprune.sampling import ModelDenoiser, sample

from .test_dipgo import SHAPE, T, ddim, model, sched_config  # noqa: F401 (fixtures)


def test_deepcache_schedule_structure(model):
    """DeepCache recomputes the shallowest branch on the cached output of the up block before it."""
    s = deepcache_schedule(model, T, interval=3, branch=0, sample_shape=SHAPE)
    ex = s.executed()
    assert ex[0] == ex[3] == [True] * 7
    # branch 0: down_0 and up_2 recomputed, up_1's output (the features entering up_2) reused
    assert ex[1] == ex[2] == [True, False, False, False, False, False, True]
    assert s.meta["cached"] == "up_1" and s.keep[1] == [True, True, True, True, True, False, True]
    # the deeper branches: up_0's output entering up_1, then the mid block's entering up_0
    deeper = deepcache_schedule(model, T, interval=3, branch=1, sample_shape=SHAPE)
    assert deeper.meta["cached"] == "up_0"
    assert deeper.executed()[1] == [True, True, False, False, False, True, True]
    assert deepcache_schedule(model, T, 3, 2, SHAPE).meta["cached"] == "mid"
    assert s.macs_ratio < deeper.macs_ratio < 1.0
    with pytest.raises(ValueError, match="branch = 3"):
        deepcache_schedule(model, T, 2, 3, SHAPE)


@pytest.mark.parametrize("target", [0.9, 0.6, 0.5, 0.34, 0.25])
def test_deepcache_at_a_budget_lands_on_it_with_a_bounded_interval(model, ddim, target):
    """DeepCache at a MACs budget: interval <= 5, and where the shallow branch's cost puts the target
    out of the base trajectory's reach, on fewer steps; the MACs counted while sampling are the
    target's within 2% (a 30-step base trajectory has the granularity to get there)."""
    base = 30
    s = deepcache_for_macs(model, base, target, SHAPE)
    steps = s.meta["steps"]
    assert s.method == "deepcache" and 2 <= s.meta["interval"] <= 5 and len(s.keep) == steps <= base
    with MacCounter(model) as counter:
        sample(SkipScheduleDenoiser(model, s), ddim, num_images=1, sample_shape=SHAPE, steps=steps)
    counted = counter.total / (block_costs(model, SHAPE).full * base)
    assert abs(counted - target) <= 0.02 * target, (counted, s.meta)
    assert abs(s.meta["ratio_gap"] - (counted - target)) < 1e-9
    on_base = [deepcache_schedule(model, base, n, b, SHAPE).macs_ratio for n in range(1, 6) for b in range(3)]
    # the whole base trajectory is used whenever one of its own settings lands within 1%
    assert (steps == base) == any(abs(r - target) <= 0.01 * target for r in on_base)
    if min(on_base) > target * 1.01:  # below the shallow branch's reach: fewer steps
        assert steps < base
    with pytest.raises(ValueError, match="target_ratio = 0"):
        deepcache_for_macs(model, base, 0.0, SHAPE)


def test_deepcache_never_reuses_the_whole_prediction(model):
    """No DeepCache schedule caches the last up block (that would be 'fewer steps')."""
    for branch in range(3):
        s = deepcache_schedule(model, T, interval=2, branch=branch, sample_shape=SHAPE)
        assert all(row[-1] for row in s.executed())


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_deepcache_macs_counted_equal_predicted(model, ddim, branch):
    s = deepcache_schedule(model, T, interval=2, branch=branch, sample_shape=SHAPE)
    with MacCounter(model) as counter:
        sample(SkipScheduleDenoiser(model, s), ddim, num_images=1, sample_shape=SHAPE, steps=T)
    assert counter.total == schedule_macs(model, s, SHAPE)
    assert counter.total == round(s.macs_ratio * block_costs(model, SHAPE).full * T)


def test_deepcache_interval_1_is_the_teacher_bit_for_bit(model, ddim):
    kw = dict(num_images=3, sample_shape=SHAPE, steps=T, seed=2)
    s = deepcache_schedule(model, T, interval=1, branch=0, sample_shape=SHAPE)
    assert s.macs_ratio == 1.0
    assert torch.equal(sample(SkipScheduleDenoiser(model, s), ddim, **kw), sample(ModelDenoiser(model), ddim, **kw))
