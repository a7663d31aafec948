"""DiP-GO's few-step gradient optimisation of the pruner (:mod:`.gates`), as the reference does it.

Training runs the gated SuperNet over the whole ``T``-step trajectory of the frozen teacher (the
house's one loop, :func:`diffprune.sampling.trajectory`, with gradients) from the same noise as the
full model and minimises

    L = consistency(x0_subnet, x0_full) + alpha_s / (T - 1) * sum_{t >= 1, k} gamma_k g_{t,k}

where ``gamma_k`` is the normalised MACs saved by skipping block k (with the blocks it frees), so
the sparsity term is the kept fraction of a step's MACs averaged over the gated steps, as the
reference's ``sparse_lossv2`` (divided by the number of steps, not steps x blocks); it is switched
off while the kept MACs are below the target (the reference's ``sparsity_early_stop``). The
optimiser is the reference's: SGD without momentum, weight decay 1e-4, a linear warm-up then a
cosine decay of the learning rate (diffusers' ``cosine`` schedule), gradients clipped to norm 1.
Post-processing thresholds the keep scores (bisection) to land within ``tolerance`` of the target
ratio. The optimisation resumes through :class:`diffprune.training.TrainState` (pruner, optimiser,
LR schedule, data generator; the loss history in its JSON).

Deviations from the reference, named:

* batch: the reference draws one fresh noise per trajectory with gradient accumulation 2 (and
  ``--scale_lr`` turns its ``lr 0.1`` into 0.2); we draw ``batch_size`` noises per step from a
  fixed pool of full-model samples computed once (``pool_size``), which bounds the search time on
  a CPU (the full-model trajectories are not recomputed at every step).
* steps: the reference runs 500 steps on SD 1.5; ``DipgoConfig.steps`` is sized so the search fits
  its time budget (params.yaml: 100 steps of batch 8, ~2.4 s CPU per step on the 50-step digits
  trajectory, ~4 min). Measured on the digits teacher, 20-step DDIM, target 0.33: lr 0.2 over 100
  steps -> PSNR 31.6 dB vs the teacher (ratio 0.320); lr 0.1 over 60 steps stops at kept 0.42
  before post-processing (29.9 dB); lr 1.0 overshoots to kept 0.09 after warm-up (28.5 dB).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...config import DipgoConfig
from ...models.unet import sampling_scheduler
from ...sampling import trajectory
from ...training import TrainState
from .gates import ConsistencyLoss, Features, GatePruner, ste_gates
from .graph import BlockGraph, block_graph
from .schedule import BlockCosts, Schedule, block_costs, gate_table_macs, schedule_from_scores, skip_savings
from .supernet import GatedRunner


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` for every parameter; restores both on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


DETERMINISTIC_SAMPLERS = ("ddim", "dpm")


def train_pruner(
    model: nn.Module | BlockGraph,
    scheduler_config: dict,
    cfg: DipgoConfig,
    *,
    steps: int,
    sample_shape: Sequence[int],
    device: str | torch.device = "cpu",
    progress: bool = True,
    sampler: str = "ddim",
    train_steps: Optional[int] = None,
    work_dir: str | Path | None = None,
    checkpoint_every: int = 20,
    features: Optional[Features] = None,
    on_progress: Optional[Callable[[int, int], None]] = None,
    forced_steps: Sequence[int] = (),
) -> tuple[Schedule, dict[str, Any]]:
    """Learn a ``[steps x N]`` skip schedule for ``model`` at ``cfg.target_ratio`` of its MACs.

    Args:
        model: the frozen teacher (``UNet2DModel``) or its :class:`BlockGraph`; left unchanged.
        scheduler_config: the teacher's noise-scheduler config (``scheduler.config``).
        cfg: DiP-GO hyper-parameters (``steps``, ``batch_size``, SGD ``lr``/``momentum``/``weight_decay``,
            ``warmup_steps`` then cosine decay, ``clip_grad``, ``alpha_s``, ``loss``).
        steps: T, sampling steps of the protocol the schedule is made for.
        sample_shape: ``(C, H, W)`` of one sample.
        device, sampler: where training runs; the inference scheduler (deterministic DDIM by default).
        train_steps: overrides ``cfg.steps`` (for quick runs).
        work_dir: where the pruner's training state (a :class:`~diffprune.training.TrainState`) is
            checkpointed every ``checkpoint_every`` steps; a rerun resumes from it and ends with
            the same schedule as an uninterrupted run.
        features: a feature map ``(B, C, H, W) -> (B, F)``; given, it replaces ``cfg.loss``.
        on_progress: called ``(done, total)`` after each step. progress: show a bar.
        forced_steps: sampling steps that compute every block, as step 0 does (a mixture's first
            step of each expert, :func:`~.routed.switch_steps`): their gates are held on in
            training and kept by the post-processing.

    Returns:
        The post-processed :class:`Schedule` and an info dict (timings, loss history, gamma).
    """
    _check_deterministic(sampler)
    n_iter, t0 = cfg.steps if train_steps is None else train_steps, time.perf_counter()
    run = _PrunerRun.build(model, scheduler_config, cfg, steps, sample_shape, torch.device(device), sampler, n_iter, features)
    run.forced = _forced_mask(forced_steps, steps).to(run.device)
    with frozen(run.graph.model), frozen(getattr(run.graph, "decoder", None) or nn.Identity()):
        # 1. a fixed pool of (noise, full-model sample) pairs, drawn once
        run.draw_pool()
        pool_time = time.perf_counter() - t0
        # 2. resume the pruner, optimizer, LR schedule, generator and history, if checkpointed
        state = run.train_state(Path(work_dir)) if work_dir is not None else None
        # 3. the few-step gradient optimisation
        history = _optimise(run, state, n_iter, progress, checkpoint_every, on_progress or _no_progress)
        run.runner.reset()
    timings = {"train_time_s": time.perf_counter() - t0, "pool_time_s": pool_time, "train_steps": n_iter}
    # 4. post-processing: threshold the keep scores to the target MACs ratio
    schedule, scores = run.post_process()
    schedule.meta.update({"train_steps": n_iter, "sampler": sampler, "loss": cfg.loss})
    return schedule, run.info(schedule, scores, history, timings)


def _no_progress(done: int, total: int) -> None:
    pass


def _optimise(run: "_PrunerRun", state: Optional[TrainState], n_iter: int, progress: bool, checkpoint_every: int,
              on_progress: Callable[[int, int], None]) -> list[dict[str, float]]:
    """The pruner's SGD steps from where ``state`` stopped (checkpointed every ``checkpoint_every``);
    the loss history."""
    start, history = _resume(state, run.device)
    bar = tqdm(range(start, n_iter), initial=start, total=n_iter, desc="dipgo", disable=not progress, leave=False)
    for it in bar:
        history.append(run.iteration(it))
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", kept=f"{history[-1]['kept_ratio']:.3f}")
        if state is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == n_iter):
            state.save(it + 1, meta={"history": history})
        on_progress(it + 1, n_iter)
    return history


def _forced_mask(forced_steps: Sequence[int], steps: int) -> torch.Tensor:
    """``(T,)`` True at the steps that compute every block (step 0 and ``forced_steps``)."""
    mask = torch.zeros(steps, dtype=torch.bool)
    for i in forced_steps:
        if not 0 <= int(i) < steps:
            raise ValueError(f"forced step {i}: the trajectory has steps 0 .. {steps - 1}")
        mask[int(i)] = True
    mask[0] = True
    return mask


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor at optimisation step s: ``(s + 1) / (warmup + 1)`` over the warm-up, then a cosine
    from 1 to 0 over the remaining steps (diffusers' ``cosine`` schedule, which the reference uses;
    its warm-up starts at factor 0, ours at ``1 / (warmup + 1)`` so the first step is not wasted)."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        prog = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))

    return factor


def _check_deterministic(sampler: str) -> None:
    """Raise ``NotImplementedError`` unless ``sampler`` is one of :data:`DETERMINISTIC_SAMPLERS`."""
    if sampler not in DETERMINISTIC_SAMPLERS:
        raise NotImplementedError(
            f"sampler = {sampler!r}: DiP-GO compares SubNet and full-model trajectories from the same noise, "
            f"which needs a deterministic sampler (one of {list(DETERMINISTIC_SAMPLERS)})"
        )


def _resume(state: Optional[TrainState], device: torch.device) -> tuple[int, list[dict[str, float]]]:
    """The step to start from and the loss history so far (``0, []`` without a usable checkpoint)."""
    resumed = state.restore(device) if state is not None else None
    if resumed is None:
        return 0, []
    step, _, meta = resumed
    return step, list(meta["history"])


@dataclass
class _PrunerRun:
    """Everything one pruner optimisation holds: the frozen teacher's graph and costs, the pruner
    and its optimiser, the sampling scheduler, the data generator and the (noise, target) pool."""

    cfg: DipgoConfig
    graph: BlockGraph
    costs: BlockCosts
    gamma: torch.Tensor  # (N,) MACs saved by skipping each block, / full MACs
    num_steps: int       # T
    sample_shape: tuple[int, ...]
    device: torch.device
    pruner: GatePruner
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: ConsistencyLoss
    sched: Any
    gen: torch.Generator
    runner: GatedRunner
    forced: Optional[torch.Tensor] = None       # (T,) bool: steps whose gates are all on
    pool_noise: Optional[torch.Tensor] = None   # (P, C, H, W)
    pool_target: Optional[torch.Tensor] = None  # (P, C, H, W)

    @classmethod
    def build(cls, model: nn.Module | BlockGraph, scheduler_config: dict, cfg: DipgoConfig, steps: int,
              sample_shape: Sequence[int], device: torch.device, sampler: str, n_iter: int,
              features: Optional[Features] = None) -> "_PrunerRun":
        """Costs and gamma of ``model``'s blocks; a freshly seeded pruner, SGD and a warm-up + cosine
        LR schedule over ``n_iter`` optimisation steps."""
        graph = block_graph(model)
        T, N = steps, len(graph.block_names)
        costs = block_costs(graph, sample_shape)
        gamma = torch.tensor(skip_savings(graph.consumers, costs), dtype=torch.float32, device=device) / costs.full
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(cfg.seed)
            pruner = GatePruner(T, N, cfg.dim, seed=cfg.seed).to(device)
        opt = torch.optim.SGD(pruner.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, n_iter))
        loss_fn = ConsistencyLoss("features" if features is not None else cfg.loss, features=features)
        return cls(cfg, graph, costs, gamma, T, tuple(sample_shape), device, pruner, opt, lr_sched, loss_fn,
                   sampling_scheduler(scheduler_config, sampler), torch.Generator().manual_seed(cfg.seed),
                   GatedRunner(graph))

    def train_state(self, work_dir: Path) -> TrainState:
        """The resumable state in ``work_dir/pruner-state``: pruner, optimiser, LR schedule, generator."""
        return TrainState(work_dir / "pruner-state", {"pruner": self.pruner, "opt": self.opt, "lr_sched": self.lr_sched},
                          {"data": self.gen})

    @property
    def clamp(self) -> bool:
        """Pixel samples are clamped to [-1, 1]; a latent model's (``graph.latent``) are not."""
        return not getattr(self.graph, "latent", False)

    def rows(self, idx: torch.Tensor):
        """The conditions of the pool rows ``idx`` for the calls inside (a conditional graph's
        :meth:`~.conditioned.ConditionedGraph.rows`); nothing for an unconditional graph."""
        return self.graph.rows(idx) if hasattr(self.graph, "rows") else contextlib.nullcontext()

    def decoded(self, x0: torch.Tensor) -> torch.Tensor:
        """What the consistency loss compares: the images a latent graph's decoder makes, else ``x0``."""
        return self.graph.decode(x0) if hasattr(self.graph, "decode") else x0

    def full_samples(self, noise: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The full model's final samples ``(B, C, H, W)`` from ``noise (B, C, H, W)`` of pool rows ``idx``."""
        keep_all = [[True] * len(self.graph.block_names)] * self.num_steps
        with self.rows(idx):
            return trajectory(self.runner.denoiser(keep_all), self.sched, noise, self.num_steps, clamp=self.clamp)

    def draw_pool(self) -> None:
        """Draw ``cfg.pool_size`` noises and their full-model samples (nothing when 0)."""
        if not self.cfg.pool_size:
            return
        self.pool_noise = torch.randn((self.cfg.pool_size, *self.sample_shape), generator=self.gen).to(self.device)
        size = max(self.cfg.batch_size, 64)
        self.pool_target = torch.cat([self.full_samples(z, torch.arange(i * size, i * size + len(z)))
                                      for i, z in enumerate(self.pool_noise.split(size))])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of noises ``(B, C, H, W)``, the full model's samples from them (same shape), and their
        pool rows ``(B,)`` (the rows' conditions, for a conditional graph)."""
        if self.pool_noise is not None:
            idx = torch.randint(self.cfg.pool_size, (self.cfg.batch_size,), generator=self.gen)
            return self.pool_noise[idx.to(self.device)], self.pool_target[idx.to(self.device)], idx
        noise = torch.randn((self.cfg.batch_size, *self.sample_shape), generator=self.gen).to(self.device)
        idx = torch.arange(self.cfg.batch_size)
        return noise, self.full_samples(noise, idx), idx

    def iteration(self, it: int) -> dict[str, float]:
        """One optimisation step of the pruner; returns its record for the loss history."""
        # 1. noise and the full model's final sample from it
        noise, target, idx = self.batch()
        # 2. gates and the SubNet's final sample, differentiable in the gates
        gates = ste_gates(self.pruner())  # (T, N)
        if self.forced is not None and bool(self.forced[1:].any()):  # a mixture's switch steps: all on
            gates = torch.where(self.forced[:, None], torch.ones_like(gates), gates)
        hard = (gates.detach() > 0.5).tolist()
        kept = gate_table_macs(self.graph.consumers, self.costs, hard) / (self.costs.full * self.num_steps)
        with self.rows(idx):
            x0 = trajectory(self.runner.denoiser(gates, soft=True), self.sched, noise, self.num_steps, grad=True,
                            clamp=self.clamp)
        # 3. consistency (on decoded images for a latent model) + MACs-weighted sparsity: the kept
        #    fraction of a step's MACs averaged over the gated steps 1..T-1 (the reference's
        #    sparse_lossv2), only while above the target
        with torch.no_grad():
            target = self.decoded(target)
        l_cons = self.loss_fn(self.decoded(x0), target)
        if kept > self.cfg.target_ratio and self.num_steps > 1:
            l_sparse = self.cfg.alpha_s * (gates[1:] * self.gamma).sum() / (self.num_steps - 1)
        else:
            l_sparse = gates.sum() * 0.0
        loss = l_cons + l_sparse
        # 4. SGD step on clipped gradients, then the LR schedule
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.pruner.parameters(),
                                                         self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf))
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.lr_sched.step()
        return {"step": it, "loss": loss.item(), "consistency": l_cons.item(), "sparsity": l_sparse.item(),
                "kept_ratio": kept, "grad_norm": grad_norm, "lr": lr}

    def post_process(self) -> tuple[Schedule, torch.Tensor]:
        """The keep scores ``(T, N)`` thresholded to ``cfg.target_ratio``: the schedule, and the scores."""
        with torch.no_grad():
            scores = self.pruner.keep_scores().cpu()
        forced = [] if self.forced is None else self.forced.nonzero().flatten().tolist()
        schedule = schedule_from_scores(scores, self.graph, self.costs, self.cfg.target_ratio, self.cfg.tolerance,
                                        method="dipgo", forced_steps=forced)
        return schedule, scores

    def info(self, schedule: Schedule, scores: torch.Tensor, history: list[dict[str, float]],
             timings: dict[str, Any]) -> dict[str, Any]:
        """The info dict :func:`train_pruner` returns beside the schedule."""
        return {
            **timings,
            "sampling_steps": self.num_steps,
            "batch_size": self.cfg.batch_size,
            "block_names": self.graph.block_names,
            "gamma": self.gamma.cpu().tolist(),
            "block_macs": list(self.costs.blocks),
            "always_macs": self.costs.always,
            "final_kept_ratio": history[-1]["kept_ratio"] if history else 1.0,
            "macs_ratio": schedule.macs_ratio,
            "history": history,
            "scores": scores.tolist(),
        }
