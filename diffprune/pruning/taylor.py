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
3. *pruner*: ``torch_pruning.pruner.BasePruner`` with ``pruning_ratio``, after which
   :func:`repair_attributes` rewrites every static attribute pruning left stale and
   :func:`check_pruned` refuses a network whose declared sizes disagree with its weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from ..config import ConfigError, FinetuneConfig, TaylorConfig
from ..metrics.cost import num_parameters, unet_macs
from ..training import TrainSpec, denoising_loss

IMPORTANCES = ("diff-pruning", "taylor", "magnitude", "random")


class PruningError(RuntimeError):
    """A network cannot be pruned, or pruning left it inconsistent; the message names the layer."""


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

    ``diff-pruning`` and ``taylor`` share the Taylor scorer ``|w * grad|`` (they differ only in
    which timesteps fill the gradients); ``magnitude`` is the L2 norm of the weights; ``random`` is
    uniform noise (seeded by the caller).
    """
    if name in ("diff-pruning", "taylor"):
        return tp.importance.GroupTaylorImportance()
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"taylor.importance = {name!r}: expected one of {list(IMPORTANCES)}")


def effective_threshold(cfg: TaylorConfig) -> float:
    """``T`` used for the gradients: the configured one for Diff-Pruning, 0 for plain Taylor."""
    return cfg.threshold if cfg.importance == "diff-pruning" else 0.0


# ----------------------------------------------------------------------------- 3. attention heads

def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every diffusers ``Attention`` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def head_dim(attn: Attention) -> int:
    """Channels per head; pruning removes whole heads, so this never changes.

    Read from the softmax scale ``dim_head ** -0.5`` fixed at construction, so a stale ``heads``
    cannot hide; an attention built without that scale falls back to ``inner_dim // heads``.
    """
    if getattr(attn, "scale_qk", False) and attn.scale > 0:
        return int(round(attn.scale ** -2))
    return attn.inner_dim // attn.heads


def _heads_to_remove(heads: int, ratio: float) -> int:
    """Whole heads to drop: ``floor(ratio * heads)``, always keeping at least one."""
    return max(0, min(heads - 1, int(math.floor(ratio * heads + 1e-9))))


def _head_plan(model: nn.Module, ratio: float) -> tuple[dict[nn.Module, int], dict[nn.Module, float]]:
    """torch-pruning's ``num_heads`` (q/k/v -> heads) and per-attention head pruning ratios."""
    num_heads: dict[nn.Module, int] = {}
    head_ratio: dict[nn.Module, float] = {}
    for name, attn in attention_layers(model).items():
        if any(getattr(attn, proj, None) is None for proj in ("to_q", "to_k", "to_v")):
            raise PruningError(f"{name}: attention without separate to_q/to_k/to_v projections is not supported")
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            num_heads[proj] = attn.heads
        k = _heads_to_remove(attn.heads, ratio)
        # torch-pruning removes ceil(r * heads) heads per layer; (k - 0.5) / heads yields exactly k
        head_ratio[attn] = (k - 0.5) / attn.heads if k > 0 else 0.0
    return num_heads, head_ratio


# ----------------------------------------------------------------------------- 4. repair + check

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)  # a resampler without one (avg-pool, interpolation) keeps no weights


def repair_attributes(model: nn.Module) -> nn.Module:
    """Rewrite every static size attribute pruning made stale, from the real layer shapes (in place).

    ``torch_pruning`` resizes ``Conv2d``/``Linear``/``GroupNorm`` but not the integers that diffusers
    blocks stored at construction and still read in ``forward`` or in checkpoints:

    - ``ResnetBlock2D.in_channels`` / ``.out_channels`` (and its conv-less up/down samplers),
    - ``Downsample2D`` / ``Upsample2D`` ``.channels`` / ``.out_channels`` (asserted in ``forward``),
    - ``Attention.heads`` (used to split heads), ``.inner_dim``, ``.inner_kv_dim``, ``.query_dim``,
      ``.out_dim``. The head width is unchanged because whole heads are removed, so ``.scale``
      stays valid.
    """
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            m.in_channels = m.conv1.in_channels
            m.out_channels = m.conv2.out_channels
            for sampler in (m.upsample, m.downsample):
                conv_less = not isinstance(getattr(sampler, "conv", None), _CONVS)
                if isinstance(sampler, (Downsample2D, Upsample2D)) and conv_less:
                    sampler.channels = sampler.out_channels = m.in_channels  # resamples the block input
        elif isinstance(m, (Downsample2D, Upsample2D)):
            conv = getattr(m, "conv", None)
            if isinstance(conv, _CONVS):
                m.channels = conv.in_channels
                m.out_channels = conv.out_channels
        elif isinstance(m, Attention):
            width = head_dim(m)
            inner = m.to_q.out_features
            if inner % width:
                raise PruningError(f"{name}: to_q has {inner} outputs, not a multiple of the head width {width}")
            m.heads = inner // width
            m.inner_dim = inner
            m.inner_kv_dim = m.to_k.out_features
            m.query_dim = m.to_q.in_features
            m.out_dim = m.to_out[0].out_features
    return model


