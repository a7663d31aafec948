"""Diff-Pruning on a class-conditional DiT: whole attention heads and MLP hidden channels go.

Fang, Ma, Wang (NeurIPS 2023) applied to ``DiTTransformer2DModel``, in :mod:`.taylor`'s steps:
1. one scoring batch of latents ``x0`` with their class labels and one fixed noise;
2. the groups every transformer block owns alone: a *head* of ``attn1`` (its rows of ``to_q``,
   ``to_k``, ``to_v`` and its columns of ``to_out[0]``) and an *MLP hidden channel* (its row of
   ``ff.net[0].proj``, its column of ``ff.net[2]``);
3. gradients of the denoising loss accumulated over ``t = 0, 1, ...`` until ``L_t / L_max < T``
   (:func:`~.taylor.accumulate_timestep_gradients`);
4. the reference's Taylor score ``sum (w * dw)^2`` per group (biases left out, as there); in every
   block ``floor(ratio * heads)`` heads (at least one kept) and ``floor(ratio * hidden)`` MLP
   channels with the lowest scores are cut with torch-pruning's layer pruners;
5. the attributes diffusers stored are repaired (:func:`~.surgery.repair_attributes`) and the
   network is checked.

Deviations, named: the residual width ``D`` is kept (``pos_embed``, every block's adaLN-Zero linear
whose output is six chunks of ``D``, ``proj_out``): torch-pruning's dependency graph would couple
the six chunks into one group; the groups above are fixed by DiT's block structure, so they are
listed here rather than traced. The loss is the MSE on eps (the first ``C`` output channels); DiT
trains its learned-sigma channels with a VLB term, which the score leaves out. The block's
``num_attention_heads`` attribute (read by no forward) keeps its constructed value.
"""

from __future__ import annotations

import copy
import math

import torch
import torch_pruning as tp
from diffusers import DiTTransformer2DModel
from diffusers.models.activations import GELU
from torch import nn

from ..config import ConfigError, TaylorConfig
from ..metrics.cost import MacCounter, num_parameters
from ..training import denoising_loss
from .surgery import PruningError, check_pruned, head_dim, repair_attributes
from .taylor import GradientTrace, accumulate_timestep_gradients, effective_threshold

IMPORTANCES = ("diff-pruning", "taylor", "magnitude")


