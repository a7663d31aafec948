"""Baseline skip schedules to compare DiP-GO with at equal trajectory MACs: DeepCache and random.

* :func:`deepcache_schedule` - DeepCache (Ma et al., CVPR 2024): a full step every ``interval``
  steps; in between only the shallow branch runs (the first down blocks and the last up blocks),
  on the cached deep features entering it, the output of the up block before it.
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


def deepcache_for_ratio(
    model: nn.Module | BlockGraph, num_steps: int, target_ratio: float, sample_shape: Sequence[int]
) -> Schedule:
    """The DeepCache (interval, branch) whose MACs ratio is closest to ``target_ratio`` (ties: the
    smaller interval, then the shallower branch). ``meta["ratio_gap"]`` is its distance to the target:
    the shallow branch's own cost bounds DeepCache's ratio from below (on the 8 x 8 digits UNet it
    is ~36 % of a full step, so 0.33 is out of reach)."""
    graph = block_graph(model)
    n_up = sum(n.startswith("up_") for n in graph.block_names)
    best: Optional[Schedule] = None
    for interval in range(1, num_steps + 1):
        for branch in range(n_up):
            s = deepcache_schedule(graph, num_steps, interval, branch, sample_shape)
            if best is None or abs(s.macs_ratio - target_ratio) < abs(best.macs_ratio - target_ratio):
                best = s
    assert best is not None
    best.target_ratio = target_ratio
    best.meta["ratio_gap"] = best.macs_ratio - target_ratio
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
