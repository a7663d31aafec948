"""Baseline skip schedules to compare DiP-GO with at equal trajectory MACs: DeepCache and random.

* :func:`deepcache_schedule` - DeepCache (Ma et al., CVPR 2024): a full step every ``interval``
  steps; in between only the shallow branch runs (the first down blocks and the last up blocks),
  on the cached deep features entering it, the output of the up block before it.
* :func:`deepcache_for_macs` - DeepCache at a MACs budget: the interval and branch (and, below the
  shallow branch's cost, fewer steps) that land on it.
* :func:`random_schedule` - uniformly random keep scores thresholded to a MACs ratio.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .graph import BlockGraph, block_graph
from .schedule import Schedule, block_costs, gate_table_macs, schedule_from_scores


def deepcache_cached_block(graph: BlockGraph, branch: int) -> int:
    """The block whose output DeepCache reuses for skip branch ``branch`` (0 = the shallowest).

    Branch b recomputes the first ``b + 1`` down blocks and the last ``b + 1`` up blocks; the deep
    features entering the up block at depth b (0 = the last, full-resolution one) are the output of
    the block just before it in execution order (the previous up block, or the mid block for the
    deepest branch), which is cached. Raises ``ValueError`` for a branch outside ``[0, L - 1]``.
    """
    ups = [i for i, n in enumerate(graph.block_names) if n.startswith("up_")]
    if not 0 <= branch < len(ups):
        raise ValueError(f"branch = {branch}: expected in [0, {len(ups) - 1}] (skip-branch depth, 0 = shallowest)")
    entry = ups[len(ups) - 1 - branch]  # the up block the cached features enter
    cached = entry - 1
    if cached < 0 or entry not in graph.consumers[cached]:
        raise NotImplementedError(f"DeepCache: block {graph.block_names[entry]!r} has no main-path producer before it")
    return cached


def deepcache_schedule(
    model: nn.Module | BlockGraph,
    num_steps: int,
    interval: int,
    branch: int,
    sample_shape: Sequence[int],
) -> Schedule:
    """DeepCache's uniform schedule ``[num_steps x N]`` on a UNet graph.

    Steps ``0, interval, 2 * interval, ...`` run the full model; at the others the block named by
    :func:`deepcache_cached_block` reuses its output from the last full step, so only the shallow
    branch (the up blocks after it and the down blocks feeding their skip connections) is computed.
    ``interval = 1`` is the full model.
    """
    graph = block_graph(model)
    if interval < 1:
        raise ValueError(f"interval = {interval}: expected >= 1")
    cached = deepcache_cached_block(graph, branch)
    N = len(graph.block_names)
    keep = [[True] * N if t % interval == 0 else [k != cached for k in range(N)] for t in range(num_steps)]
    costs = block_costs(graph, sample_shape)
    ratio = gate_table_macs(graph.consumers, costs, keep) / (costs.full * num_steps)
    return Schedule(
        keep=keep, block_names=graph.block_names, consumers=graph.consumers, macs_ratio=ratio,
        method="deepcache", meta={"interval": interval, "branch": branch, "cached": graph.block_names[cached]},
    )


MAX_INTERVAL = 5
"""The widest DeepCache interval the equal-MACs search uses: DeepCache's own DDPM/CIFAR-10 setting
(``--cache_interval 5`` on 100 DDIM steps). Wider intervals reuse features from too far back: on
the 50-step digits teacher, interval 50 (the only one reaching 0.37x) gave FID 88, PSNR 9.4 dB."""


def deepcache_for_macs(
    model: nn.Module | BlockGraph,
    base_steps: int,
    target_ratio: float,
    sample_shape: Sequence[int],
    *,
    max_interval: int = MAX_INTERVAL,
    tolerance: float = 0.01,
) -> Schedule:
    """DeepCache at ``target_ratio`` of a ``base_steps``-step trajectory's MACs, as DeepCache is used
    at a budget: a uniform (interval, branch) schedule on ``S <= base_steps`` sampling steps.

    Every (S, interval <= ``max_interval``, branch) is considered. Among those within ``tolerance``
    (relative) of the target the most DeepCache-like wins: the most steps, then the smallest
    interval, then the shallowest branch; when none is within it, the closest. The shallow
    branch's own cost bounds DeepCache from below (on the 8 x 8 digits UNet about 36 % of a full
    step), so below ~0.49x of the base trajectory fewer steps are needed: DeepCache's paper pairs
    it with reduced DDIM steps the same way. ``meta`` holds ``steps`` (S: sample with this many
    steps), ``interval``, ``branch`` and ``ratio_gap`` (the distance to the target, as a ratio of
    the base trajectory). ``schedule.macs_ratio`` is of the S-step trajectory.
    """
    graph = block_graph(model)
    if not 0.0 < target_ratio <= 1.0:
        raise ValueError(f"target_ratio = {target_ratio}: expected in (0, 1]")
    n_up = sum(n.startswith("up_") for n in graph.block_names)
    # a cached step's cost (of a full step) per branch, from a 2-step schedule: (1 + r) / 2
    reuse = [2.0 * deepcache_schedule(graph, 2, 2, b, sample_shape).macs_ratio - 1.0 for b in range(n_up)]
    candidates = []  # (|gap|, -steps, interval, branch)
    for steps in range(1, base_steps + 1):
        for interval in range(1, max_interval + 1):
            full = -(-steps // interval)  # steps 0, interval, 2 interval, ... run the whole model
            for branch, r in enumerate(reuse):
                macs = (full + (steps - full) * r) / base_steps
                candidates.append((abs(macs - target_ratio), -steps, interval, branch))
    within = [c for c in candidates if c[0] <= tolerance * target_ratio]
    _, neg_steps, interval, branch = min(within, key=lambda c: c[1:]) if within else min(candidates)
    steps = -neg_steps
    best = deepcache_schedule(graph, steps, interval, branch, sample_shape)
    best.target_ratio = target_ratio * base_steps / steps
    best.meta.update(steps=steps, ratio_gap=best.macs_ratio * steps / base_steps - target_ratio)
    return best


def random_schedule(
    model: nn.Module | BlockGraph,
    num_steps: int,
    target_ratio: float,
    sample_shape: Sequence[int],
    *,
    seed: int = 0,
    tolerance: float = 0.0125,
) -> Schedule:
    """Uniformly random gates, thresholded to ``target_ratio`` like DiP-GO's scores."""
    graph = block_graph(model)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((num_steps, len(graph.block_names)), generator=g)
    s = schedule_from_scores(scores, graph, block_costs(graph, sample_shape), target_ratio, tolerance, method="random")
    s.meta["seed"] = seed
    return s
