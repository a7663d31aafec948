"""Diff-Pruning: structural pruning of a diffusion UNet by a Taylor expansion over pruned timesteps.

Fang, Ma, Wang, "Structural Pruning for Diffusion Models", NeurIPS 2023. One batch of real images
``x0`` and one fixed noise tensor are pushed through the forward process at ``t = 0, 1, 2, ...``
(every sample at the same ``t``); the noise-prediction losses are back-propagated one by one, so
the gradients *accumulate* over timesteps. Accumulation stops at the first ``t`` whose loss falls
below ``threshold * L_max``: the late, noisy steps carry little information about the content and
only add noise to the gradient. The first-order Taylor score ``|w * dL/dw|`` of every coupled
channel group then ranks channels, and the lowest ``ratio`` of each layer is removed.

The code keeps Torch-Pruning's three concerns apart and wraps it rather than forking it:

1. *groups*: ``torch_pruning``'s dependency graph couples every layer that shares a channel; the
   q/k/v projections of every diffusers ``Attention`` are declared multi-head so whole heads go.
2. *importance*: :func:`make_importance` (Taylor on accumulated gradients, or the ablations
   magnitude / random); the gradients come from :func:`accumulate_timestep_gradients`.
3. *pruner*: :class:`~diffprune.pruning.groupnorm.GroupwisePruner` (a ``BasePruner`` removing
   ``floor(ratio * g)`` channels, by importance, from every GroupNorm group of ``g``), after which
   :func:`~diffprune.pruning.surgery.repair_attributes` rewrites every static attribute pruning left
   stale and :func:`~diffprune.pruning.surgery.check_pruned` refuses a network whose declared sizes
   disagree with its weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from torch import nn

from ..config import ConfigError, FinetuneConfig, TaylorConfig
from ..metrics.cost import num_parameters, unet_macs
from ..sampling import predict
from ..training import TrainSpec, denoising_loss
from .groupnorm import GroupwisePruner, ReferenceTaylorImportance, head_plan
from .ratio import RatioSearch, bisect_ratio  # noqa: F401  (part of this module's API)
from .surgery import PruningError, check_pruned, repair_attributes

__all__ = ["IMPORTANCES", "PruningError", "GradientTrace", "accumulate_timestep_gradients", "timestep_loss",
           "make_importance", "effective_threshold", "prune_unet", "scoring_indices", "RatioSearch", "search_ratio",
           "finetune_spec"]

IMPORTANCES = ("diff-pruning", "taylor", "magnitude", "random")


# ----------------------------------------------------------------------------- 1. gradients

@dataclass(frozen=True)
class GradientTrace:
    """What :func:`accumulate_timestep_gradients` did.

    Attributes:
        losses: ``L_t`` for every timestep evaluated, ``t = 0, 1, ...`` (the last one is the step
            that stopped the loop, when the threshold stopped it).
        timesteps_used: how many timesteps contributed gradients (``t = 0 .. timesteps_used-1``).
    """

    losses: tuple[float, ...]
    timesteps_used: int


def accumulate_timestep_gradients(
    loss_at: Callable[[int], torch.Tensor], *, threshold: float, max_timesteps: int
) -> GradientTrace:
    """Back-propagate ``loss_at(t)`` for ``t = 0, 1, ...`` so the gradients add up.

    Tracks ``L_max``, the largest loss seen so far, and stops (without back-propagating) at the
    first ``t`` with ``L_t / L_max < threshold``; ``threshold = 0`` uses all ``max_timesteps``.

    Args:
        loss_at: ``t -> scalar loss`` with a graph to the parameters being scored.
        threshold: ``T`` in [0, 1].
        max_timesteps: upper bound on the number of timesteps evaluated.

    Returns:
        The losses seen and how many timesteps contributed gradients.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"taylor.threshold = {threshold!r}: must be in [0, 1]")
    if max_timesteps < 1:
        raise ConfigError(f"taylor.max_timesteps = {max_timesteps!r}: must be >= 1")
    losses: list[float] = []
    l_max = 0.0
    used = 0
    for t in range(max_timesteps):
        loss = loss_at(t)
        value = float(loss.detach())
        losses.append(value)
        l_max = max(l_max, value)
        # stop once the relative loss says this step (and the noisier ones after it) carries little
        if threshold > 0 and value < threshold * l_max:
            break
        loss.backward()
        used += 1
    return GradientTrace(losses=tuple(losses), timesteps_used=used)


