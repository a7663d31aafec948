"""DiP-GO's pruner network and its few-step gradient optimisation.

The pruner holds ``T x N`` learnable queries (one per sampling step and block), mixes them with one
self-attention + MLP encoder layer, and classifies each with a 2-way head (reuse / compute). The
head's last layer starts at weight 0 and a bias favouring *compute*, so the initial SubNet is the
full model. Gates are the argmax, trained with a straight-through estimator: hard 0/1 forward,
softmax gradient backward.

Training runs the gated SuperNet over the whole ``T``-step trajectory of the frozen teacher from the
same noise as the full model and minimises

    L = consistency(x0_subnet, x0_full) + alpha_s / (N T) * sum_{t,k} gamma_k g_{t,k}

where ``gamma_k`` is the normalised MACs saved by skipping block k (with the blocks it frees) and
the sparsity term is active only while the kept MACs are above the target. Post-processing
thresholds the keep scores (bisection) to land within ``tolerance`` of the target ratio.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ...config import DipgoConfig
from ...io import ArtifactError, atomic_path, read_json, sha256_file
from ...metrics.image import ssim
from ...models.unet import sampling_scheduler
from .graph import BlockGraph, block_graph
from .schedule import Schedule, block_costs, schedule_from_scores, skip_savings, trajectory_macs
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


def run_trajectory(
    step_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler: Any,
    noise: torch.Tensor,
    num_steps: int,
) -> torch.Tensor:
    """The final sample ``(B, C, H, W)`` in [-1, 1] from ``noise`` (the sampler's loop, with grad).

    ``scheduler`` is copied and set to ``num_steps``, so stateful multistep solvers start fresh;
    autograd flows through every step.
    """
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps)
    x = noise
    for i, t in enumerate(sched.timesteps):
        tb = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        # 1. predict the model output
        out = step_fn(sched.scale_model_input(x, t), tb, i)
        # 2. x_t -> x_{t-1}
        x = sched.step(out, t, x).prev_sample
    return x.clamp(-1, 1)


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
        work_dir: where the pruner's training state is checkpointed every ``checkpoint_every``
            steps; a rerun resumes from it and ends with the same schedule as an uninterrupted run.

    Returns:
        The post-processed :class:`Schedule` and an info dict (timings, loss history, gamma).
    """
    if sampler not in DETERMINISTIC_SAMPLERS:
        raise NotImplementedError(
            f"sampler = {sampler!r}: DiP-GO compares SubNet and full-model trajectories from the same noise, "
            f"which needs a deterministic sampler (one of {list(DETERMINISTIC_SAMPLERS)})"
        )
    graph = block_graph(model)
    device = torch.device(device)
    n_iter = cfg.steps if train_steps is None else train_steps
    T, N = steps, len(graph.block_names)
    consumers = graph.consumers
    costs = block_costs(graph, sample_shape)
    full_traj = costs.full * T
    gamma = torch.tensor(skip_savings(consumers, costs), dtype=torch.float32, device=device) / costs.full  # (N,)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(cfg.seed)
        pruner = GatePruner(T, N, cfg.dim, seed=cfg.seed).to(device)
    opt = torch.optim.SGD(pruner.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_iter))
    loss_fn = ConsistencyLoss(cfg.loss)
    sched = sampling_scheduler(scheduler_config, sampler)
    gen = torch.Generator().manual_seed(cfg.seed)
    runner = GatedRunner(graph)
    history: list[dict[str, float]] = []

    def full_samples(noise: torch.Tensor) -> torch.Tensor:
        """The full model's final samples from ``noise (B, C, H, W)``."""
        with torch.no_grad():
            runner.reset()
            return run_trajectory(lambda x, t, i: runner.step_hard(x, t, [True] * N), sched, noise, T)

    t0 = time.perf_counter()
    with frozen(graph.model):
        if cfg.pool_size:  # 0. a fixed pool of (noise, full-model sample) pairs, drawn once
            pool_noise = torch.randn((cfg.pool_size, *sample_shape), generator=gen).to(device)
            pool_target = torch.cat([full_samples(z) for z in pool_noise.split(max(cfg.batch_size, 64))])
        pool_time = time.perf_counter() - t0
        start = 0
        if work_dir is not None and (resumed := _load_state(Path(work_dir))) is not None:
            start, history = _restore(resumed, pruner, opt, lr_sched, gen)
        bar = tqdm(range(start, n_iter), initial=start, total=n_iter, desc="dipgo", disable=not progress, leave=False)
        for it in bar:
            # 1. noise and the full model's final sample from it
            if cfg.pool_size:
                idx = torch.randint(cfg.pool_size, (cfg.batch_size,), generator=gen).to(device)
                noise, target = pool_noise[idx], pool_target[idx]
            else:
                noise = torch.randn((cfg.batch_size, *sample_shape), generator=gen).to(device)
                target = full_samples(noise)
            # 2. gates and the SubNet's final sample, differentiable in the gates
            gates = ste_gates(pruner())  # (T, N)
            hard = (gates.detach() > 0.5).tolist()
            kept = trajectory_macs(consumers, costs, hard) / full_traj
            runner.reset()
            x0 = run_trajectory(lambda x, t, i: runner.step_soft(x, t, gates[i]), sched, noise, T)
            # 3. consistency + MACs-weighted sparsity (only while above the target)
            l_cons = loss_fn(x0, target)
            l_sparse = cfg.alpha_s * (gates * gamma).sum() / (N * T) if kept > cfg.target_ratio else gates.sum() * 0.0
            loss = l_cons + l_sparse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            history.append({"step": it, "loss": loss.item(), "consistency": l_cons.item(),
                            "sparsity": l_sparse.item(), "kept_ratio": kept})
            bar.set_postfix(loss=f"{loss.item():.4f}", kept=f"{kept:.3f}")
            if work_dir is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == n_iter):
                _save_state(Path(work_dir), it + 1, pruner, opt, lr_sched, gen, history)
        runner.reset()
    train_time = time.perf_counter() - t0

    # 4. post-processing: threshold the keep scores to the target MACs ratio
    with torch.no_grad():
        scores = pruner.keep_scores().cpu()
    schedule = schedule_from_scores(scores, graph, costs, cfg.target_ratio, cfg.tolerance, method="dipgo")
    schedule.meta.update({"train_steps": n_iter, "sampler": sampler, "loss": cfg.loss})
    info = {
        "train_time_s": train_time,
        "pool_time_s": pool_time,
        "train_steps": n_iter,
        "sampling_steps": T,
        "batch_size": cfg.batch_size,
        "block_names": graph.block_names,
        "gamma": gamma.cpu().tolist(),
        "block_macs": list(costs.blocks),
        "always_macs": costs.always,
        "final_kept_ratio": history[-1]["kept_ratio"] if history else 1.0,
        "macs_ratio": schedule.macs_ratio,
        "history": history,
        "scores": scores.tolist(),
    }
    return schedule, info