def _declared_mismatch(m: nn.Module) -> Optional[str]:
    """Why ``m``'s declared sizes disagree with its weights, or None when they agree."""
    if isinstance(m, nn.Conv2d):
        w = m.weight.shape  # (out, in / groups, kh, kw)
        if w[0] != m.out_channels or w[1] * m.groups != m.in_channels or w.numel() == 0:
            return f"declares {m.in_channels}->{m.out_channels} channels, weight is {tuple(w)}"
    elif isinstance(m, nn.Linear):
        w = m.weight.shape  # (out, in)
        if tuple(w) != (m.out_features, m.in_features) or w.numel() == 0:
            return f"declares {m.in_features}->{m.out_features} features, weight is {tuple(w)}"
    elif isinstance(m, nn.GroupNorm):
        if m.num_channels == 0 or m.num_channels % m.num_groups:
            return f"{m.num_channels} channels cannot form {m.num_groups} groups"
        if m.affine and m.weight.shape[0] != m.num_channels:
            return f"declares {m.num_channels} channels, weight is {tuple(m.weight.shape)}"
    elif isinstance(m, ResnetBlock2D):
        if (m.in_channels, m.out_channels) != (m.conv1.in_channels, m.conv2.out_channels):
            return (f"declares {m.in_channels}->{m.out_channels} channels, convs are "
                    f"{m.conv1.in_channels}->{m.conv2.out_channels}")
    elif isinstance(m, (Downsample2D, Upsample2D)):
        conv = getattr(m, "conv", None)
        if isinstance(conv, _CONVS) and (m.channels, m.out_channels) != (conv.in_channels, conv.out_channels):
            return (f"declares {m.channels}->{m.out_channels} channels, conv is "
                    f"{conv.in_channels}->{conv.out_channels}")
    elif isinstance(m, Attention):
        q, k, o = m.to_q, m.to_k, m.to_out[0]
        declared = (m.heads * head_dim(m), m.inner_dim, m.query_dim, m.inner_kv_dim, m.out_dim)
        if declared != (q.out_features, q.out_features, q.in_features, k.out_features, o.out_features):
            return (f"declares heads={m.heads}, inner_dim={m.inner_dim}, query_dim={m.query_dim}, "
                    f"inner_kv_dim={m.inner_kv_dim}, out_dim={m.out_dim}; to_q is {q.in_features}->"
                    f"{q.out_features}, to_k has {k.out_features} outputs, to_out {o.out_features}")
    return None


