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

A :class:`SubnetConfig` picks one sub-network. :class:`ElasticController` installs the hooks
that run it on the full model (hard masks for elastic training, differentiable straight-through
masks for the router), and :meth:`ElasticController.remove` takes them all off again. The MACs of
any config follow from the space exactly (:meth:`ElasticSpace.macs`), without running it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ...metrics.cost import MacCounter
from ...models.blocks import resnet_skip
from ..surgery import head_dim

RESNET, ATTENTION = "resnet", "attention"


# ----------------------------------------------------------------------------- the space

@dataclass(frozen=True)
class ElasticUnit:
    """One residual sub-block of the UNet and what a sub-network may change in it.

    Attributes:
        name: module path, e.g. ``"mid_block.resnets.0"``.
        kind: ``"resnet"`` (width unit = one ``norm2`` group) or ``"attention"`` (width unit = a head).
        units: ``G``, the number of groups / heads (1 = width not elastic).
        unit_size: channels per group / per head.
        channels: channels of the sub-block's input and output (the residual stream).
        droppable: whether the sub-block's residual branch may be dropped.
        macs_fixed: MACs (one image) of the sub-block that do not depend on its width.
        macs_per_unit: MACs (one image) added by each kept group / head.
        macs_skip: MACs (one image) of the sub-block when dropped (its shortcut conv, if any).
    """

    name: str
    kind: str
    units: int
    unit_size: int
    channels: int
    droppable: bool
    macs_fixed: int
    macs_per_unit: int
    macs_skip: int = 0


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network: ``width[i]`` groups/heads kept in unit ``i``, ``depth[i]`` False = dropped."""

    width: tuple[int, ...]
    depth: tuple[bool, ...]

    def to_json(self) -> dict:
        return {"width": list(self.width), "depth": list(self.depth)}

    @classmethod
    def from_json(cls, d: dict) -> "SubnetConfig":
        return cls(tuple(int(w) for w in d["width"]), tuple(bool(x) for x in d["depth"]))


@dataclass(frozen=True)
class ElasticSpace:
    """The elastic units of a UNet, the MACs outside them, and the smallest width trained.

    Attributes:
        units: the sub-blocks in ``named_modules`` order.
        base_macs: MACs (one image) of everything outside the units (stem, head, resamplers, ...).
        min_width: smallest width keep-ratio a sub-network may use.
    """

    units: tuple[ElasticUnit, ...]
    base_macs: int
    min_width: float

    def min_keep(self, i: int) -> int:
        """Fewest groups/heads unit ``i`` may keep: ``ceil(min_width * G)``, at least 1."""
        g = self.units[i].units
        return max(1, min(g, math.ceil(round(self.min_width * g, 9))))

    def full(self) -> SubnetConfig:
        return SubnetConfig(tuple(u.units for u in self.units), tuple(True for _ in self.units))

    def smallest(self) -> SubnetConfig:
        return SubnetConfig(tuple(self.min_keep(i) for i in range(len(self.units))),
                            tuple(not u.droppable for u in self.units))

    def check(self, cfg: SubnetConfig) -> None:
        """Raise ``ValueError`` naming the first unit ``cfg`` sets outside the space."""
        if len(cfg.width) != len(self.units) or len(cfg.depth) != len(self.units):
            raise ValueError(f"config has {len(cfg.width)} widths / {len(cfg.depth)} gates, "
                             f"the space has {len(self.units)} units")
        for i, (u, w, d) in enumerate(zip(self.units, cfg.width, cfg.depth)):
            if not self.min_keep(i) <= w <= u.units:
                raise ValueError(f"{u.name}: width {w} outside [{self.min_keep(i)}, {u.units}]")
            if not d and not u.droppable:
                raise ValueError(f"{u.name}: this {u.kind} cannot be dropped (its input and output differ)")

    def macs(self, cfg: SubnetConfig) -> int:
        """MACs of one ``(1, C, H, W)`` call of the sub-network ``cfg`` (exact, integer)."""
        self.check(cfg)
        return self.base_macs + sum(u.macs_fixed + u.macs_per_unit * w if d else u.macs_skip
                                    for u, w, d in zip(self.units, cfg.width, cfg.depth))

    def full_macs(self) -> int:
        return self.macs(self.full())

    def to_json(self) -> dict:
        return {"units": [asdict(u) for u in self.units], "base_macs": self.base_macs, "min_width": self.min_width}

    @classmethod
    def from_json(cls, d: dict) -> "ElasticSpace":
        return cls(tuple(ElasticUnit(**u) for u in d["units"]), int(d["base_macs"]), float(d["min_width"]))


def _resnet_width_elastic(m: ResnetBlock2D) -> bool:
    return getattr(m, "time_embedding_norm", "default") == "default" and isinstance(m.norm2, nn.GroupNorm)


def _resnet_droppable(m: ResnetBlock2D) -> bool:
    """Whether the residual branch can go, leaving ``shortcut(x) / output_scale_factor``."""
    if m.up or m.down:
        return False
    if m.conv_shortcut is not None:
        return True
    return m.conv1.in_channels == m.conv2.out_channels and m.output_scale_factor == 1


def _attention_supported(name: str, m: Attention) -> None:
    if getattr(m, "to_k", None) is None or getattr(m, "to_v", None) is None or m.is_cross_attention:
        raise NotImplementedError(f"{name}: only self-attention with to_q/to_k/to_v is supported")
    if getattr(m, "add_k_proj", None) is not None:
        raise NotImplementedError(f"{name}: attention with added key/value projections is not supported")


def _attention_droppable(m: Attention) -> bool:
    return bool(m.residual_connection) and m.rescale_output_factor == 1 and m.query_dim == m.out_dim


def elastic_space(model: nn.Module, sample_shape: Sequence[int], min_width: float) -> ElasticSpace:
    """The elastic space of a diffusers UNet, with the MACs of every unit measured once.

    Args:
        model: the full (unpruned) UNet.
        sample_shape: ``(C, H, W)`` of one input image.
        min_width: smallest width keep-ratio, in ``(0, 1]``.
    """
    if not 0.0 < min_width <= 1.0:
        raise ValueError(f"min_width = {min_width!r}: must be in (0, 1]")
    p = next(model.parameters())
    x = torch.zeros((1, *sample_shape), dtype=p.dtype, device=p.device)
    t = torch.ones((1,), dtype=torch.long, device=p.device)
    with torch.no_grad(), MacCounter(model, per_module=True) as counter:
        model(x, t)
    per = counter.per_module or {}

    def under(prefix: str) -> int:
        return sum(v for n, v in per.items() if n == prefix or n.startswith(prefix + "."))

    units: list[ElasticUnit] = []
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            if _resnet_width_elastic(m):
                g, size = m.norm2.num_groups, m.conv1.out_channels // m.norm2.num_groups
                scaled = sum(per.get(f"{name}.{c}", 0) for c in ("conv1", "time_emb_proj", "conv2"))
            else:
                g, size, scaled = 1, m.conv1.out_channels, 0
            kind, channels, droppable = RESNET, m.conv1.in_channels, _resnet_droppable(m)
            skip = per.get(f"{name}.conv_shortcut", 0) if droppable else 0
        elif isinstance(m, Attention):
            _attention_supported(name, m)
            g, size = m.heads, head_dim(m)
            scaled = under(name)  # projections and both attention products scale with the heads
            kind, channels, droppable = ATTENTION, m.query_dim, _attention_droppable(m)
            skip = 0
        else:
            continue
        total = under(name)
        if g > 1 and scaled % g:
            raise RuntimeError(f"{name}: {scaled} width-dependent MACs do not split over {g} units")
        per_unit = scaled // g if g > 1 else 0
        units.append(ElasticUnit(name, kind, g, size, channels, droppable, total - per_unit * g, per_unit, skip))
    base = counter.total - sum(under(u.name) for u in units)
    return ElasticSpace(tuple(units), base, float(min_width))


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
        self._handles: list[Any] = []
        self.current: Optional[SubnetConfig] = space.full()  # the hard sub-network running (None = relaxed)
        for i, u in enumerate(space.units):
            m = model.get_submodule(u.name)
            target = m.conv2 if u.kind == RESNET else m.to_out[0]
            self._handles.append(target.register_forward_pre_hook(self._width_hook(i)))
            self._handles.append(m.register_forward_hook(self._depth_hook(i), with_kwargs=True))

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

    def set_relaxed(self, width_masks: Sequence[torch.Tensor], gates: Sequence[torch.Tensor]) -> None:
        """Differentiable sub-network: ``width_masks[i]`` ``(G,)`` and ``gates[i]`` scalar tensors,
        typically straight-through (exact 0/1 forward, soft gradients)."""
        n = len(self.space.units)
        if len(width_masks) != n or len(gates) != n:
            raise ValueError(f"need {n} width masks and gates, got {len(width_masks)}, {len(gates)}")
        self._width = list(width_masks)
        self._gate = list(gates)
        self.current = None

    @contextmanager
    def full_network(self) -> Iterator[None]:
        """Run the full network inside the ``with`` block, then whatever was set before (hard or relaxed)."""
        saved = self._width, self._gate, self.current
        self.reset()
        try:
            yield
        finally:
            self._width, self._gate, self.current = saved

    def reset(self) -> None:
        """Run the full network (every hook a no-op)."""
        self.current = self.space.full()
        self._width = [None] * len(self.space.units)
        self._gate = [None] * len(self.space.units)

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

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> Optional[torch.Tensor]:
            g = self._gate[i]
            if g is None:
                return None
            if not g.requires_grad and float(g) != 0.0:
                return None
            x = _hidden(args, kwargs)
            skip = resnet_skip(mod, x) if is_resnet else x
            if not g.requires_grad:  # hard gate 0: exactly what the block computes without its branch
                return skip
            g = g.to(device=out.device, dtype=out.dtype)
            return g * out + (1 - g) * skip

        return hook


# ----------------------------------------------------------------------------- sampling

def sample_subnet(space: ElasticSpace, gen: torch.Generator, drop_prob: float) -> SubnetConfig:
    """A random sub-network: width uniform in ``[min_keep, G]``, each droppable unit dropped with
    probability ``drop_prob``. Draws a fixed amount of randomness from ``gen`` only."""
    width, depth = [], []
    for i, u in enumerate(space.units):
        lo = space.min_keep(i)
        r = torch.rand((2,), generator=gen)
        width.append(lo + min(int(r[0] * (u.units - lo + 1)), u.units - lo))
        depth.append(not (u.droppable and float(r[1]) < drop_prob))
    return SubnetConfig(tuple(width), tuple(depth))


def elastic_hook(controller: ElasticController, drop_prob: float) -> Callable[[int, torch.Generator], None]:
    """A ``train_denoiser`` ``before_step`` that runs a fresh random sub-network every step."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"depth_drop_prob = {drop_prob!r}: must be in [0, 1)")

    def before_step(step: int, gen: torch.Generator) -> None:
        controller.set(sample_subnet(controller.space, gen, drop_prob))

    return before_step
