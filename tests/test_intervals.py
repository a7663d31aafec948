"""Timestep intervals of the mixture of experts: gradient alignment, the exact segmentation, outlier rows,
routing by the boundaries."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffprune.config import ConfigError, IntervalsConfig
from diffprune.pruning.experts import (alignment_matrix, cutoff_curve, cuts_to_boundaries, objective, outlier_row,
                                       segment, steps_per_expert, timestep_gradients, timestep_grid, uniform_cuts)
from diffprune.sampling import ExpertMixture

SHAPE = (1, 8, 8)


def _images(n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_alignment_is_cosine_of_timestep_gradients_symmetric_with_unit_diagonal(tiny_unet, tiny_scheduler):
    ts = timestep_grid(1000, 4)
    assert ts == [124, 374, 624, 874]
    before = copy.deepcopy(tiny_unet.state_dict())
    kw = dict(batches=2, batch_size=4, seed=0)
    grads = timestep_gradients(tiny_unet, tiny_scheduler, _images(), ts, **kw)
    assert grads.shape == (4, sum(p.numel() for p in tiny_unet.parameters()))
    a = alignment_matrix(grads)
    assert torch.equal(a, a.T)
    assert torch.allclose(a.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert float(a.abs().max()) <= 1 + 1e-9
    assert float(a[0, 3]) == pytest.approx(float(F.cosine_similarity(grads[0], grads[3], dim=0)), abs=1e-5)
    assert float(a[0, 1]) < 1 - 1e-4, "different timesteps should not have identical gradients"
    # deterministic, and the teacher is left as it was (weights, no gradients)
    assert torch.equal(timestep_gradients(tiny_unet, tiny_scheduler, _images(), ts, **kw), grads)
    assert all(torch.equal(v, before[k]) for k, v in tiny_unet.state_dict().items())
    assert all(p.grad is None for p in tiny_unet.parameters())


def _brute_force(a: np.ndarray, k: int, min_size: int) -> tuple[tuple[int, ...], float]:
    g = a.shape[0]
    best: tuple[tuple[int, ...], float] = ((), -np.inf)
    for cuts in itertools.combinations(range(1, g), k - 1):
        sizes = np.diff([0, *cuts, g])
        if sizes.min() < min_size:
            continue
        j = objective(a, cuts)
        if j > best[1]:
            best = (tuple(cuts), j)
    return best


def test_dp_segmentation_equals_brute_force_on_random_matrices():
    rng = np.random.default_rng(0)
    for trial in range(40):
        g = int(rng.integers(4, 10))
        x = rng.normal(size=(g, 5))
        a = np.corrcoef(x) if trial % 2 else rng.uniform(-1, 1, size=(g, g))
        a = (a + a.T) / 2
        np.fill_diagonal(a, 1.0)
        for k in range(1, min(g, 5) + 1):
            for min_size in (1, 2):
                if k * min_size > g:
                    continue
                seg = segment(a, k, min_size)
                cuts, j = _brute_force(a, k, min_size)
                assert seg.cuts == cuts, (trial, k, min_size)
                assert seg.objective == pytest.approx(j, abs=1e-12)
        # K = 2 is the paper's cutoff: the argmax of J(t1)
        assert segment(a, 2).cuts == (int(np.argmax(cutoff_curve(a))) + 1,)


def test_dp_recovers_planted_unequal_clusters_that_uniform_misses():
    sizes = [2, 7, 3]
    g = sum(sizes)
    a = np.full((g, g), 0.1)
    start = 0
    for s in sizes:
        a[start:start + s, start:start + s] = 0.9
        start += s
    np.fill_diagonal(a, 1.0)
    seg = segment(a, 3)
    assert seg.cuts == (2, 9)
    assert seg.objective > objective(a, uniform_cuts(g, 3)) + 0.05
    assert cuts_to_boundaries(seg.cuts, 1000, g) == [2 * 1000 // 12, 9 * 1000 // 12]


def test_outlier_row_finds_a_planted_anti_aligned_row_among_aligned_neighbours():
    g = 8
    a = np.full((g, g), 0.5)
    a[5, :] = a[:, 5] = -0.6  # one grid point anti-aligned with every other
    np.fill_diagonal(a, 1.0)
    ts = list(range(25, 1000, 125))
    row = outlier_row(a, ts)
    assert row["timestep"] == ts[5]
    assert row["mean_alignment"] == pytest.approx(-0.6)
    # a neighbour: 6 other points at 0.5 and the outlier at -0.6, over its 7 off-diagonal entries
    assert row["neighbours_mean_alignment"] == pytest.approx((6 * 0.5 - 0.6) / 7)


def test_interval_config_rejects_more_intervals_than_grid_points():
    with pytest.raises(ConfigError, match="intervals.k"):
        IntervalsConfig(grid=4, k=3, min_size=2)


class _Const(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float(self.k))


def test_every_timestep_is_routed_to_exactly_one_expert():
    grid, T = 10, 1000
    cuts = segment(np.eye(grid) * 0.5 + 0.5, 4).cuts
    bounds = cuts_to_boundaries(cuts, T, grid)
    edges = [0, *bounds, T]
    mixture = ExpertMixture([_Const(k) for k in range(4)], bounds)
    x = torch.zeros(2, *SHAPE)
    for t in range(T):
        owners = [k for k in range(4) if edges[k] <= t < edges[k + 1]]
        assert len(owners) == 1, t
        assert mixture.expert_index(t) == owners[0]
        out = mixture(x, torch.full((2,), t), step=0)
        assert torch.all(out == owners[0])
    # each grid point lies in the interval of its own segment
    for k, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, grid])):
        assert all(mixture.expert_index(t) == k for t in timestep_grid(T, grid)[lo:hi])
    assert steps_per_expert(list(range(999, -1, -20)), bounds) == [
        sum(edges[k] <= t < edges[k + 1] for t in range(999, -1, -20)) for k in range(4)]
