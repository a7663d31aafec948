"""The Expert Routing Agent (ERA): one network that picks every expert's sub-network at once.

A learned embedding per expert goes through a small MLP; two linear heads give, per elastic unit,
a *width logit* (keep-ratio ``r = m + (1 - m) sigmoid(z / tau)`` with ``m`` the smallest trained
width) and a *depth logit* (keep gate ``sigmoid(z / tau)``). During training logistic noise is added
(Gumbel-sigmoid), and both are made hard with straight-through estimators: the forward pass runs
exactly the discrete sub-network (a prefix of ``ceil(r G)`` groups/heads, gate 0 or 1), the
backward pass uses the soft values.

The agent is trained with the experts frozen on

    sum_k L_denoise(expert_k restricted to its sub-network, t ~ U[interval_k])
      + lambda * (MACs_mixture / (budget * MACs_teacher) - 1)^2,

where ``MACs_mixture = sum_k n_k MACs_k`` is the trajectory cost of the sampler (``n_k`` sampling
steps fall in expert ``k``'s interval) and ``MACs_k`` follows exactly and differentiably from the
straight-through masks. The denoising term runs the noisy (Gumbel) sub-networks, which explore; the
resource term is taken on the noise-free ones, the sub-networks :func:`select` finally picks, so
the budget the loss reaches is the selection's (with the noisy MACs, logits that sit just above 0
meet the budget on average while the selection keeps every unit). With ``distill = w`` the denoising
target blends in the full expert's own prediction, a noise-free reference that makes the loss
measure what the pruning costs. So the budget is shared between experts by the loss, not by a
heuristic: an expert serving many steps, or one whose interval tolerates pruning, gets cut more.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...training import denoising_target, predict
from .elastic import ElasticController, ElasticSpace, SubnetConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- agent

class ExpertRoutingAgent(nn.Module):
    """Per-expert embeddings -> MLP -> width and depth logits for every elastic unit.

    Args:
        num_experts: ``K``.
        num_units: ``U``, the units of the (shared) elastic space.
        hidden: embedding and MLP width.
        init_logit: initial value of every logit (last layer: weight 0, bias ``init_logit``), so
            training starts from (nearly) the full networks.
    """

    def __init__(self, num_experts: int, num_units: int, hidden: int = 64, init_logit: float = 1.0) -> None:
        super().__init__()
        if num_experts < 1 or num_units < 1 or hidden < 1:
            raise ValueError(f"num_experts={num_experts}, num_units={num_units}, hidden={hidden}: all must be >= 1")
        self.embed = nn.Embedding(num_experts, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.width_head = nn.Linear(hidden, num_units)
        self.depth_head = nn.Linear(hidden, num_units)
        for head in (self.width_head, self.depth_head):
            nn.init.zeros_(head.weight)
            nn.init.constant_(head.bias, init_logit)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(width (K, U), depth (K, U))``."""
        h = self.mlp(self.embed.weight)  # (K, hidden)
        return self.width_head(h), self.depth_head(h)


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
    """

    width_masks: list[torch.Tensor]
    gates: list[torch.Tensor]
    macs: torch.Tensor

    def hard(self) -> SubnetConfig:
        return SubnetConfig(tuple(int(round(float(m.sum()))) for m in self.width_masks),
                            tuple(bool(float(g) > 0.5) for g in self.gates))


def relax(space: ElasticSpace, width_logits: torch.Tensor, depth_logits: torch.Tensor, *, tau: float,
          gen: Optional[torch.Generator] = None, offset: float = 0.0) -> RelaxedSubnet:
    """Straight-through masks and MACs of one expert's sub-network.

    Args:
        width_logits, depth_logits: ``(U,)`` logits for the units of ``space``.
        tau: temperature of the sigmoids.
        gen: draws the Gumbel-sigmoid noise; None = deterministic (the selected sub-network).
        offset: added to every logit (budget calibration; see :func:`calibrate`).
    """
    u_count = len(space.units)
    if width_logits.shape != (u_count,) or depth_logits.shape != (u_count,):
        raise ValueError(f"logits {tuple(width_logits.shape)}, {tuple(depth_logits.shape)}: expected ({u_count},)")
    zw, zd = width_logits + offset, depth_logits + offset
    if gen is not None:
        zw = zw + logistic_noise(zw.shape, gen).to(zw)
        zd = zd + logistic_noise(zd.shape, gen).to(zd)
    macs = torch.zeros((), dtype=torch.float64, device=zw.device) + space.base_macs
    masks, gates = [], []
    for i, u in enumerate(space.units):
        lo = space.min_keep(i)
        j = torch.arange(u.units, device=zw.device, dtype=zw.dtype)
        if u.units > lo:
            r = space.min_width + (1 - space.min_width) * torch.sigmoid(zw[i] / tau)  # keep-ratio
            soft = (r * u.units - j).clamp(0.0, 1.0)  # (G,) soft prefix, sums to r * G
            k = min(u.units, max(lo, math.ceil(float(r.detach()) * u.units - 1e-6)))
            hard = (j < k).to(zw.dtype)
            mask = hard + (soft - soft.detach())
        else:
            mask = torch.ones(u.units, device=zw.device, dtype=zw.dtype)
        if u.droppable:
            soft_g = torch.sigmoid(zd[i] / tau)
            gate = (soft_g.detach() > 0.5).to(zd.dtype) + (soft_g - soft_g.detach())
        else:
            gate = torch.ones((), device=zd.device, dtype=zd.dtype)
        masks.append(mask)
        gates.append(gate)
        g64 = gate.double()
        macs = macs + g64 * (u.macs_fixed + u.macs_per_unit * mask.double().sum()) + (1 - g64) * u.macs_skip
    return RelaxedSubnet(masks, gates, macs)


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


def trajectory_macs(macs_per_expert: Sequence[float], steps: Sequence[int]) -> float:
    """MACs of one sampling trajectory (one image): ``sum_k n_k MACs_k``."""
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
        width_logits, depth_logits: ``(K, U)``.
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
        return trajectory_macs([space.macs(c) for c in cfgs], steps) / full

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
    """Greedy step 2 of :func:`calibrate`; ``zw``, ``zd`` are the offset ``(K, U)`` logits."""
    width = [list(c.width) for c in configs]
    depth = [list(c.depth) for c in configs]
    m = space.min_width

    def needed(k: int, i: int) -> Optional[tuple[float, str]]:
        """How much more offset the next upgrade of unit ``i`` of expert ``k`` needs, and which it is."""
        u = space.units[i]
        if not depth[k][i]:
            return float(-zd[k, i]), "depth"
        if width[k][i] >= u.units or m >= 1.0:
            return None
        q = min(max((width[k][i] / u.units - m) / (1 - m), 1e-9), 1 - 1e-9)  # sigmoid value the next group needs
        return tau * math.log(q / (1 - q)) - float(zw[k, i]), "width"

    def current() -> list[SubnetConfig]:
        return [SubnetConfig(tuple(w), tuple(d)) for w, d in zip(width, depth)]

    while True:
        cands = sorted((n[0], k, i, n[1]) for k in range(len(configs)) for i in range(len(space.units))
                       if (n := needed(k, i)) is not None)
        for _, k, i, what in cands:
            if what == "depth":
                depth[k][i] = True
            else:
                width[k][i] += 1
            if ratio_of(current()) <= budget:
                break
            if what == "depth":
                depth[k][i] = False
            else:
                width[k][i] -= 1
        else:
            return current()


# ----------------------------------------------------------------------------- training

@dataclass
class RouterResult:
    """What :func:`train_router` found.

    Attributes:
        agent: the trained agent.
        configs: the selected (calibrated) sub-network of each expert.
        learned: the sub-networks before calibration (offset 0).
        offset: the calibration offset.
        macs: MACs per call of each selected sub-network.
        ratio: trajectory MACs of the selected mixture / the teacher's.
        history: per step ``{"loss", "denoise", "resource", "ratio"}``.
    """

    agent: ExpertRoutingAgent
    configs: list[SubnetConfig]
    learned: list[SubnetConfig]
    offset: float
    macs: list[int]
    ratio: float
    history: list[dict] = field(default_factory=list)


def train_router(
    experts: Sequence[nn.Module],
    space: ElasticSpace,
    intervals: Sequence[tuple[int, int]],
    steps: Sequence[int],
    images: torch.Tensor,
    scheduler,
    *,
    budget: float,
    train_steps: int,
    lr: float,
    resource_weight: float,
    tau: float,
    hidden: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    distill: float = 0.0,
) -> RouterResult:
    """Train the ERA with the (elastic) experts frozen; select and calibrate their sub-networks.

    Args:
        experts: the ``K`` elastic experts (importance-ordered weights), all with the units of ``space``.
        intervals: ``[t_min, t_max)`` of each expert.
        steps: sampling steps each expert serves (:func:`steps_per_expert`).
        images: ``(N, C, H, W)`` training images in [-1, 1].
        budget: target fraction of the teacher's trajectory MACs, in (0, 1].
        train_steps, lr, resource_weight, tau, hidden, batch_size, seed: the ERA's training.
        distill: weight of the full expert's own prediction in the denoising target (0 = the sampled
            noise alone). The full expert's output is a noise-free reference: the loss then measures
            what the pruning costs, not the noise every sub-network fails to predict.

    Returns:
        A :class:`RouterResult`; the experts' weights and hooks are left as they were.
    """
    k_count = len(experts)
    if not (len(intervals) == len(steps) == k_count):
        raise ValueError(f"{k_count} experts, {len(intervals)} intervals, {len(steps)} step counts: must agree")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"router.budget = {budget!r}: must be in (0, 1]")
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"router.distill = {distill!r}: must be in [0, 1]")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG left as it was
        torch.manual_seed(seed)
        agent = ExpertRoutingAgent(k_count, len(space.units), hidden).to(device)
    opt = torch.optim.Adam(agent.parameters(), lr=lr)
    full = float(space.full_macs() * sum(steps))
    flags = [[p.requires_grad for p in e.parameters()] for e in experts]
    modes = [e.training for e in experts]
    controllers = []
    for e in experts:
        e.to(device).eval().requires_grad_(False)
        controllers.append(ElasticController(e, space))
    history: list[dict] = []
    try:
        for step in tqdm(range(train_steps), desc="router", disable=not progress):
            width, depth = agent()  # (K, U) each
            denoise = torch.zeros((), device=device)
            macs = []
            for k, (e, ctrl) in enumerate(zip(experts, controllers)):
                sub = relax(space, width[k], depth[k], tau=tau, gen=gen)  # noisy: explores
                chosen = relax(space, width[k], depth[k], tau=tau)  # noise-free: what select() picks
                # 1. a batch of expert k's interval, from the router's generator
                idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
                x0 = images[idx].to(device)  # (B, C, H, W)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(intervals[k][0], intervals[k][1], (batch_size,), generator=gen).to(device)
                # 2. the denoising loss of the chosen sub-network (target: the noise, blended with the
                #    full expert's own prediction by `distill`)
                xt = scheduler.add_noise(x0, noise, t)
                target = denoising_target(x0, noise, t, scheduler)
                if distill:
                    ctrl.reset()
                    with torch.no_grad():
                        target = torch.lerp(target, predict(e, xt, t), distill)
                ctrl.set_relaxed(sub.width_masks, sub.gates)
                denoise = denoise + F.mse_loss(predict(e, xt, t), target)
                macs.append(chosen.macs)
            # 3. the resource regulariser on the mixture's trajectory MACs
            ratio = sum(m * n for m, n in zip(macs, steps)) / full
            resource = (ratio / budget - 1.0) ** 2
            loss = denoise + resource_weight * resource.float()
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False only in a space with nothing elastic
                loss.backward()
                opt.step()
            history.append({name: float(v.detach()) for name, v in
                            (("loss", loss), ("denoise", denoise), ("resource", resource), ("ratio", ratio))})
    finally:
        for e, ctrl, fl, mode in zip(experts, controllers, flags, modes):
            ctrl.remove()
            for p, f in zip(e.parameters(), fl):
                p.requires_grad_(f)
            e.train(mode)
    with torch.no_grad():
        width, depth = agent()
    learned = [select(space, width[k], depth[k], tau=tau) for k in range(k_count)]
    offset, configs = calibrate(space, width, depth, steps, budget, tau=tau)
    macs_k = [space.macs(c) for c in configs]
    return RouterResult(agent, configs, learned, offset, macs_k, trajectory_macs(macs_k, steps) / full, history)
