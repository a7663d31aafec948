"""DiP-GO's pruner network and its few-step gradient optimisation.

The pruner holds ``T x N`` learnable queries (one per sampling step and block), mixes them with one
self-attention + MLP encoder layer, and classifies each with a 2-way head (reuse / compute). The
head's last layer starts at weight 0 and a bias favouring *compute*, so the initial SubNet is the
full model. Gates are the argmax, trained with a straight-through estimator: hard 0/1 forward,
softmax gradient backward.

Training runs the gated SuperNet over the whole ``T``-step trajectory of the frozen teacher (the
house's one loop, :func:`diffprune.sampling.trajectory`, with gradients) from the same noise as the
full model and minimises

    L = consistency(x0_subnet, x0_full) + alpha_s / (N T) * sum_{t,k} gamma_k g_{t,k}

where ``gamma_k`` is the normalised MACs saved by skipping block k (with the blocks it frees) and
the sparsity term is active only while the kept MACs are above the target. Post-processing
thresholds the keep scores (bisection) to land within ``tolerance`` of the target ratio. The
optimisation resumes through :class:`diffprune.training.TrainState` (pruner, optimiser, LR schedule,
data generator; the loss history in its JSON).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...config import DipgoConfig
from ...metrics.image import ssim
from ...models.unet import sampling_scheduler
from ...sampling import trajectory
from ...training import TrainState
from .graph import BlockGraph, block_graph
from .schedule import BlockCosts, Schedule, block_costs, gate_table_macs, schedule_from_scores, skip_savings
from .supernet import GatedRunner


class GatePruner(nn.Module):
    """``T x N`` queries -> one encoder layer -> a shared 2-way head -> logits ``(T, N, 2)``.

    Index 1 of the last dimension is *compute* (keep), index 0 *reuse the backup*.

    Args:
        num_steps: T, sampling steps.
        num_blocks: N, gateable blocks.
        dim: D, query width.
        keep_bias: initial bias of the keep logit (the reuse logit starts at 0).
        seed: seeds the query initialisation.
    """

    def __init__(self, num_steps: int, num_blocks: int, dim: int = 64, keep_bias: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if num_steps < 1 or num_blocks < 1 or dim < 1:
            raise ValueError(f"GatePruner(num_steps={num_steps}, num_blocks={num_blocks}, dim={dim}): all must be >= 1")
        self.num_steps, self.num_blocks = num_steps, num_blocks
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0 and dim // h >= 8 or h == 1)
        g = torch.Generator().manual_seed(seed)
        self.queries = nn.Parameter(torch.randn(num_steps * num_blocks, dim, generator=g))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))
        with torch.no_grad():
            self.head[-1].weight.zero_()
            self.head[-1].bias.copy_(torch.tensor([0.0, keep_bias]))

    def forward(self) -> torch.Tensor:
        """Logits ``(T, N, 2)``: [..., 0] reuse, [..., 1] compute."""
        q = self.queries[None]  # (1, T*N, D)
        h = self.norm1(q)
        q = q + self.attn(h, h, h, need_weights=False)[0]
        q = q + self.mlp(self.norm2(q))
        return self.head(q)[0].view(self.num_steps, self.num_blocks, 2)

    def keep_scores(self) -> torch.Tensor:
        """Keep probabilities ``(T, N)`` in [0, 1]."""
        return self.forward().softmax(-1)[..., 1]


def ste_gates(logits: torch.Tensor) -> torch.Tensor:
    """Straight-through keep gates ``(T, N)`` from logits ``(T, N, 2)``.

    Forward: the argmax as exact 0.0/1.0 (step 0 forced to 1). Backward: the softmax keep prob.
    """
    p = logits.softmax(-1)[..., 1]
    hard = (logits[..., 1] >= logits[..., 0]).to(p.dtype)
    g = hard + p - p.detach()
    first = torch.ones_like(g[:1])
    return torch.cat([first, g[1:]])


class ConsistencyLoss:
    """Distance between the SubNet's and the full model's final samples ``(B, C, H, W)``."""

    def __init__(self, kind: str = "ssim") -> None:
        fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "ssim": lambda a, b: 1.0 - ssim(a, b),
            "l1": F.l1_loss,
            "l2": F.mse_loss,
        }
        if kind not in fns:
            raise NotImplementedError(f"unknown consistency loss: {kind!r} (expected one of {sorted(fns)})")
        self.kind, self._fn = kind, fns[kind]

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self._fn(student, teacher)


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
    train_steps: int | None = None,
    work_dir: str | Path | None = None,
    checkpoint_every: int = 20,
) -> tuple[Schedule, dict[str, Any]]:
    """Learn a ``[steps x N]`` skip schedule for ``model`` at ``cfg.target_ratio`` of its MACs.

    Args:
        model: the frozen teacher (``UNet2DModel``) or its :class:`BlockGraph`; left unchanged.
        scheduler_config: the teacher's noise-scheduler config (``scheduler.config``).
        cfg: DiP-GO hyper-parameters (``cfg.steps`` optimisation steps, ``cfg.batch_size`` noises
            per step, SGD ``lr``/``weight_decay`` with a cosine schedule, ``alpha_s``, ``loss``).
        steps: T, sampling steps of the protocol the schedule is made for.
        sample_shape: ``(C, H, W)`` of one sample.
        device: where the teacher lives and training runs.
        progress: show a progress bar.
        sampler: inference scheduler name (deterministic DDIM by default).
        train_steps: overrides ``cfg.steps`` (for quick runs).
        work_dir: where the pruner's training state (a :class:`~diffprune.training.TrainState`) is
            checkpointed every ``checkpoint_every`` steps; a rerun resumes from it and ends with
            the same schedule as an uninterrupted run.

    Returns:
        The post-processed :class:`Schedule` and an info dict (timings, loss history, gamma).
    """
    _check_deterministic(sampler)
    n_iter = cfg.steps if train_steps is None else train_steps
    run = _PrunerRun.build(model, scheduler_config, cfg, steps, sample_shape, torch.device(device), sampler, n_iter)
    t0 = time.perf_counter()
    with frozen(run.graph.model):
        # 1. a fixed pool of (noise, full-model sample) pairs, drawn once
        run.draw_pool()
        pool_time = time.perf_counter() - t0
        # 2. resume the pruner, optimizer, LR schedule, generator and history, if checkpointed
        state = run.train_state(Path(work_dir)) if work_dir is not None else None
        start, history = _resume(state, run.device)
        # 3. the few-step gradient optimisation
        bar = tqdm(range(start, n_iter), initial=start, total=n_iter, desc="dipgo", disable=not progress, leave=False)
        for it in bar:
            history.append(run.iteration(it))
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", kept=f"{history[-1]['kept_ratio']:.3f}")
            if state is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == n_iter):
                state.save(it + 1, meta={"history": history})
        run.runner.reset()
    train_time = time.perf_counter() - t0
    # 4. post-processing: threshold the keep scores to the target MACs ratio
    schedule, scores = run.post_process()
    schedule.meta.update({"train_steps": n_iter, "sampler": sampler, "loss": cfg.loss})
    timings = {"train_time_s": train_time, "pool_time_s": pool_time, "train_steps": n_iter}
    return schedule, run.info(schedule, scores, history, timings)


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
    pool_noise: Optional[torch.Tensor] = None   # (P, C, H, W)
    pool_target: Optional[torch.Tensor] = None  # (P, C, H, W)

    @classmethod
    def build(cls, model: nn.Module | BlockGraph, scheduler_config: dict, cfg: DipgoConfig, steps: int,
              sample_shape: Sequence[int], device: torch.device, sampler: str, n_iter: int) -> "_PrunerRun":
        """Costs and gamma of ``model``'s blocks; a freshly seeded pruner, SGD and a cosine LR schedule
        over ``n_iter`` optimisation steps."""
        graph = block_graph(model)
        T, N = steps, len(graph.block_names)
        costs = block_costs(graph, sample_shape)
        gamma = torch.tensor(skip_savings(graph.consumers, costs), dtype=torch.float32, device=device) / costs.full
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(cfg.seed)
            pruner = GatePruner(T, N, cfg.dim, seed=cfg.seed).to(device)
        opt = torch.optim.SGD(pruner.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_iter))
        return cls(cfg, graph, costs, gamma, T, tuple(sample_shape), device, pruner, opt, lr_sched,
                   ConsistencyLoss(cfg.loss), sampling_scheduler(scheduler_config, sampler),
                   torch.Generator().manual_seed(cfg.seed), GatedRunner(graph))

    def train_state(self, work_dir: Path) -> TrainState:
        """The resumable state in ``work_dir/pruner-state``: pruner, optimiser, LR schedule, generator."""
        return TrainState(work_dir / "pruner-state", {"pruner": self.pruner, "opt": self.opt, "lr_sched": self.lr_sched},
                          {"data": self.gen})

    def full_samples(self, noise: torch.Tensor) -> torch.Tensor:
        """The full model's final samples ``(B, C, H, W)`` from ``noise (B, C, H, W)``."""
        keep_all = [[True] * len(self.graph.block_names)] * self.num_steps
        return trajectory(self.runner.denoiser(keep_all), self.sched, noise, self.num_steps)

    def draw_pool(self) -> None:
        """Draw ``cfg.pool_size`` noises and their full-model samples (nothing when 0)."""
        if not self.cfg.pool_size:
            return
        self.pool_noise = torch.randn((self.cfg.pool_size, *self.sample_shape), generator=self.gen).to(self.device)
        chunks = self.pool_noise.split(max(self.cfg.batch_size, 64))
        self.pool_target = torch.cat([self.full_samples(z) for z in chunks])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of noises ``(B, C, H, W)`` and the full model's samples from them (same shape)."""
        if self.pool_noise is not None:
            idx = torch.randint(self.cfg.pool_size, (self.cfg.batch_size,), generator=self.gen).to(self.device)
            return self.pool_noise[idx], self.pool_target[idx]
        noise = torch.randn((self.cfg.batch_size, *self.sample_shape), generator=self.gen).to(self.device)
        return noise, self.full_samples(noise)

    def iteration(self, it: int) -> dict[str, float]:
        """One optimisation step of the pruner; returns its record for the loss history."""
        # 1. noise and the full model's final sample from it
        noise, target = self.batch()
        # 2. gates and the SubNet's final sample, differentiable in the gates
        gates = ste_gates(self.pruner())  # (T, N)
        hard = (gates.detach() > 0.5).tolist()
        kept = gate_table_macs(self.graph.consumers, self.costs, hard) / (self.costs.full * self.num_steps)
        x0 = trajectory(self.runner.denoiser(gates, soft=True), self.sched, noise, self.num_steps, grad=True)
        # 3. consistency + MACs-weighted sparsity (only while above the target)
        l_cons = self.loss_fn(x0, target)
        if kept > self.cfg.target_ratio:
            l_sparse = self.cfg.alpha_s * (gates * self.gamma).sum() / gates.numel()
        else:
            l_sparse = gates.sum() * 0.0
        loss = l_cons + l_sparse
        # 4. SGD and LR-schedule step
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.lr_sched.step()
        return {"step": it, "loss": loss.item(), "consistency": l_cons.item(), "sparsity": l_sparse.item(),
                "kept_ratio": kept}

    def post_process(self) -> tuple[Schedule, torch.Tensor]:
        """The keep scores ``(T, N)`` thresholded to ``cfg.target_ratio``: the schedule, and the scores."""
        with torch.no_grad():
            scores = self.pruner.keep_scores().cpu()
        schedule = schedule_from_scores(scores, self.graph, self.costs, self.cfg.target_ratio, self.cfg.tolerance,
                                        method="dipgo")
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
