"""From routing logits to sub-networks: the straight-through relaxation, the selection, the budget.

:func:`relax` turns one expert's width and depth logits into exact 0/1 masks in the forward pass
with soft gradients (Gumbel-sigmoid noise while the router trains), and their MACs;
:func:`select` is its noise-free hard sub-network; :func:`calibrate` brings the selected mixture to
the MACs budget, counted over one sampling trajectory by :func:`mixture_macs`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .elastic import ElasticSpace, SubnetConfig
from .elastic_stream import evaluate

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- relaxation

def logistic_noise(shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """``log u - log(1 - u)``: the difference of two Gumbel variables (Gumbel-sigmoid noise)."""
    u = torch.rand(tuple(shape), generator=gen).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


@dataclass
class RelaxedSubnet:
    """Straight-through sub-network of one expert.

    Attributes:
        width_masks: per unit, a ``(G,)`` mask, exact 0/1 prefix in the forward pass.
        gates: per unit, a scalar gate, exact 0/1 in the forward pass.
        macs: scalar float64, the sub-network's MACs per ``(1, C, H, W)`` call (exact in the forward
            pass, differentiable through the soft masks).
        stream_masks: per stream segment, a ``(C,)`` channel mask (a prefix of every block), or None
            where no stream logits were given (full width).
        stream_widths: per stream segment, the channels kept per block in the forward pass.
    """

    width_masks: list[torch.Tensor]
    gates: list[torch.Tensor]
    macs: torch.Tensor
    stream_masks: list[Optional[torch.Tensor]] = field(default_factory=list)
    stream_widths: tuple[int, ...] = ()

    def hard(self) -> SubnetConfig:
        return SubnetConfig(tuple(int(round(float(m.detach().sum()))) for m in self.width_masks),
                            tuple(bool(float(g.detach()) > 0.5) for g in self.gates), self.stream_widths)


def _prefix(z: torch.Tensor, n: int, lo: int, m: float, tau: float) -> tuple[torch.Tensor, int]:
    """Straight-through ``(n,)`` prefix mask of keep-ratio ``m + (1 - m) sigmoid(z / tau)``, and its length."""
    j = torch.arange(n, device=z.device, dtype=z.dtype)
    if n <= lo:
        return torch.ones(n, device=z.device, dtype=z.dtype), n
    r = m + (1 - m) * torch.sigmoid(z / tau)  # keep-ratio
    soft = (r * n - j).clamp(0.0, 1.0)  # (n,) soft prefix, sums to r * n
    k = min(n, max(lo, math.ceil(float(r.detach()) * n - 1e-6)))
    return (j < k).to(z.dtype) + (soft - soft.detach()), k


def _relaxed_streams(space: ElasticSpace, zs: Optional[torch.Tensor], tau: float, device: torch.device,
                     ) -> tuple[list[Optional[torch.Tensor]], tuple[int, ...], list]:
    """Channel masks, hard widths and kept channels (float64, differentiable) of every stream segment."""
    masks, widths, channels = [], [], []
    for s, seg in enumerate(space.streams):
        if zs is None:
            masks.append(None)
            widths.append(seg.size)
            channels.append(torch.full((), float(seg.channels), dtype=torch.float64, device=device))
            continue
        pm, k = _prefix(zs[s], seg.size, space.stream_min_keep(s), space.min_width, tau)
        masks.append(pm.repeat(seg.blocks))  # (C,): position j of every block
        widths.append(k)
        channels.append(pm.double().sum() * seg.blocks)
    return masks, tuple(widths), channels


def relax(space: ElasticSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor, *, tau: float,
          gen: Optional[torch.Generator] = None, offset: float = 0.0) -> RelaxedSubnet:
    """Straight-through masks and MACs of one expert's sub-network.

    Args:
        width_logits: ``(U + S,)`` logits for the units then the stream segments of ``space``, or
            ``(U,)``: the stream at full width.
        depth_logits: ``(U,)`` (or ``(U + S,)``, the last ``S`` unused: a router's depth head has
            as many outputs as its width head).
        tau: temperature of the sigmoids.
        gen: draws the Gumbel-sigmoid noise; None = deterministic (the selected sub-network).
        offset: added to every logit (budget calibration; see :func:`calibrate`).
    """
    u_count, sizes = len(space.units), (len(space.units), space.num_logits)
    if width_logits.ndim != 1 or depth_logits.ndim != 1 or width_logits.shape[0] not in sizes \
            or depth_logits.shape[0] not in sizes:
        raise ValueError(f"logits {tuple(width_logits.shape)}, {tuple(depth_logits.shape)}: expected ({u_count},) "
                         f"or ({space.num_logits},)")
    zw, zd = width_logits + offset, depth_logits[:u_count] + offset
    if gen is not None:
        zw = zw + logistic_noise(zw.shape, gen).to(zw)
        zd = zd + logistic_noise(zd.shape, gen).to(zd)
    masks, gates = [], []
    for i, u in enumerate(space.units):
        masks.append(_prefix(zw[i], u.units, space.min_keep(i), space.min_width, tau)[0])
        if u.droppable:
            soft_g = torch.sigmoid(zd[i] / tau)
            gates.append((soft_g.detach() > 0.5).to(zd.dtype) + (soft_g - soft_g.detach()))
        else:
            gates.append(torch.ones((), device=zd.device, dtype=zd.dtype))
    zs = zw[u_count:] if zw.shape[0] > u_count else None
    s_masks, s_widths, s_ch = _relaxed_streams(space, zs, tau, zw.device)
    return RelaxedSubnet(masks, gates, _relaxed_macs(space, masks, gates, s_ch), s_masks, s_widths)


def _relaxed_macs(space: ElasticSpace, masks: Sequence[torch.Tensor], gates: Sequence[torch.Tensor],
                  stream_ch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The MACs of the relaxed sub-network: exact in the forward pass, differentiable in the masks."""
    g64 = [g.double() for g in gates]
    if space.terms:
        unit_ch = [m.double().sum() * u.unit_size for m, u in zip(masks, space.units)]
        return torch.zeros((), dtype=torch.float64, device=masks[0].device) + evaluate(
            space.terms, stream_ch, unit_ch, g64)
    macs = torch.zeros((), dtype=torch.float64, device=masks[0].device) + space.base_macs
    for u, mask, g in zip(space.units, masks, g64):
        macs = macs + g * (u.macs_fixed + u.macs_per_unit * mask.double().sum()) + (1 - g) * u.macs_skip
    return macs


