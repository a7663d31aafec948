"""Importance order of an elastic space's groups and heads, and the function-preserving reorder.

A sub-network of :mod:`.elastic` keeps a *prefix* of every unit's groups / heads. Scoring them
on one timestep interval (:func:`unit_importance`, first-order Taylor) and permuting the channels
into that order (:func:`reorder_units`) makes "keep ``k``" mean "keep the ``k`` most important".
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...training import Conditions, conditioned, denoising_loss, random_rows
from .elastic import MLP, RESNET, ElasticSpace, ElasticUnit, StreamUnit


def _coupled(model: nn.Module, unit: ElasticUnit) -> list[tuple[torch.Tensor, int]]:
    """``(parameter, channel dim)`` of every tensor whose channels are the unit's width channels."""
    m = model.get_submodule(unit.name)
    if unit.kind == RESNET:
        out = [(m.conv1.weight, 0), (m.time_emb_proj.weight, 0), (m.norm2.weight, 0), (m.conv2.weight, 1)]
        out += [(b, 0) for b in (m.conv1.bias, m.time_emb_proj.bias, m.norm2.bias) if b is not None]
        return out
    if unit.kind == MLP:  # a feed-forward's hidden channels: the first linear's outputs, the second's inputs
        first = m.net[0].proj
        return [(first.weight, 0), (m.net[2].weight, 1)] + ([(first.bias, 0)] if first.bias is not None else [])
    out = [(m.to_q.weight, 0), (m.to_k.weight, 0), (m.to_v.weight, 0), (m.to_out[0].weight, 1)]
    out += [(lin.bias, 0) for lin in (m.to_q, m.to_k, m.to_v) if lin.bias is not None]
    return out


def _stream_coupled(model: nn.Module, seg: StreamUnit) -> list[tuple[torch.Tensor, int, int]]:
    """``(parameter, channel dim, offset)`` of every tensor holding the segment's channels at ``offset``."""
    out = []
    for name in seg.producers:
        m = model.get_submodule(name)
        out += [(m.weight, 0, 0)] + ([(m.bias, 0, 0)] if m.bias is not None else [])
    for name, off in seg.consumers:
        out.append((model.get_submodule(name).weight, 1, off))
    for name, off in seg.norms:
        m = model.get_submodule(name)
        out += [(p, 0, off) for p in (m.weight, m.bias) if p is not None]
    return out


def _taylor(w: torch.Tensor, dim: int, off: int, channels: int) -> torch.Tensor:
    """``(channels,)`` float64: ``|w * dL/dw|`` summed over everything but channels ``off ..`` of ``dim``."""
    g = w.grad if w.grad is not None else torch.zeros_like(w)
    contrib = (w.detach() * g).abs().double().narrow(dim, off, channels)
    return contrib.transpose(0, dim).reshape(channels, -1).sum(1)


def stream_blocks(model: nn.Module, seg: StreamUnit) -> list[tuple[int, int]]:
    """``[start, end)`` of the finest blocks channels may move within and keep the function: no
    GroupNorm reading the segment, nor a width block of the segment, straddles their bounds."""
    cuts = {0, seg.channels} | {b * seg.size for b in range(seg.blocks)}
    for name, off in seg.norms:
        gn = model.get_submodule(name)
        g = gn.num_channels // gn.num_groups
        cuts |= {p for p in range(seg.channels) if (off + p) % g == 0}
    c = sorted(cuts)
    return list(zip(c[:-1], c[1:]))


def unit_importance(
    model: nn.Module, space: ElasticSpace, scheduler, images: torch.Tensor, *, t_min: int, t_max: int,
    batch_size: int, seed: int, conditions: Optional[Conditions] = None,
) -> list[torch.Tensor]:
    """First-order Taylor importance ``sum |w * dL/dw|`` of every group / head, on one interval.

    The loss is the denoising loss of one fixed-seed batch with ``t ~ U[t_min, t_max)`` (each row
    with its own of ``conditions``, when the model is conditional).

    Returns:
        For each unit of ``space``, a ``(G,)`` float tensor (higher = more important); then for each
        stream segment, a ``(C,)`` one.
    """
    gen = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters())
    x0, noise, t, idx = random_rows(images, batch_size, t_min, t_max, gen, p0.device)
    was_training = model.training
    model.eval().zero_grad(set_to_none=True)
    denoising_loss(conditioned(model, conditions, idx), x0, t, noise, scheduler).backward()
    scores = []
    for u in space.units:
        s = torch.zeros(u.units * u.unit_size, dtype=torch.float64, device=p0.device)
        for w, dim in _coupled(model, u):
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            contrib = (w.detach() * g).abs().double()
            s += contrib.transpose(0, dim).reshape(contrib.shape[dim], -1).sum(1)
        scores.append(s.view(u.units, u.unit_size).sum(1).cpu())
    for seg in space.streams:
        scores.append(sum(_taylor(w, dim, off, seg.channels) for w, dim, off in _stream_coupled(model, seg)).cpu())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


@torch.no_grad()
def reorder_units(model: nn.Module, space: ElasticSpace, orders: Sequence[torch.Tensor]) -> nn.Module:
    """Permute the groups / heads of every unit so ``orders[i]`` becomes ``0, 1, ...`` (in place).

    Whole groups (heads) move together, so the function of the network is unchanged. Orders past
    the units, one per stream segment, rank its channels: each moves only within its block of
    :func:`stream_blocks` (which keeps the function), the block's channels in the order given.

    Args:
        orders: for each unit, a ``(G,)`` permutation: ``orders[i][j]`` is the unit now placed ``j``-th;
            then, optionally, for each stream segment a ``(C,)`` permutation.
    """
    if len(orders) not in (len(space.units), space.num_logits):
        raise ValueError(f"{len(orders)} orders for {len(space.units)} units and {len(space.streams)} stream segments")
    for u, order in zip(space.units, orders):
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(u.units)):
            raise ValueError(f"{u.name}: {order.tolist()} is not a permutation of {u.units} units")
        idx = (order[:, None] * u.unit_size + torch.arange(u.unit_size)).flatten()  # (G * size,)
        for w, dim in _coupled(model, u):
            w.copy_(w.index_select(dim, idx.to(w.device)))
    for seg, order in zip(space.streams, orders[len(space.units):]):
        rank = {int(c): j for j, c in enumerate(torch.as_tensor(order).tolist())}
        if sorted(rank) != list(range(seg.channels)):
            raise ValueError(f"stream {seg.name}: not a permutation of {seg.channels} channels")
        idx = torch.tensor([c for lo, hi in stream_blocks(model, seg) for c in sorted(range(lo, hi), key=rank.get)])
        for w, dim, off in _stream_coupled(model, seg):
            part = w.narrow(dim, off, seg.channels)
            part.copy_(part.index_select(dim, idx.to(w.device)))
    return model


def importance_orders(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Most important first (stable: ties keep their index order). ``[(G,)] -> [(G,) long]``."""
    return [torch.sort(s, descending=True, stable=True).indices for s in scores]
