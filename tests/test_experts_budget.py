"""Mixture of efficient experts: the agent's own budget, the split of fine-tuning steps, the choice of K."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from diffprune.config import ConfigError, IntervalsConfig, Params, PruneExpertsConfig
from diffprune.pruning.experts import auto_k, candidates, objective, steps_per_expert, train_router
from diffprune.stages.experts import _intervals_doc, expert_steps, sampling_timesteps, split_steps

from .test_experts import _images, ordered  # noqa: F401  (the fixture)


# ----------------------------------------------------------------------------- the agent's own budget

def test_the_agent_meets_the_budget_on_its_own_the_adjustment_moves_it_little(ordered, tiny_scheduler):
    model, space = ordered
    experts = [model, copy.deepcopy(model)]
    kw = dict(train_steps=40, lr=0.1, resource_weight=2.0, tau=0.5, hidden=8, batch_size=4, seed=0, distill=1.0)
    full = space.full_macs() * 8
    for budget in (0.6, 0.8):
        r = train_router(experts, space, [(0, 500), (500, 1000)], [3, 5], _images(), tiny_scheduler, budget=budget,
                         **kw)
        assert r.learned_ratio == pytest.approx(sum(space.macs(c) * n for c, n in zip(r.learned, [3, 5])) / full)
        assert abs(r.learned_ratio - budget) <= 0.05 * budget, (budget, r.learned_ratio)
        assert abs(r.ratio - r.learned_ratio) <= 0.05 * budget and r.ratio <= budget, (budget, r.ratio)
        assert r.learned != [space.full()] * 2, "the agent itself pruned"


def test_the_resource_loss_is_the_log_ratio_whose_pull_does_not_fade_at_the_budget():
    import torch

    from diffprune.pruning.experts import resource_loss

    r = torch.tensor([0.45, 0.5, 0.55], dtype=torch.float64, requires_grad=True)
    loss = resource_loss(r, 0.5)
    assert torch.allclose(loss, torch.log(torch.maximum(r, torch.tensor(0.5)) / torch.minimum(r, torch.tensor(0.5))))
    loss.sum().backward()
    assert torch.allclose(r.grad, torch.tensor([-1 / 0.45, 0.0, 1 / 0.55], dtype=torch.float64))
    sq = torch.tensor(0.55, requires_grad=True)
    resource_loss(sq, 0.5, "squared").backward()
    assert float(sq.grad) == pytest.approx(2 * (0.55 / 0.5 - 1) / 0.5, rel=1e-5)
    assert float(sq.grad) < float(r.grad[2]) / 4, "the squared pull fades near the budget"
    with pytest.raises(ValueError, match="router.resource_loss = 'l1'"):
        resource_loss(r, 0.5, "l1")


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