def select(space: ElasticSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor, *, tau: float,
           offset: float = 0.0) -> SubnetConfig:
    """The deterministic (noise-free) hard sub-network of one expert."""
    with torch.no_grad():
        return relax(space, width_logits, depth_logits, tau=tau, offset=offset).hard()


# ----------------------------------------------------------------------------- budget

def steps_per_expert(timesteps: Sequence[int], boundaries: Sequence[int]) -> list[int]:
    """How many sampling steps each expert serves (routing as :class:`ExpertMixture`)."""
    counts = [0] * (len(boundaries) + 1)
    for t in timesteps:
        counts[sum(int(t) >= b for b in boundaries)] += 1
    return counts


def split_steps(total: int, served: Sequence[int], min_steps: int = 1) -> list[int]:
    """``total`` training steps shared by the experts in proportion to the sampling steps each serves,
    each at least ``min_steps``; the sum is exactly ``total``.

    Experts whose proportional share falls below ``min_steps`` get ``min_steps`` and the rest share
    what remains in proportion (repeated until no share falls below); the shares are then rounded
    by largest remainder (ties to the lower index). With nothing served the split is equal.
    """
    k_count = len(served)
    if k_count == 0 or min(served) < 0 or min_steps < 0 or k_count * min_steps > total:
        raise ValueError(f"split_steps(total={total}, served={list(served)}, min_steps={min_steps}): need "
                         f"served >= 0 and len(served) * min_steps <= total")
    floor: set[int] = set()
    while True:
        free = [k for k in range(k_count) if k not in floor]
        left = total - min_steps * len(floor)
        mass = sum(served[k] for k in free)
        share = {k: left * (served[k] / mass if mass else 1 / len(free)) for k in free}
        low = {k for k, v in share.items() if v < min_steps}
        if not low:
            break
        floor |= low
    exact = [float(min_steps) if k in floor else share[k] for k in range(k_count)]
    out = [math.floor(v + 1e-9) for v in exact]
    order = sorted(range(k_count), key=lambda k: (-(exact[k] - out[k]), k))
    for k in order[:total - sum(out)]:
        out[k] += 1
    return out


def mixture_macs(macs_per_expert: Sequence[float], steps: Sequence[int]) -> float:
    """MACs of one sampling trajectory (one image) of a mixture, from its experts' MACs per call:
    ``sum_k n_k MACs_k`` with ``n_k`` the steps expert ``k`` serves (computed, not measured; for a
    measured trajectory of any denoiser see :func:`diffprune.metrics.evaluate.trajectory_macs`)."""
    if len(macs_per_expert) != len(steps):
        raise ValueError(f"{len(macs_per_expert)} experts' MACs but {len(steps)} step counts")
    return float(sum(m * n for m, n in zip(macs_per_expert, steps)))


