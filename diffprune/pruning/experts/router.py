"""The Expert Routing Agent (ERA): one network that picks every expert's sub-network at once.

A learned embedding per expert goes through a small MLP; two linear heads give, per elastic unit,
a *width logit* (keep-ratio ``r = m + (1 - m) sigmoid(z / tau)`` with ``m`` the smallest trained
width) and a *depth logit* (keep gate ``sigmoid(z / tau)``). During training logistic noise is added
(Gumbel-sigmoid), and both are made hard with straight-through estimators: the forward pass runs
exactly the discrete sub-network (a prefix of ``ceil(r G)`` groups/heads, gate 0 or 1), the
backward pass uses the soft values.

The agent is trained with the experts frozen on

    sum_k L_denoise(expert_k restricted to its sub-network, t ~ U[interval_k])
      + lambda * R(MACs_mixture, budget * MACs_teacher),

where ``MACs_mixture = sum_k n_k MACs_k`` is the trajectory cost of the sampler (``n_k`` sampling
steps fall in expert ``k``'s interval) and ``MACs_k`` follows exactly and differentiably from the
straight-through masks. ``R`` is the log-ratio form of the resource regulariser
``log(max(T, p T_full) / min(T, p T_full))`` = ``|log(ratio / budget)|`` (:func:`resource_loss`):
its pull on the ratio is ``lambda / ratio`` on either side of the budget, so it does not fade
there, as the squared ``(ratio / budget - 1)^2`` does.

The denoising term runs the noisy (Gumbel) sub-networks, which explore. The resource term takes
its value on the noise-free ones, the sub-networks :func:`.selection.select` finally picks, so the
budget the loss reaches is the selection's (with the noisy MACs, logits that sit just above 0 meet
the budget on average while the selection keeps every unit); its gradient is the noisy
sub-network's (straight-through). Both terms then reach a logit through the same noisy sigmoid
slope: with the noise-free slope ``sigmoid'(z / tau)`` a logit far from 0 gets about
``e^(-|z| / tau)`` of resource pull against ``e^(-|z|)`` of denoising pull (the noise spreads the
sigmoid), so at ``tau < 1`` it runs away and the resource term loses its hold on it (on the tiny
test model the agent stayed at 0.67 for a budget of 0.8, the adjustment's offset +49; on the
benchmark offsets of -5 to -28). The learning rate decays on a cosine, so the discrete selection
settles instead of flipping between sub-networks on either side of the budget, and of the last
quarter of the training the agent's own selection nearest the budget is kept (:func:`_keep_best`);
what is left is brought to the budget by :func:`.selection.calibrate`, a safety net. With ``distill = w`` the denoising
target blends in the full expert's own prediction, a noise-free reference that makes the loss
measure what the pruning costs. So the budget is shared between experts by the loss, not by a
heuristic: an expert serving many steps, or one whose interval tolerates pruning, gets cut more.
The loss is the house's one :func:`~diffprune.training.denoising_loss` (the full expert as the
teacher), and the training resumes through :class:`~diffprune.training.TrainState`.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...sampling import predict
from ...training import Conditions, TrainState, conditioned, denoising_loss, random_rows
from .elastic import ElasticController, ElasticSpace, SubnetConfig
from .selection import calibrate, mixture_macs, relax, select

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- agent

class ExpertRoutingAgent(nn.Module):
    """Per-expert embeddings -> MLP -> width and depth logits for every elastic unit.

    Args:
        num_experts: ``K``.
        num_units: ``U + S``, the units then the stream segments of the (shared) elastic space
            (:attr:`.elastic.ElasticSpace.num_logits`; the last ``S`` depth logits are unused).
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
        learned_ratio: the same for ``learned``, the agent's own choice before the adjustment.
        history: per step ``{"loss", "denoise", "resource", "ratio"}``.
    """

    agent: ExpertRoutingAgent
    configs: list[SubnetConfig]
    learned: list[SubnetConfig]
    offset: float
    macs: list[int]
    ratio: float
    learned_ratio: float
    history: list[dict] = field(default_factory=list)


def train_router(experts: Sequence[nn.Module], space: ElasticSpace, intervals: Sequence[tuple[int, int]],
                 steps: Sequence[int], images: torch.Tensor, scheduler, *, budget: float, train_steps: int, lr: float,
                 resource_weight: float, tau: float, hidden: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", progress: bool = False, distill: float = 0.0,
                 work_dir: Optional[str | Path] = None, checkpoint_every: int = 20,
                 stop_after: Optional[int] = None, resource: str = "log", conditions: Optional[Conditions] = None,
                 on_progress: Optional[Callable[[int, int], None]] = None) -> RouterResult:
    """Train the ERA with the (elastic) experts frozen; select and calibrate their sub-networks.

    Args:
        experts: the ``K`` elastic experts (importance-ordered weights), all with the units of ``space``.
        intervals: ``[t_min, t_max)`` of each expert.
        steps: sampling steps each expert serves (:func:`steps_per_expert`).
        images: ``(N, C, H, W)`` training images in [-1, 1].
        budget: target fraction of the teacher's trajectory MACs, in (0, 1].
        train_steps, lr, resource_weight, tau, hidden, batch_size, seed: the ERA's training (Adam, the
            learning rate decayed from ``lr`` to 0 on a cosine, so the selection settles on the budget).
        distill: weight of the full expert's own prediction in the denoising target (0 = the sampled
            noise alone). The full expert's output is a noise-free reference: the loss then measures
            what the pruning costs, not the noise every sub-network fails to predict.
        work_dir: where the training state (agent, optimiser, generator, history) is checkpointed every
            ``checkpoint_every`` steps; a rerun resumes from it and ends as an uninterrupted run.
        stop_after: stop (after checkpointing) once this step is reached (tests of an interrupted run).
        resource: the regulariser's form, ``"log"`` or ``"squared"`` (:func:`resource_loss`).
        on_progress: called ``(done, total)`` after each step. conditions: one per image, for
            conditional experts (each batch row denoised with its own).

    Returns a :class:`RouterResult`; the experts' weights and hooks are left as they were.
    """
    _check(len(experts), len(intervals), len(steps), checkpoint_every)
    task = _RouterTask(space, intervals, steps, images, scheduler, tau=tau, batch_size=batch_size, distill=distill,
                       budget=budget, device=torch.device(device), resource=resource, conditions=conditions)
    gen = torch.Generator().manual_seed(seed)
    agent, best = (_seeded_agent(len(experts), space.num_logits, hidden, seed, task.device) for _ in range(2))
    opt = torch.optim.Adam(agent.parameters(), lr=lr)  # (best: see _keep_best)
    state = TrainState(work_dir, {"agent": agent, "opt": opt, "best": best}, {"router": gen}) if work_dir else None
    start, history = 0, []
    if state is not None and (resumed := state.restore()) is not None:
        start, history = resumed[0], list(resumed[2]["history"])
        log.info("resuming the router from step %d", start)
    with _frozen(experts, space, task.device) as controllers:
        for step in tqdm(range(start, train_steps), initial=start, total=train_steps, desc="router",
                         disable=not progress):
            _cosine_lr(opt, lr, step, train_steps)
            loss, record = task.loss(agent(), experts, controllers, gen, resource_weight)
            _keep_best(agent, best, record["ratio"], history, step, train_steps, budget)
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False only in a space with nothing elastic
                loss.backward()
                opt.step()
            history.append(record)
            done = step + 1
            if state is not None and (done % checkpoint_every == 0 or done in (train_steps, stop_after)):
                state.save(done, meta={"history": history})
            if on_progress is not None:
                on_progress(done, train_steps)
            if stop_after is not None and done >= stop_after:
                break
    return _result([agent, best] if len(history) > _tail(train_steps) else [agent], space, steps, budget, tau, history)


def _check(k_experts: int, k_intervals: int, k_steps: int, checkpoint_every: int) -> None:
    if not k_experts == k_intervals == k_steps:
        raise ValueError(f"{k_experts} experts, {k_intervals} intervals, {k_steps} step counts: must agree")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every = {checkpoint_every!r}: must be >= 1")


def _tail(train_steps: int) -> int:
    return (3 * train_steps) // 4


def _keep_best(agent: ExpertRoutingAgent, best: ExpertRoutingAgent, ratio: float, history: list[dict], step: int,
               train_steps: int, budget: float) -> None:
    """Copy ``agent`` into ``best`` when its selection (``ratio``, before this step's update) is the
    nearest to the budget of the last quarter of the training (ties: the later). The logit of the
    marginal unit ends within a step of 0, on either side: the last iterate's selection lands on a
    sub-network just above or just below the budget by chance, and in a coarse elastic space one
    unit can be several percent of the MACs; the agent's nearest own selection is the one kept."""
    tail = _tail(train_steps)
    if step < tail:
        return
    if all(abs(ratio - budget) <= abs(h["ratio"] - budget) for h in history[tail:]):
        best.load_state_dict(agent.state_dict())


def _seeded_agent(k_count: int, u_count: int, hidden: int, seed: int, device: torch.device) -> ExpertRoutingAgent:
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG left as it was
        torch.manual_seed(seed)
        return ExpertRoutingAgent(k_count, u_count, hidden).to(device)


def _cosine_lr(opt: torch.optim.Optimizer, lr: float, step: int, total: int) -> None:
    """Step ``step`` of ``total``'s learning rate, ``lr (1 + cos(pi step / total)) / 2`` (a function of the
    step alone, so a resumed run follows the same schedule)."""
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


@dataclass(frozen=True)
class _RouterTask:
    """What one step of :func:`train_router` needs besides the agent: data, experts' intervals, budget."""

    space: ElasticSpace
    intervals: Sequence[tuple[int, int]]
    steps: Sequence[int]
    images: torch.Tensor
    scheduler: Any
    tau: float
    batch_size: int
    distill: float
    budget: float
    device: torch.device
    resource: str = "log"
    conditions: Optional[Conditions] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"router.budget = {self.budget!r}: must be in (0, 1]")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"router.distill = {self.distill!r}: must be in [0, 1]")
        if self.resource not in RESOURCE_LOSSES:
            raise ValueError(f"router.resource_loss = {self.resource!r}: expected one of {RESOURCE_LOSSES}")

    def loss(self, logits: tuple[torch.Tensor, torch.Tensor], experts: Sequence[nn.Module],
             controllers: Sequence[ElasticController], gen: torch.Generator,
             resource_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The router's loss for the agent's ``logits`` ``(width (K, U), depth (K, U))``, and its terms."""
        width, depth = logits
        denoise = torch.zeros((), device=self.device)
        macs = []
        for k, (e, ctrl) in enumerate(zip(experts, controllers)):
            sub = relax(self.space, width[k], depth[k], tau=self.tau, gen=gen)  # noisy: explores
            with torch.no_grad():
                chosen = relax(self.space, width[k], depth[k], tau=self.tau)  # noise-free: what select() picks
            # 1. a batch of expert k's interval, from the router's generator
            x0, noise, t, idx = random_rows(self.images, self.batch_size, *self.intervals[k], gen, self.device)
            # 2. the denoising loss of the chosen sub-network (target: the noise, blended with the
            #    full expert's own prediction by `distill`)
            ctrl.set_relaxed(sub.width_masks, sub.gates, sub.stream_masks)
            e_of = conditioned(e, self.conditions, idx)
            denoise = denoise + denoising_loss(e_of, x0, t, noise, self.scheduler, teacher=_full_expert(e_of, ctrl),
                                               distill=self.distill)
            # the MACs of the noise-free selection, with the gradient of the noisy sub-network's: the
            # two terms then reach each logit through the same sigmoid slope (see the module doc)
            macs.append(chosen.macs.detach() + (sub.macs - sub.macs.detach()))
        # 3. the resource regulariser on the mixture's trajectory MACs
        ratio = sum(m * n for m, n in zip(macs, self.steps)) / float(self.space.full_macs() * sum(self.steps))
        resource = resource_loss(ratio, self.budget, self.resource)
        loss = denoise + resource_weight * resource.float()
        terms = (("loss", loss), ("denoise", denoise), ("resource", resource), ("ratio", ratio))
        return loss, {name: float(v.detach()) for name, v in terms}


RESOURCE_LOSSES = ("log", "squared")


def resource_loss(ratio: torch.Tensor, budget: float, form: str = "log") -> torch.Tensor:
    """The resource regulariser of the trajectory MACs ``ratio`` (a fraction of the teacher's).

    ``"log"`` is ``log(max(T, p T_full) / min(T, p T_full))`` = ``|log(ratio / budget)|``, the form of
    the resource regulariser of the authors' pruning agents (the stored summary of the paper names
    ``R`` but not its formula):
    its pull, ``1 / ratio`` on either side, does not fade near the budget, so the agent's own
    selection settles on it. ``"squared"`` is ``(ratio / budget - 1)^2``, whose pull vanishes there
    (the denoising term then holds the selection above the budget).
    """
    if form == "log":
        return torch.log(ratio / budget).abs()
    if form == "squared":
        return (ratio / budget - 1.0) ** 2
    raise ValueError(f"router.resource_loss = {form!r}: expected one of {RESOURCE_LOSSES}")


def _full_expert(expert: Callable, ctrl: ElasticController) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The full expert's prediction ``(x_t, t) -> (B, C, H, W)``, whatever sub-network ``ctrl`` runs
    (``expert``: the network, or its call with the batch's conditions bound)."""

    def full(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with ctrl.full_network():
            return predict(expert, xt, t)

    return full


@contextmanager
def _frozen(experts: Sequence[nn.Module], space: ElasticSpace, device: torch.device) -> Iterator[list[ElasticController]]:
    """The experts on ``device``, in eval mode without gradients, each with an elastic controller;
    their hooks, modes and ``requires_grad`` flags restored on exit."""
    flags = [[p.requires_grad for p in e.parameters()] for e in experts]
    modes = [e.training for e in experts]
    controllers = []
    try:
        for e in experts:
            e.to(device).eval().requires_grad_(False)
            controllers.append(ElasticController(e, space))
        yield controllers
    finally:
        for ctrl in controllers:
            ctrl.remove()
        for e, fl, mode in zip(experts, flags, modes):
            for p, f in zip(e.parameters(), fl):
                p.requires_grad_(f)
            e.train(mode)


def _result(agents: Sequence[ExpertRoutingAgent], space: ElasticSpace, steps: Sequence[int], budget: float,
            tau: float, history: list[dict]) -> RouterResult:
    """The learned and the calibrated sub-networks of the one of ``agents`` (the final one, and the
    kept one of :func:`_keep_best`) whose own selection is nearest the budget (ties: the first)."""
    full = space.full_macs() * sum(steps)

    def learned_of(a: ExpertRoutingAgent) -> list[SubnetConfig]:
        with torch.no_grad():
            width, depth = a()
        return [select(space, width[k], depth[k], tau=tau) for k in range(width.shape[0])]

    def gap(a: ExpertRoutingAgent) -> float:
        return abs(mixture_macs([space.macs(c) for c in learned_of(a)], steps) / full - budget)

    agent = min(agents, key=gap)
    learned = learned_of(agent)
    with torch.no_grad():
        width, depth = agent()
    offset, configs = calibrate(space, width, depth, steps, budget, tau=tau)
    macs_k = [space.macs(c) for c in configs]
    ratio = mixture_macs(macs_k, steps) / full
    learned_ratio = mixture_macs([space.macs(c) for c in learned], steps) / full
    log.info("router: the agent selected %.4f of the teacher's MACs, %.4f after the adjustment (budget %.4f)",
             learned_ratio, ratio, budget)
    return RouterResult(agent, configs, learned, offset, macs_k, ratio, learned_ratio, history)
