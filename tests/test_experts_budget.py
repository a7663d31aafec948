"""Mixture of efficient experts: the agent's own budget, the split of fine-tuning steps, the choice of K."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from diffprune.config import ConfigError, IntervalsConfig, Params, PruneExpertsConfig
from diffprune.pruning.experts import auto_k, candidates, objective, steps_per_expert, train_router
from diffprune.stages.experts import _intervals_doc, expert_steps, sampling_timesteps, split_steps

from .test_experts import _images, ordered  # noqa: F401  (the fixture)


# ----------------------------------------------------------------------------- fine-tuning steps

@pytest.mark.parametrize("total, served, least", [(1000, [43, 7], 100), (1000, [15, 35], 1), (7, [1, 1, 1], 2),
                                                  (100, [50, 0, 50], 10), (10, [0, 0], 1), (1000, [1, 98, 1], 150)])
def test_split_by_steps_served_sums_to_the_total_keeps_the_minimum_and_is_proportional(total, served, least):
    out = split_steps(total, served, least)
    assert sum(out) == total and min(out) >= least
    above = [k for k in range(len(served)) if out[k] > least]
    for a in above:  # above the minimum, the shares follow the steps served up to rounding
        for b in above:
            assert abs(out[a] * served[b] - out[b] * served[a]) <= served[a] + served[b]


def test_split_by_steps_served_matches_the_benchmark_split_and_refuses_an_impossible_minimum():
    assert split_steps(1000, [43, 7], 100) == [860, 140]
    assert split_steps(1000, [1, 98, 1], 150) == [150, 700, 150]
    with pytest.raises(ValueError, match="min_steps=600"):
        split_steps(1000, [1, 1], 600)
    equal = PruneExpertsConfig(fraction=0.5)
    served = PruneExpertsConfig(fraction=0.5, split="served")
    assert [expert_steps("prune_experts", equal, 1000, [43, 7], k) for k in (0, 1)] == [500, 500]
    assert [expert_steps("prune_experts", served, 1000, [43, 7], k) for k in (0, 1)] == [860, 140]
    with pytest.raises(ConfigError, match="prune_experts.min_share = 0.6"):
        expert_steps("prune_experts", PruneExpertsConfig(split="served", min_share=0.6), 1000, [43, 7], 0)


# ----------------------------------------------------------------------------- K and steps served

def _planted(sizes: list[int], seed: int = 0) -> np.ndarray:
    """An alignment matrix with blocks of ``sizes``: 0.9 inside a block, 0.2 across, a little noise."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    a = np.where(labels[:, None] == labels[None, :], 0.9, 0.2)
    noise = np.random.default_rng(seed).normal(0, 0.02, a.shape)
    a = a + (noise + noise.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def test_auto_k_picks_the_planted_number_of_blocks_and_their_cuts():
    a = _planted([3, 9, 8])
    segs = candidates(a, 6)
    assert [len(s.cuts) + 1 for s in segs] == [1, 2, 3, 4, 5, 6]
    assert all(x.objective <= y.objective + 1e-12 for x, y in zip(segs, segs[1:])), "J(K) never falls"
    assert auto_k(segs, 0.03) == 3 and segs[2].cuts == (3, 12)
    assert auto_k(candidates(_planted([20]), 6), 0.03) == 1, "one block: one interval"
    assert auto_k(candidates(_planted([10, 10]), 5), 0.03) == 2


def test_intervals_doc_shows_j_and_the_sampling_steps_of_every_interval_for_every_k(tiny_scheduler):
    p = Params()
    ts = sampling_timesteps(dict(tiny_scheduler.config), p)
    assert len(ts) == p.evaluate.steps
    a = _planted([3, 9, 8])
    doc = _intervals_doc(a, IntervalsConfig(k="auto"), 1000, ts)
    assert doc["k"] == 3 and doc["boundaries"] == [150, 600] and doc["k_rule"].startswith("auto")
    assert [c["k"] for c in doc["candidates"]] == list(range(1, 7))
    for c in doc["candidates"]:
        assert sum(c["steps_served"]) == p.evaluate.steps
        edges = [0, *c["boundaries"], 1000]
        assert c["steps_served"] == [sum(lo <= t < hi for t in ts) for lo, hi in zip(edges[:-1], edges[1:])]
    assert doc["steps_served"] == doc["candidates"][2]["steps_served"] == steps_per_expert(ts, [150, 600])
    assert doc["objective"] == pytest.approx(objective(a, [3, 12]))
    fixed = _intervals_doc(a, IntervalsConfig(k=2), 1000, ts)
    assert fixed["k"] == 2 and fixed["steps_served"] == fixed["candidates"][1]["steps_served"]
