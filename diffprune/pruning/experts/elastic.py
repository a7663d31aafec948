"""Elastic depth and width of a diffusers UNet, run through hooks (the weights are never copied).

The *elastic space* of a UNet lists its residual sub-blocks (every ``ResnetBlock2D`` and every
``Attention``) as :class:`ElasticUnit` s:

- **width**: a resnet's hidden width (``conv1`` outputs = ``conv2`` inputs) in whole ``norm2``
  groups, an attention's heads. A sub-network keeps a *prefix* of them: channels are first
  permuted into importance order (:func:`.importance.reorder_units`, function-preserving), so
  "keep ``k``" means "keep the ``k`` most important". Dropping whole groups leaves the statistics of every kept
  ``norm2`` group unchanged, so the masked net equals the physically pruned one.
- **depth**: a sub-block's residual branch can be dropped. An attention with a plain residual
  becomes the identity; a resnet that does not resample becomes its shortcut alone,
  ``shortcut(x) / output_scale_factor`` (the identity when it has no shortcut conv, a 1x1 conv
  where the channels change, as in every up block), so channel-changing resnets are droppable too.
- **stream width**: every segment of the residual stream (:mod:`.elastic_stream`: the channels
  ``conv_in``, the resnets, attentions and resampler convs pass on, GroupNorm-aware blocks as in
  Diff-Pruning) keeps a prefix of every block. The controller zeroes the dropped channels of every
  module output on the segment and runs each GroupNorm that reads it as its pruned self
  (:func:`.elastic_stream.masked_group_norm`), so the masked net equals the pruned one here too.

A :class:`SubnetConfig` picks one sub-network. :class:`ElasticController` installs the hooks
that run it on the full model (hard masks for elastic training, differentiable straight-through
masks for the router), and :meth:`ElasticController.remove` takes them all off again. The MACs of
any config follow from the space exactly (:meth:`ElasticSpace.macs`), without running it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ...models.blocks import resnet_skip
from .elastic_stream import StreamUnit, masked_group_norm
from .space import ATTENTION, MLP, RESNET, ElasticSpace, ElasticUnit, SubnetConfig, elastic_space, sample_subnet

__all__ = ["ATTENTION", "MLP", "RESNET", "ElasticController", "ElasticSpace", "ElasticUnit", "StreamUnit", "SubnetConfig",
           "elastic_hook", "elastic_space", "sample_subnet"]

# ----------------------------------------------------------------------------- hooks

def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input_tensor"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError("elastic depth hook: cannot find the sub-block's input")


class ElasticController:
    """Runs sub-networks of ``model`` by hooks: width masks before ``conv2`` / ``to_out[0]``, depth
    gates mixing a sub-block's output with its input.

    With no config set (or the full one) every hook is a no-op and the model computes exactly what it
    computed before. Use as a context manager, or call :meth:`remove`, to take the hooks off.
    """

    def __init__(self, model: nn.Module, space: ElasticSpace) -> None:
        self.model = model
        self.space = space
        n = len(space.units)
        self._width: list[Optional[torch.Tensor]] = [None] * n   # (G,) unit masks, None = all kept
        self._gate: list[Optional[torch.Tensor]] = [None] * n    # scalar gates, None = kept
        self._stream: list[Optional[torch.Tensor]] = [None] * len(space.streams)  # (C,) channel masks
        self._handles: list[Any] = []
        self.current: Optional[SubnetConfig] = space.full()  # the hard sub-network running (None = relaxed)
        for i, u in enumerate(space.units):
            m = model.get_submodule(u.name)
            target = m.conv2 if u.kind == RESNET else m.net[2] if u.kind == MLP else m.to_out[0]
            self._handles.append(target.register_forward_pre_hook(self._width_hook(i)))
            self._handles.append(m.register_forward_hook(self._depth_hook(i), with_kwargs=True))
        norms: dict[str, list[tuple[int, int]]] = {}
        for s, seg in enumerate(space.streams):  # after the depth hooks: masks what they return too
            for name in seg.outputs:
                self._handles.append(model.get_submodule(name).register_forward_hook(self._stream_hook(s)))
            for name, off in seg.norms:
                norms.setdefault(name, []).append((s, off))
        for name, pieces in norms.items():
            self._handles.append(model.get_submodule(name).register_forward_hook(self._norm_hook(pieces)))

    # -- configuration ---------------------------------------------------------------------
    def set(self, cfg: Optional[SubnetConfig]) -> None:
        """Run the hard sub-network ``cfg`` (None = the full network)."""
        if cfg is None:
            self.reset()
            return
        self.space.check(cfg)
        self.current = cfg
        for i, (u, w, d) in enumerate(zip(self.space.units, cfg.width, cfg.depth)):
            self._width[i] = None if w == u.units else (torch.arange(u.units) < w).float()
            self._gate[i] = None if d else torch.zeros(())
        self._stream = [seg.channel_mask(k) for seg, k in zip(self.space.streams, self.space.stream_of(cfg))]

    def set_relaxed(self, width_masks: Sequence[torch.Tensor], gates: Sequence[torch.Tensor],
                    stream_masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
        """Differentiable sub-network: ``width_masks[i]`` ``(G,)`` and ``gates[i]`` scalar tensors,
        ``stream_masks[s]`` ``(C,)`` channel masks (None = full), typically straight-through (exact
        0/1 forward, soft gradients)."""
        n = len(self.space.units)
        if len(width_masks) != n or len(gates) != n:
            raise ValueError(f"need {n} width masks and gates, got {len(width_masks)}, {len(gates)}")
        streams = list(stream_masks) if stream_masks is not None else [None] * len(self.space.streams)
        if len(streams) != len(self.space.streams):
            raise ValueError(f"need {len(self.space.streams)} stream masks, got {len(streams)}")
        self._width = list(width_masks)
        self._gate = list(gates)
        self._stream = streams
        self.current = None

    @contextmanager
    def full_network(self) -> Iterator[None]:
        """Run the full network inside the ``with`` block, then whatever was set before (hard or relaxed)."""
        saved = self._width, self._gate, self._stream, self.current
        self.reset()
        try:
            yield
        finally:
            self._width, self._gate, self._stream, self.current = saved

    def reset(self) -> None:
        """Run the full network (every hook a no-op)."""
        self.current = self.space.full()
        self._width = [None] * len(self.space.units)
        self._gate = [None] * len(self.space.units)
        self._stream = [None] * len(self.space.streams)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> "ElasticController":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- hooks ---------------------------------------------------------------------------------
    def _width_hook(self, i: int) -> Callable:
        size = self.space.units[i].unit_size
        kind = self.space.units[i].kind

        def hook(mod: nn.Module, args: tuple) -> Optional[tuple]:
            mask = self._width[i]
            if mask is None:
                return None
            x = args[0]  # resnet: (B, C, H, W) into conv2; attention: (B, L, inner) into to_out[0]
            ch = mask.to(device=x.device, dtype=x.dtype).repeat_interleave(size)  # (G * size,)
            shape = (1, -1, 1, 1) if kind == RESNET and x.ndim == 4 else (1,) * (x.ndim - 1) + (-1,)
            return (x * ch.view(shape), *args[1:])

        return hook

    def _depth_hook(self, i: int) -> Callable:
        is_resnet = self.space.units[i].kind == RESNET
        to_zero = self.space.units[i].drop_to == "zero"  # a transformer block's branch: adds nothing

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> Optional[torch.Tensor]:
            g = self._gate[i]
            if g is None:
                return None
            if not g.requires_grad and float(g) != 0.0:
                return None
            x = _hidden(args, kwargs)
            skip = resnet_skip(mod, x) if is_resnet else torch.zeros_like(out) if to_zero else x
            if not g.requires_grad:  # hard gate 0: exactly what the block computes without its branch
                return skip
            g = g.to(device=out.device, dtype=out.dtype)
            return g * out + (1 - g) * skip

        return hook


    def _stream_hook(self, s: int) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
            mask = self._stream[s]
            if mask is None:
                return None
            return out * mask.to(device=out.device, dtype=out.dtype).view(1, -1, *([1] * (out.ndim - 2)))

        return hook

    def _norm_hook(self, pieces: Sequence[tuple[int, int]]) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
            masks = [self._stream[s] for s, _ in pieces]
            if all(m is None for m in masks):
                return None
            return masked_group_norm(mod, args[0], [(off, m, self.space.streams[s].channels)
                                                    for (s, off), m in zip(pieces, masks)])

        return hook


def elastic_hook(controller: ElasticController, drop_prob: float) -> Callable[[int, torch.Generator], None]:
    """A ``train_denoiser`` ``before_step`` that runs a fresh random sub-network every step."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"depth_drop_prob = {drop_prob!r}: must be in [0, 1)")

    def before_step(step: int, gen: torch.Generator) -> None:
        controller.set(sample_subnet(controller.space, gen, drop_prob))

    return before_step