class _ModuleStack:
    """Forward hooks that keep the stack of modules being executed, to name the one that fails."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self._handles: list = []

    def __enter__(self) -> "_ModuleStack":
        for name, m in self.model.named_modules():
            self._handles.append(m.register_forward_pre_hook(lambda mod, inp, n=name: self._enter(n)))
            self._handles.append(m.register_forward_hook(lambda mod, inp, out: self._leave()))
        return self

    def _enter(self, name: str) -> None:
        self.stack.append(name)

    def _leave(self) -> None:  # a forward hook must return None, or it replaces the output
        self.stack.pop()

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def failing(self) -> str:
        return self.stack[-1] if self.stack else ""


def _describe(model: nn.Module, name: str) -> str:
    m = model.get_submodule(name) if name else model
    return f"{name or '<root>'} ({type(m).__name__})"


@torch.no_grad()
def check_pruned(model: nn.Module, sample_shape: tuple[int, ...], what: str = "pruned network") -> None:
    """Refuse a network whose declared sizes disagree with its weights, or that cannot run.

    Args:
        sample_shape: ``(C, H, W)`` of one input image.
        what: how the error message calls the network.

    Raises:
        PruningError: naming the first module whose attributes disagree with its weights, else the
            innermost module whose ``forward`` raised on a dummy ``(1, C, H, W)`` input.
    """
    for name, m in model.named_modules():
        why = _declared_mismatch(m)
        if why is not None:
            raise PruningError(f"{what} is inconsistent at {_describe(model, name)}: {why}")
    p = next(model.parameters())
    x = torch.zeros((1, *sample_shape), dtype=p.dtype, device=p.device)
    t = torch.ones((1,), dtype=torch.long, device=p.device)
    with _ModuleStack(model) as calls:
        try:
            model(x, t)
        except (RuntimeError, AssertionError, ValueError, IndexError) as e:
            where = _describe(model, calls.failing())
            raise PruningError(f"{what} fails at {where}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- 5. the pipeline

def _forward(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    out = model(*inputs)
    return out.sample if hasattr(out, "sample") else out


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


def prune_unet(
    model: UNet2DModel,
    scheduler,
    images: torch.Tensor,
    cfg: TaylorConfig,
    device: str | torch.device = "cpu",
) -> tuple[UNet2DModel, dict]:
    """Prune ``cfg.ratio`` of the channels of every layer of a diffusers UNet (Diff-Pruning).

    The teacher ``model`` is left untouched: a deep copy is scored, pruned and returned.

    Args:
        model: the pre-trained UNet; its ``conv_out`` keeps all its output channels.
        scheduler: the teacher's training noise scheduler (``add_noise``, ``num_train_timesteps``).
        images: ``(N, C, H, W)`` real images in [-1, 1]; ``cfg.batch_size`` of them (seeded choice)
            form the one batch ``x0`` scored at every timestep.
        cfg: importance, ratio, threshold ``T``, batch size, timestep cap and seed.
        device: where the scoring runs; the pruned model is returned there.

    Returns:
        ``(pruned, report)`` with ``report`` holding ``importance``, ``ratio``, ``threshold`` (the
        one applied), ``timesteps_used``, ``losses`` (``L_t`` per evaluated ``t``),
        ``params_before/after`` and ``macs_before/after`` (one ``(1, C, H, W)`` call).

    ``ratio`` follows torch-pruning: every layer keeps ``int((1 - ratio) * g)`` channels of each of
    the groups of ``g`` channels a GroupNorm ties together (so small groups lose more than
    ``ratio``), and attention keeps ``heads - floor(ratio * heads)`` whole heads (at least one).
    The report's params and MACs give the reduction actually achieved.

    Raises:
        PruningError: naming the layer, when torch-pruning cannot handle the network or the
            pruned network is inconsistent.
    """
    if cfg.importance not in IMPORTANCES:
        raise ConfigError(f"taylor.importance = {cfg.importance!r}: expected one of {list(IMPORTANCES)}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    device = torch.device(device)
    sample_shape = tuple(int(s) for s in images.shape[1:])  # (C, H, W)
    student = copy.deepcopy(model).to(device).eval()
    student.zero_grad(set_to_none=True)
    check_pruned(student, sample_shape, what="network to prune")  # fails here, not inside torch-pruning
    params_before, macs_before = num_parameters(student), unet_macs(student, sample_shape)

    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)  # RandomImportance draws from the global generator
        gen = torch.Generator().manual_seed(cfg.seed)
        # 1. one batch of real images and one fixed noise tensor
        idx = torch.randperm(images.shape[0], generator=gen)[: cfg.batch_size]
        x0 = images[idx].to(device)  # (B, C, H, W)
        noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, C, H, W)

        # 2. channel groups: trace the dependency graph, whole attention heads, conv_out protected
        num_heads, head_ratio = _head_plan(student, cfg.ratio)
        last = _LastGroup()
        example = (x0[:1], torch.zeros((1,), dtype=torch.long, device=device))
        try:
            pruner = tp.pruner.BasePruner(
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
            raise PruningError(f"torch-pruning cannot trace {type(model).__name__}: {type(e).__name__}: {e}") from e

        # 3. gradients accumulated over the early timesteps (Taylor importances only)
        trace = GradientTrace(losses=(), timesteps_used=0)
        if cfg.importance in ("diff-pruning", "taylor"):
            steps = min(cfg.max_timesteps, int(scheduler.config.num_train_timesteps))
            trace = accumulate_timestep_gradients(
                timestep_loss(student, scheduler, x0, noise), threshold=effective_threshold(cfg), max_timesteps=steps
            )
            for p in student.parameters():  # a layer the loss never reached scores 0, not a crash
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        # 4. score every group and remove the lowest-ranked channels / heads
        try:
            for group in pruner.step(interactive=True):
                last.group = group
                group.prune()
        except (RuntimeError, ValueError, IndexError, AssertionError, KeyError) as e:
            raise _pruning_failure(pruner, last.group, e) from e
    student.zero_grad(set_to_none=True)

    # 5. the integers diffusers stored at construction, then a check that everything agrees
    repair_attributes(student)
    check_pruned(student, sample_shape)
    report = {
        "importance": cfg.importance,
        "ratio": cfg.ratio,
        "threshold": effective_threshold(cfg) if cfg.importance in ("diff-pruning", "taylor") else None,
        "timesteps_used": trace.timesteps_used,
        "losses": list(trace.losses),
        "params_before": params_before,
        "params_after": num_parameters(student),
        "macs_before": macs_before,
        "macs_after": unet_macs(student, sample_shape),
    }
    return student, report


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