# ----------------------------------------------------------------------------- resumable state

def _save_state(root: Path, step: int, pruner: nn.Module, opt: torch.optim.Optimizer, lr_sched, gen: torch.Generator,
                history: list[dict[str, float]]) -> None:
    """Pruner, optimizer (momentum), LR schedule, RNG and history as safetensors + JSON (no pickle)."""
    tensors = {f"pruner.{k}": v.detach().cpu().contiguous() for k, v in pruner.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.generator"] = gen.get_state()
    meta = {"step": step, "param_groups": osd["param_groups"], "lr_sched": lr_sched.state_dict(), "history": history}
    with atomic_path(root / "pruner-state", is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        meta["sha256"] = sha256_file(tmp / "state.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))


def _load_state(root: Path) -> tuple[dict, dict] | None:
    ck = root / "pruner-state"
    try:
        meta = read_json(ck / "meta.json")
        if sha256_file(ck / "state.safetensors") != meta["sha256"]:
            raise ArtifactError(f"{ck / 'state.safetensors'}: content hash mismatch")
        return meta, load_file(str(ck / "state.safetensors"))
    except (ArtifactError, OSError, KeyError, ValueError):
        return None


def _restore(state: tuple[dict, dict], pruner: nn.Module, opt: torch.optim.Optimizer, lr_sched,
             gen: torch.Generator) -> tuple[int, list[dict[str, float]]]:
    meta, t = state
    pruner.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("pruner.")})
    ostate: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            ostate.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": ostate, "param_groups": meta["param_groups"]})
    lr_sched.load_state_dict(meta["lr_sched"])
    gen.set_state(t["rng.generator"])
    return int(meta["step"]), list(meta["history"])