def calibrate(space: ElasticSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor, steps: Sequence[int],
              budget: float, *, tau: float, iters: int = 60) -> tuple[float, list[SubnetConfig]]:
    """The selected sub-networks, brought to the budget: a common logit offset, then a greedy fill.

    1. Bisection on an offset added to every logit: every unit's kept width and gate grow
       monotonically with it, so the trajectory MACs do; the largest offset within the budget wins.
    2. Logits that sit close together flip at nearly the same offset, so step 1 can stop well
       under the budget. The fill goes on raising the offset one unit at a time: the next group
       (or gate) in the order the offset would have added it is taken when it fits the budget and
       skipped when it does not, until nothing more fits.

    Args:
        width_logits, depth_logits: ``(K, U + S)`` (or ``(K, U)``: the stream stays at full width).
        steps: sampling steps per expert.
        budget: allowed fraction of the teacher's trajectory MACs.

    Returns:
        ``(offset, configs)``; when even the smallest mixture exceeds the budget, the smallest
        configs and a warning.
    """
    full = space.full_macs() * sum(steps)
    k_count = len(steps)
    span = 30.0 + float(max(width_logits.abs().max(), depth_logits.abs().max()))  # beyond every logit

    def ratio_of(cfgs: Sequence[SubnetConfig]) -> float:
        return mixture_macs([space.macs(c) for c in cfgs], steps) / full

    def at(off: float) -> tuple[float, list[SubnetConfig]]:
        cfgs = [select(space, width_logits[k], depth_logits[k], tau=tau, offset=off) for k in range(k_count)]
        return ratio_of(cfgs), cfgs

    lo, hi = -span, span
    r_lo, c_lo = at(lo)
    if r_lo > budget:
        log.warning("the smallest mixture uses %.3f of the teacher's MACs, above the budget %.3f", r_lo, budget)
        return lo, c_lo
    r_hi, c_hi = at(hi)
    if r_hi <= budget:
        return hi, c_hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if at(mid)[0] <= budget:
            lo = mid
        else:
            hi = mid
    return lo, _fill(space, at(lo)[1], width_logits + lo, depth_logits + lo, steps, budget, tau, ratio_of)


def _fill(space: ElasticSpace, configs: list[SubnetConfig], zw: torch.Tensor, zd: torch.Tensor, steps: Sequence[int],
          budget: float, tau: float, ratio_of: Callable[[Sequence[SubnetConfig]], float]) -> list[SubnetConfig]:
    """Greedy step 2 of :func:`calibrate`; ``zw``, ``zd`` are the offset ``(K, U [+ S])`` logits."""
    u_count = len(space.units)
    width = [list(c.width) + list(space.stream_of(c)) for c in configs]  # units, then stream segments
    depth = [list(c.depth) for c in configs]
    full = [u.units for u in space.units] + [seg.size for seg in space.streams]
    m = space.min_width
    count = zw.shape[1]  # no stream logits: the stream stays where select() put it

    def needed(k: int, i: int) -> Optional[tuple[float, bool]]:
        """How much more offset the next upgrade of unit (segment) ``i`` of expert ``k`` needs, and
        whether it is the gate (True) or one more group / head / channel per block (False)."""
        if i < u_count and not depth[k][i]:
            return float(-zd[k, i]), True
        if width[k][i] >= full[i] or m >= 1.0:
            return None
        q = min(max((width[k][i] / full[i] - m) / (1 - m), 1e-9), 1 - 1e-9)  # sigmoid value the next group needs
        return tau * math.log(q / (1 - q)) - float(zw[k, i]), False

    def current() -> list[SubnetConfig]:
        return [SubnetConfig(tuple(w[:u_count]), tuple(d), tuple(w[u_count:])) for w, d in zip(width, depth)]

    while True:
        cands = sorted((n[0], k, i, n[1]) for k in range(len(configs)) for i in range(count)
                       if (n := needed(k, i)) is not None)
        for _, k, i, gate in cands:
            if gate:
                depth[k][i] = True
            else:
                width[k][i] += 1
            if ratio_of(current()) <= budget:
                break
            if gate:
                depth[k][i] = False
            else:
                width[k][i] -= 1
        else:
            return current()