class _NullConditioned(nn.Module):
    """``(x, t) -> sample`` of a DiT with every row the null class: the call :func:`check_pruned` makes."""

    def __init__(self, model: DiTTransformer2DModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = torch.full((x.shape[0],), int(self.model.config.num_embeds_ada_norm), device=x.device)
        return self.model(x, timestep=t, class_labels=y).sample


def dit_macs(model: DiTTransformer2DModel) -> int:
    """MACs of one unguided call on a batch of ONE latent (guidance doubles it)."""
    c = model.config
    p = next(model.parameters())
    x = torch.zeros((1, c.in_channels, c.sample_size, c.sample_size), device=p.device, dtype=p.dtype)
    with MacCounter(model) as m, torch.no_grad():
        _NullConditioned(model)(x, torch.ones((1,), dtype=torch.long, device=p.device))
    return m.total


def _score(w: torch.Tensor, importance: str) -> torch.Tensor:
    """Per-weight score: ``(w * dw)^2`` (Taylor) or ``w^2`` (magnitude)."""
    return (w * w.grad).pow(2) if importance != "magnitude" else w.pow(2)


def _head_scores(attn, importance: str) -> torch.Tensor:
    """``(heads,)`` summed score of each head's q/k/v rows and output-projection columns."""
    d = head_dim(attn)
    rows = sum(_score(lin.weight, importance).sum(1) for lin in (attn.to_q, attn.to_k, attn.to_v))  # (H d,)
    cols = _score(attn.to_out[0].weight, importance).sum(0)  # (H d,)
    return (rows + cols).reshape(attn.heads, d).sum(1)


def _ff_layers(block) -> tuple[nn.Linear, nn.Linear]:
    act, out = block.ff.net[0], block.ff.net[2]
    if not isinstance(act, GELU):  # GEGLU & co. chunk the projection: not one channel per row
        raise PruningError(f"DiT Diff-Pruning: feed-forward activation {type(act).__name__} is not supported (GELU only)")
    return act.proj, out


def _ff_scores(block, importance: str) -> torch.Tensor:
    """``(hidden,)`` summed score of each MLP hidden channel's input row and output column."""
    proj, out = _ff_layers(block)
    return _score(proj.weight, importance).sum(1) + _score(out.weight, importance).sum(0)


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` lowest-scoring indices (ties by index), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:n])


def _cut_block(block, ratio: float, importance: str) -> None:
    """Step 4 for one block: remove its weakest heads and MLP channels (in place)."""
    attn = block.attn1
    if attn.norm_q is not None or block.attn2 is not None:
        raise PruningError("DiT Diff-Pruning: q/k norms or cross-attention are not supported")
    d, heads = head_dim(attn), attn.heads
    drop_heads = _lowest(_head_scores(attn, importance), min(math.floor(ratio * heads), heads - 1))
    idx = [h * d + i for h in drop_heads for i in range(d)]
    if idx:
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            tp.prune_linear_out_channels(lin, idx)
        tp.prune_linear_in_channels(attn.to_out[0], idx)
    proj, out = _ff_layers(block)
    hidden = proj.out_features
    drop = _lowest(_ff_scores(block, importance), min(math.floor(ratio * hidden), hidden - 1))
    if drop:
        tp.prune_linear_out_channels(proj, drop)
        tp.prune_linear_in_channels(out, drop)


def _gradients(student: DiTTransformer2DModel, scheduler, x0: torch.Tensor, labels: torch.Tensor,
               noise: torch.Tensor, cfg: TaylorConfig) -> GradientTrace:
    """Step 3: the eps loss at ``t = 0, 1, ...`` back-propagated until the threshold stops it."""
    if cfg.importance == "magnitude":
        return GradientTrace(losses=(), timesteps_used=0)
    C = student.config.in_channels

    def eps(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (B, C, h, w): learned sigma left out
        return student(xt, timestep=t, class_labels=labels).sample[:, :C]

    def loss_at(t: int) -> torch.Tensor:
        return denoising_loss(eps, x0, torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device),
                              noise, scheduler)

    steps = min(cfg.max_timesteps, int(scheduler.config.num_train_timesteps))
    trace = accumulate_timestep_gradients(loss_at, threshold=effective_threshold(cfg), max_timesteps=steps)
    for p in student.parameters():  # a weight the loss never reached scores 0
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return trace


def prune_dit(model: DiTTransformer2DModel, scheduler, latents: torch.Tensor, class_labels: torch.Tensor,
              cfg: TaylorConfig) -> tuple[DiTTransformer2DModel, dict]:
    """Prune ``cfg.ratio`` of every block's attention heads and MLP hidden channels (Diff-Pruning).

    The teacher ``model`` is left untouched: a deep copy is scored, pruned and returned.

    Args:
        model: the pre-trained DiT.
        scheduler: its training noise scheduler (``add_noise``, ``num_train_timesteps``).
        latents: ``(N, C, h, w)`` latents of real images (VAE-encoded, scaled), and
        class_labels: their ``(N,)`` classes; the scoring batch is ``cfg.batch_size`` of them.
        cfg: importance (``diff-pruning``, ``taylor`` or ``magnitude``), ratio, threshold, seed.

    Returns:
        ``(pruned, report)`` with the timesteps used, losses, params and MACs before/after.
    """
    if cfg.importance not in IMPORTANCES:
        raise ConfigError(f"taylor.importance = {cfg.importance!r}: expected one of {list(IMPORTANCES)} for DiT")
    if latents.ndim != 4 or latents.shape[0] != len(class_labels) or latents.shape[0] == 0:
        raise ValueError(f"latents {tuple(latents.shape)} and {len(class_labels)} class labels: need N >= 1 of each")
    student = copy.deepcopy(model).eval()
    student.zero_grad(set_to_none=True)
    params_before, macs_before = num_parameters(student), dit_macs(student)
    # 1. one scoring batch (seeded choice), one fixed noise
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(latents.shape[0], generator=gen)[: cfg.batch_size]
    x0, y = latents[idx], torch.as_tensor(class_labels, dtype=torch.long)[idx].to(latents.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    # 2.-3. the groups are fixed per block; their gradients over the early timesteps
    trace = _gradients(student, scheduler, x0, y, noise, cfg)
    # 4. importance -> the weakest heads and MLP channels cut, block by block
    with torch.no_grad():
        for block in student.transformer_blocks:
            _cut_block(block, cfg.ratio, cfg.importance)
    student.zero_grad(set_to_none=True)
    # 5. the integers diffusers stored, then a check that everything agrees and runs
    repair_attributes(student)
    c = student.config
    check_pruned(_NullConditioned(student), (c.in_channels, c.sample_size, c.sample_size), what="pruned DiT")
    return student, {
        "importance": cfg.importance, "ratio": cfg.ratio, "threshold": effective_threshold(cfg),
        "timesteps_used": trace.timesteps_used, "losses": list(trace.losses), "params_before": params_before,
        "params_after": num_parameters(student), "macs_before": macs_before, "macs_after": dit_macs(student),
        "heads": [b.attn1.heads for b in student.transformer_blocks],
        "mlp_hidden": [_ff_layers(b)[0].out_features for b in student.transformer_blocks],
    }
