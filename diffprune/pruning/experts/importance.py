"""Importance order of an elastic space's groups and heads, and the function-preserving reorder.

A sub-network of :mod:`.elastic` keeps a *prefix* of every unit's groups / heads. Scoring them
on one timestep interval (:func:`unit_importance`, first-order Taylor) and permuting the channels
into that order (:func:`reorder_units`) makes "keep ``k``" mean "keep the ``k`` most important".
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...training import denoising_loss, random_batch
from .elastic import RESNET, ElasticSpace, ElasticUnit


def _coupled(model: nn.Module, unit: ElasticUnit) -> list[tuple[torch.Tensor, int]]:
    """``(parameter, channel dim)`` of every tensor whose channels are the unit's width channels."""
    m = model.get_submodule(unit.name)
    if unit.kind == RESNET:
        out = [(m.conv1.weight, 0), (m.time_emb_proj.weight, 0), (m.norm2.weight, 0), (m.conv2.weight, 1)]
        out += [(b, 0) for b in (m.conv1.bias, m.time_emb_proj.bias, m.norm2.bias) if b is not None]
        return out
    out = [(m.to_q.weight, 0), (m.to_k.weight, 0), (m.to_v.weight, 0), (m.to_out[0].weight, 1)]
    out += [(lin.bias, 0) for lin in (m.to_q, m.to_k, m.to_v) if lin.bias is not None]
    return out


def unit_importance(
    model: nn.Module, space: ElasticSpace, scheduler, images: torch.Tensor, *, t_min: int, t_max: int,
    batch_size: int, seed: int,
) -> list[torch.Tensor]:
    """First-order Taylor importance ``sum |w * dL/dw|`` of every group / head, on one interval.

    The loss is the denoising loss of one fixed-seed batch with ``t ~ U[t_min, t_max)``.

    Returns:
        For each unit of ``space``, a ``(G,)`` float tensor (higher = more important).
    """
    gen = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters())
    x0, noise, t = random_batch(images, batch_size, t_min, t_max, gen, p0.device)
    was_training = model.training
    model.eval().zero_grad(set_to_none=True)
    denoising_loss(model, x0, t, noise, scheduler).backward()
    scores = []
    for u in space.units:
        s = torch.zeros(u.units * u.unit_size, dtype=torch.float64, device=p0.device)
        for w, dim in _coupled(model, u):
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            contrib = (w.detach() * g).abs().double()
            s += contrib.transpose(0, dim).reshape(contrib.shape[dim], -1).sum(1)
        scores.append(s.view(u.units, u.unit_size).sum(1).cpu())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


@torch.no_grad()
def reorder_units(model: nn.Module, space: ElasticSpace, orders: Sequence[torch.Tensor]) -> nn.Module:
    """Permute the groups / heads of every unit so ``orders[i]`` becomes ``0, 1, ...`` (in place).

    Whole groups (heads) move together, so the function of the network is unchanged.

    Args:
        orders: for each unit, a ``(G,)`` permutation: ``orders[i][j]`` is the unit now placed ``j``-th.
    """
    for u, order in zip(space.units, orders):
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(u.units)):
            raise ValueError(f"{u.name}: {order.tolist()} is not a permutation of {u.units} units")
        idx = (order[:, None] * u.unit_size + torch.arange(u.unit_size)).flatten()  # (G * size,)
        for w, dim in _coupled(model, u):
            w.copy_(w.index_select(dim, idx.to(w.device)))
    return model


def importance_orders(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Most important first (stable: ties keep their index order). ``[(G,)] -> [(G,) long]``."""
    return [torch.sort(s, descending=True, stable=True).indices for s in scores]