def timestep_loss(model: nn.Module, scheduler, x0: torch.Tensor, noise: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """``t -> L_t``: the denoising loss of ``model`` with every sample noised to the same ``t``.

    Args:
        x0: ``(B, C, H, W)`` clean images in [-1, 1].
        noise: ``(B, C, H, W)`` the one fixed noise tensor, reused at every ``t``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")

    def loss_at(t: int) -> torch.Tensor:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)  # (B,)
        return denoising_loss(model, x0, tt, noise, scheduler)

    return loss_at


# ----------------------------------------------------------------------------- 2. importance

def make_importance(name: str) -> tp.importance.Importance:
    """The channel-group scorer ``group -> (n_channels,)`` for an importance name.

    ``diff-pruning`` and ``taylor`` share the reference's Taylor scorer, ``(w * grad)^2`` summed over
    the coupled layers, GroupNorm affine weights included (they differ only in which timesteps fill
    the gradients); ``magnitude`` is the L2 norm of the weights; ``random`` is uniform noise (seeded
    by the caller). Every scorer only ranks channels within a GroupNorm block (:mod:`.groupnorm`).
    """
    if name in ("diff-pruning", "taylor"):
        return ReferenceTaylorImportance()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"taylor.importance = {name!r}: expected one of {list(IMPORTANCES)}")


def effective_threshold(cfg: TaylorConfig) -> float:
    """``T`` used for the gradients: the configured one for Diff-Pruning, 0 for plain Taylor."""
    return cfg.threshold if cfg.importance == "diff-pruning" else 0.0


# ----------------------------------------------------------------------------- 3. the pipeline

def _forward(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return predict(model, *inputs)


def _output_layer(model: nn.Module) -> nn.Module:
    out = getattr(model, "conv_out", None)
    if not isinstance(out, nn.Conv2d):
        raise PruningError(f"{type(model).__name__} has no conv_out output convolution to protect from pruning")
    return out


class _LastGroup:
    """The group torch-pruning touched last (scored or pruned), to name it if pruning fails."""

    def __init__(self) -> None:
        self.group = None


class _TrackedImportance(tp.importance.Importance):
    """Delegates to ``inner``; records every group it scores in ``last``."""

    def __init__(self, inner: tp.importance.Importance, last: _LastGroup) -> None:
        self.inner = inner
        self.last = last

    def __call__(self, group) -> Optional[torch.Tensor]:
        self.last.group = group
        return self.inner(group)


def _pruning_failure(pruner: tp.pruner.BasePruner, group, error: Exception) -> PruningError:
    names: list[str] = []
    for dep, _ in group or ():
        n = pruner.DG._module2name.get(dep.target.module)
        if n is not None and n not in names:
            names.append(n)
    if not names:
        return PruningError(f"torch-pruning failed before scoring any layer: {type(error).__name__}: {error}")
    coupled = f" (coupled with {', '.join(names[1:6])}{', ...' if len(names) > 6 else ''})" if len(names) > 1 else ""
    return PruningError(
        f"torch-pruning cannot prune the channel group of {names[0]}{coupled}: {type(error).__name__}: {error}"
    )


def _draw_indices(n: int, cfg: TaylorConfig, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[: cfg.batch_size]


def scoring_indices(n: int, cfg: TaylorConfig) -> torch.Tensor:
    """``(B,)`` indices of the images :func:`prune_unet` scores, out of ``n``: a conditional model's
    wrapper aligns its per-image conditioning with them."""
    return _draw_indices(n, cfg, torch.Generator().manual_seed(cfg.seed))


def _scoring_batch(images: torch.Tensor, cfg: TaylorConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``cfg.batch_size`` real images (seeded choice) and one fixed noise tensor.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1].

    Returns:
        ``(x0, noise)``, both ``(B, C, H, W)`` on ``device``.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = _draw_indices(images.shape[0], cfg, gen)
    x0 = images[idx].to(device)  # (B, C, H, W)
    noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, C, H, W)
    return x0, noise


def _channel_groups(student: nn.Module, x0: torch.Tensor, cfg: TaylorConfig, last: _LastGroup) -> tp.pruner.BasePruner:
    """Step 2: trace the dependency graph; whole attention heads, ``conv_out`` protected.

    Args:
        x0: ``(B, C, H, W)``; its first image is the example input of the trace.
    """
    num_heads, head_ratio = head_plan(student, cfg.ratio)
    example = (x0[:1], torch.zeros((1,), dtype=torch.long, device=x0.device))
    try:
        return GroupwisePruner(
            student,
            example_inputs=example,
            importance=_TrackedImportance(make_importance(cfg.importance), last),
            pruning_ratio=cfg.ratio,
            ignored_layers=[_output_layer(student)],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,  # keep the head width, so Attention.scale stays right
            head_pruning_ratio_dict=head_ratio,
            forward_fn=_forward,
        )
    except (RuntimeError, ValueError, IndexError, AssertionError, KeyError) as e:
        raise PruningError(f"torch-pruning cannot trace {type(student).__name__}: {type(e).__name__}: {e}") from e


def _taylor_gradients(student: nn.Module, scheduler, x0: torch.Tensor, noise: torch.Tensor,
                      cfg: TaylorConfig, timesteps: Optional[tuple[int, int]] = None) -> GradientTrace:
    """Step 3: gradients accumulated over the early timesteps (Taylor importances only).

    Args:
        x0, noise: ``(B, C, H, W)`` the scoring batch and its fixed noise.
        timesteps: ``[lo, hi)``: accumulate from ``t = lo`` on and never past ``hi`` (a timestep
            expert's interval); None: from ``t = 0`` (Diff-Pruning).
    """
    if cfg.importance not in ("diff-pruning", "taylor"):
        return GradientTrace(losses=(), timesteps_used=0)
    total = int(scheduler.config.num_train_timesteps)
    lo, hi = timesteps if timesteps is not None else (0, total)
    if not 0 <= lo < hi <= total:
        raise ConfigError(f"timesteps = {timesteps!r}: expected 0 <= lo < hi <= {total}")
    loss_at = timestep_loss(student, scheduler, x0, noise)
    trace = accumulate_timestep_gradients(lambda t: loss_at(lo + t), threshold=effective_threshold(cfg),
                                          max_timesteps=min(cfg.max_timesteps, hi - lo))
    for p in student.parameters():  # a layer the loss never reached scores 0, not a crash
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return trace


def _remove_lowest(pruner: tp.pruner.BasePruner, last: _LastGroup) -> None:
    """Step 4: score every group and remove the lowest-ranked channels / heads (in place)."""
    try:
        for group in pruner.step(interactive=True):
            last.group = group
            group.prune()
    except (RuntimeError, ValueError, IndexError, AssertionError, KeyError) as e:
        raise _pruning_failure(pruner, last.group, e) from e


def prune_unet(
    model: UNet2DModel,
    scheduler,
    images: torch.Tensor,
    cfg: TaylorConfig,
    device: str | torch.device = "cpu",
    timesteps: Optional[tuple[int, int]] = None,
) -> tuple[UNet2DModel, dict]:
    """Prune ``cfg.ratio`` of the channels of every layer of a diffusers UNet (Diff-Pruning).

    The teacher ``model`` is left untouched: a deep copy is scored, pruned and returned.
    As in the reference, every GroupNorm group of ``g`` channels loses its ``floor(ratio * g)`` least
    important channels (at most ``g - 1``), a layer without GroupNorm ``floor(ratio * C)``; multi-head
    attention keeps ``heads - floor(ratio * heads)`` whole heads (at least one).

    Args:
        model: the pre-trained UNet; its ``conv_out`` keeps all its output channels.
        scheduler: the teacher's training noise scheduler (``add_noise``, ``num_train_timesteps``).
        images: ``(N, C, H, W)`` real images in [-1, 1], from which the one scoring batch is drawn.
        cfg: importance, ratio, threshold ``T``, batch size, timestep cap and seed.
        device: where the scoring runs; the pruned model is returned there.
        timesteps: ``[lo, hi)``: the gradients accumulate from ``lo`` (a timestep expert's interval).

    Returns:
        ``(pruned, report)``: ``importance``, ``ratio``, ``threshold`` (the one applied), ``timesteps_used``,
        ``losses`` (``L_t`` per evaluated ``t``), ``params_before/after``, ``macs_before/after`` (one image).

    Raises:
        PruningError: naming the layer, when torch-pruning cannot handle the network or the pruned
            network is inconsistent.
    """
    if cfg.importance not in IMPORTANCES:
        raise ConfigError(f"taylor.importance = {cfg.importance!r}: expected one of {list(IMPORTANCES)}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    device = torch.device(device)
    sample_shape = tuple(int(s) for s in images.shape[1:])  # (C, H, W)
    student = copy.deepcopy(model).to(device).eval().requires_grad_(True)  # a frozen model traces too
    student.zero_grad(set_to_none=True)
    check_pruned(student, sample_shape, what="network to prune")  # fails here, not inside torch-pruning
    params_before, macs_before = num_parameters(student), unet_macs(student, sample_shape)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # RandomImportance draws from the global generator
        x0, noise = _scoring_batch(images, cfg, device)  # 1. one batch, one fixed noise
        last = _LastGroup()
        pruner = _channel_groups(student, x0, cfg, last)  # 2. channel groups
        trace = _taylor_gradients(student, scheduler, x0, noise, cfg, timesteps)  # 3. gradients over early t
        _remove_lowest(pruner, last)  # 4. importance -> pruner
    student.zero_grad(set_to_none=True)

    # 5. the integers diffusers stored at construction, then a check that everything agrees
    repair_attributes(student)
    check_pruned(student, sample_shape)
    taylor = cfg.importance in ("diff-pruning", "taylor")
    return student, {
        "importance": cfg.importance, "ratio": cfg.ratio, "threshold": effective_threshold(cfg) if taylor else None,
        "timesteps_used": trace.timesteps_used, "losses": list(trace.losses), "params_before": params_before,
        "timestep_range": timesteps and list(timesteps), "params_after": num_parameters(student),
        "macs_before": macs_before, "macs_after": unet_macs(student, sample_shape)}


def search_ratio(model: UNet2DModel, images: torch.Tensor, cfg: TaylorConfig, target: float, *,
                 tolerance: float = 0.02, iters: int = 14, device: str | torch.device = "cpu") -> RatioSearch:
    """Bisect the channel ratio until pruned / teacher MACs is within ``tolerance`` (relative) of ``target``.

    The channels and heads removed depend on the ratio only, never on the scores, so every probe
    prunes by magnitude (no gradient pass); the MACs move in steps, so the closest probe is returned
    and ``within`` says whether it met the tolerance.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1]; one image suffices (it only traces the graph).
        target: kept MACs fraction in (0, 1).
    """
    probe_cfg = dataclasses.replace(cfg, importance="magnitude", batch_size=1)

    def macs_at(ratio: float) -> float:
        rep = prune_unet(model, None, images[:1], dataclasses.replace(probe_cfg, ratio=ratio), device=device)[1]
        return rep["macs_after"] / rep["macs_before"]

    return bisect_ratio(macs_at, target, tolerance=tolerance, iters=iters)


def finetune_spec(cfg: FinetuneConfig, teacher_steps: int) -> TrainSpec:
    """The fine-tuning run of a pruned net: ``ceil(fraction * teacher_steps)`` steps."""
    if teacher_steps < 1:
        raise ConfigError(f"teacher.steps = {teacher_steps!r}: must be >= 1")
    steps = max(1, math.ceil(round(cfg.fraction * teacher_steps, 6)))  # round: 0.1 * 30 is 3.0000000000000004
    return TrainSpec(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        ema_decay=cfg.ema_decay,
        checkpoint_every=cfg.checkpoint_every,
        seed=cfg.seed,
        warmup_steps=cfg.warmup_steps,
        distill=cfg.distill,
    )
