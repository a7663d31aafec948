"""Surgery on diffusers networks: read and repair the sizes they declare, check a pruned network runs.

Every compression method that changes a diffusers UNet's layers goes through this module:
torch-pruning (Diff-Pruning, :mod:`diffprune.pruning.taylor`) and the physical pruning of timestep
experts (:mod:`diffprune.pruning.experts.prune`) resize ``Conv2d`` / ``Linear`` / ``GroupNorm`` but
not the integers diffusers blocks stored at construction; :func:`repair_attributes` rewrites them
from the real layer shapes and :func:`check_pruned` refuses a network whose declared sizes disagree
with its weights or that cannot run, naming the module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn


class PruningError(RuntimeError):
    """A network cannot be pruned, or pruning left it inconsistent; the message names the layer."""


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every diffusers ``Attention`` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def head_dim(attn: Attention) -> int:
    """Channels per head; pruning removes whole heads, so this never changes with two heads or more.

    Read from the softmax scale ``dim_head ** -0.5`` fixed at construction, so a stale ``heads``
    cannot hide; an attention built without that scale falls back to ``inner_dim // heads``. A
    single-head attention's width is its whole inner width (``to_q`` outputs): Diff-Pruning prunes
    it freely and keeps the teacher's softmax scale.
    """
    if attn.heads == 1:
        return attn.to_q.out_features
    if getattr(attn, "scale_qk", False) and attn.scale > 0:
        return int(round(attn.scale ** -2))
    return attn.inner_dim // attn.heads


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

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def failing(self) -> str:
        """Name of the innermost module still executing ("" for the root)."""
        return self.stack[-1] if self.stack else ""


def _describe(model: nn.Module, name: str) -> str:
    """``"name (Type)"`` of a submodule, ``<root>`` for the model itself."""
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
