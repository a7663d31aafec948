"""The elastic space of a diffusers UNet: its units, stream segments, sub-network configs and exact MACs.

See :mod:`.elastic` for what the space means; :mod:`.elastic_stream` for the residual stream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ...metrics.cost import MacCounter
from ..surgery import head_dim
from .elastic_stream import CostTerm, StreamUnit, cost_terms, evaluate, stream_units, streams_to_json

RESNET, ATTENTION, MLP = "resnet", "attention", "mlp"
MLP_GROUPS = 16  # width units of a transformer block's feed-forward: its hidden channels in (at most) 16 groups
log = logging.getLogger(__name__)

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
        macs_fixed: MACs (one image) of the sub-block that do not depend on its width (these three
            at full stream width; with an elastic stream :attr:`ElasticSpace.terms` count exactly).
        macs_per_unit: MACs (one image) added by each kept group / head.
        macs_skip: MACs (one image) of the sub-block when dropped (its shortcut conv, if any).
        drop_to: what a dropped sub-block returns: ``"input"`` (a residual sub-block: its input, or
            its shortcut) or ``"zero"`` (a transformer block's attention or feed-forward branch, which
            the block adds to its stream itself).
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
    drop_to: str = "input"


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network: ``width[i]`` groups/heads kept in unit ``i``, ``depth[i]`` False = dropped,
    ``stream[s]`` channels kept per block of stream segment ``s`` (empty = every segment at full width)."""

    width: tuple[int, ...]
    depth: tuple[bool, ...]
    stream: tuple[int, ...] = ()

    def to_json(self) -> dict:
        d = {"width": list(self.width), "depth": list(self.depth)}
        return d | ({"stream": list(self.stream)} if self.stream else {})

    @classmethod
    def from_json(cls, d: dict) -> "SubnetConfig":
        return cls(tuple(int(w) for w in d["width"]), tuple(bool(x) for x in d["depth"]),
                   tuple(int(k) for k in d.get("stream", ())))


@dataclass(frozen=True)
class ElasticSpace:
    """The elastic units of a UNet, the MACs outside them, and the smallest width trained.

    Attributes:
        units: the sub-blocks in ``named_modules`` order.
        base_macs: MACs (one image) of everything outside the units (stem, head, resamplers, ...),
            at full stream width.
        min_width: smallest width keep-ratio a sub-network may use (of groups, heads and stream blocks).
        streams: the segments of the residual stream (:mod:`.elastic_stream`); empty = the stream
            is fixed (a space saved before streams were elastic).
        terms: the MACs of every module in the elastic variables; set whenever ``streams`` is.
    """

    units: tuple[ElasticUnit, ...]
    base_macs: int
    min_width: float
    streams: tuple[StreamUnit, ...] = ()
    terms: tuple[CostTerm, ...] = ()

    def _min(self, g: int) -> int:
        return max(1, min(g, math.ceil(round(self.min_width * g, 9))))

    def min_keep(self, i: int) -> int:
        """Fewest groups/heads unit ``i`` may keep: ``ceil(min_width * G)``, at least 1."""
        return self._min(self.units[i].units)

    def stream_min_keep(self, s: int) -> int:
        """Fewest channels per block stream segment ``s`` may keep: ``ceil(min_width * n)``, at least 1."""
        return self._min(self.streams[s].size)

    @property
    def num_logits(self) -> int:
        """Width logits a router gives per expert: one per unit, then one per stream segment."""
        return len(self.units) + len(self.streams)

    def stream_of(self, cfg: SubnetConfig) -> tuple[int, ...]:
        """``cfg``'s stream widths, explicit (an empty ``cfg.stream`` = every segment full)."""
        return cfg.stream or tuple(s.size for s in self.streams)

    def full(self) -> SubnetConfig:
        return SubnetConfig(tuple(u.units for u in self.units), tuple(True for _ in self.units),
                            tuple(s.size for s in self.streams))

    def smallest(self) -> SubnetConfig:
        return SubnetConfig(tuple(self.min_keep(i) for i in range(len(self.units))),
                            tuple(not u.droppable for u in self.units),
                            tuple(self.stream_min_keep(s) for s in range(len(self.streams))))

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
        if cfg.stream and len(cfg.stream) != len(self.streams):
            raise ValueError(f"config has {len(cfg.stream)} stream widths, the space has {len(self.streams)} segments")
        for i, k in enumerate(cfg.stream):
            if not self.stream_min_keep(i) <= k <= self.streams[i].size:
                raise ValueError(f"stream {self.streams[i].name}: width {k} outside "
                                 f"[{self.stream_min_keep(i)}, {self.streams[i].size}]")

    def macs(self, cfg: SubnetConfig) -> int:
        """MACs of one ``(1, C, H, W)`` call of the sub-network ``cfg`` (exact, integer)."""
        self.check(cfg)
        if self.terms:
            stream_ch = [s.blocks * k for s, k in zip(self.streams, self.stream_of(cfg))]
            unit_ch = [u.unit_size * w for u, w in zip(self.units, cfg.width)]
            return int(evaluate(self.terms, stream_ch, unit_ch, [int(d) for d in cfg.depth]))
        return self.base_macs + sum(u.macs_fixed + u.macs_per_unit * w if d else u.macs_skip
                                    for u, w, d in zip(self.units, cfg.width, cfg.depth))

    def full_macs(self) -> int:
        return self.macs(self.full())

    def to_json(self) -> dict:
        return ({"units": [asdict(u) for u in self.units], "base_macs": self.base_macs, "min_width": self.min_width}
                | streams_to_json(self.streams, self.terms))

    @classmethod
    def from_json(cls, d: dict) -> "ElasticSpace":
        return cls(tuple(ElasticUnit(**u) for u in d["units"]), int(d["base_macs"]), float(d["min_width"]),
                   tuple(StreamUnit.from_json(s) for s in d.get("streams", ())),
                   tuple(CostTerm.from_json(t) for t in d.get("terms", ())))


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
    # cross-attention (a text-to-image UNet's attn2) is elastic in its heads like self-attention: its
    # keys and values read the text, their in-features stay; whole heads go from q/k/v and to_out
    if getattr(m, "to_k", None) is None or getattr(m, "to_v", None) is None:
        raise NotImplementedError(f"{name}: only attention with to_q/to_k/to_v is supported")
    if getattr(m, "add_k_proj", None) is not None:
        raise NotImplementedError(f"{name}: attention with added key/value projections is not supported")


def _attention_droppable(m: Attention) -> bool:
    return bool(m.residual_connection) and m.rescale_output_factor == 1 and m.query_dim == m.out_dim


def _transformer_branch(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the attention or feed-forward of a transformer block (DiT's, SD's), whose
    output the block adds to its residual stream: the branch may go (its output: zero)."""
    parent, _, attr = name.rpartition(".")
    return attr in ("attn1", "attn2", "ff") and isinstance(model.get_submodule(parent), BasicTransformerBlock)


def _mlp_elastic(m: FeedForward) -> bool:
    """A plain two-layer feed-forward (``GELU`` then ``Linear``; a gated ``GEGLU`` is not elastic)."""
    return (len(m.net) >= 3 and isinstance(m.net[0], GELU) and isinstance(m.net[2], nn.Linear)
            and m.net[0].proj.out_features == m.net[2].in_features)


def _unit(model: nn.Module, name: str, m: nn.Module, per: dict[str, int]) -> Optional[ElasticUnit]:
    """The elastic unit of sub-block ``name`` (``None``: not one), its MACs read off ``per``."""
    def under(prefix: str) -> int:
        return sum(v for n, v in per.items() if n == prefix or n.startswith(prefix + "."))

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
        branch = _transformer_branch(model, name) and m.query_dim == m.out_dim
        kind, channels, droppable, skip = ATTENTION, m.query_dim, _attention_droppable(m) or branch, 0
    elif isinstance(m, FeedForward) and _mlp_elastic(m):
        hidden = m.net[2].in_features
        g = math.gcd(hidden, MLP_GROUPS)
        size, scaled = hidden // g, under(name)  # both linears scale with the hidden width
        branch = _transformer_branch(model, name) and m.net[0].proj.in_features == m.net[2].out_features
        kind, channels, droppable, skip = MLP, m.net[2].out_features, branch, 0
    else:
        return None
    total = under(name)
    if g > 1 and scaled % g:
        raise RuntimeError(f"{name}: {scaled} width-dependent MACs do not split over {g} units")
    per_unit = scaled // g if g > 1 else 0
    drop_to = "zero" if kind != RESNET and droppable and not getattr(m, "residual_connection", False) else "input"
    return ElasticUnit(name, kind, g, size, channels, droppable, total - per_unit * g, per_unit, skip, drop_to)


def elastic_space(model: nn.Module, sample_shape: Sequence[int], min_width: float,
                  stream: bool = True) -> ElasticSpace:
    """The elastic space of a diffusers UNet or DiT, with the MACs of every unit measured once.

    Args:
        model: the full (unpruned) network.
        sample_shape: ``(C, H, W)`` of one input image.
        min_width: smallest width keep-ratio, in ``(0, 1]``.
        stream: make the residual stream elastic too (where :func:`.elastic_stream.stream_units`
            supports the architecture; otherwise it stays fixed).
    """
    if not 0.0 < min_width <= 1.0:
        raise ValueError(f"min_width = {min_width!r}: must be in (0, 1]")
    p = next(model.parameters())
    x = torch.zeros((1, *sample_shape), dtype=p.dtype, device=p.device)
    t = torch.ones((1,), dtype=torch.long, device=p.device)
    with torch.no_grad(), MacCounter(model, per_module=True) as counter:
        model(x, t)
    per = counter.per_module or {}
    units = [u for name, m in model.named_modules() if (u := _unit(model, name, m, per)) is not None]
    base = counter.total - sum(v for n, v in per.items() if any(n == u.name or n.startswith(u.name + ".")
                                                                   for u in units))
    try:
        streams = stream_units(model) if stream else ()
    except NotImplementedError as e:  # an architecture the stream walk does not know: the stream stays fixed
        log.info("residual stream not elastic: %s", e)
        streams = ()
    terms = cost_terms(model, per, units, streams) if streams else ()
    space = ElasticSpace(tuple(units), base, float(min_width), streams, terms)
    if terms and space.full_macs() != counter.total:
        raise RuntimeError(f"MACs model gives {space.full_macs()}, the counter {counter.total}")
    return space


# ----------------------------------------------------------------------------- sampling

def sample_subnet(space: ElasticSpace, gen: torch.Generator, drop_prob: float) -> SubnetConfig:
    """A random sub-network: width uniform in ``[min_keep, G]`` (stream widths likewise), each
    droppable unit dropped with probability ``drop_prob``. Draws a fixed amount of randomness from ``gen`` only."""
    width, depth, stream = [], [], []
    for i, u in enumerate(space.units):
        lo = space.min_keep(i)
        r = torch.rand((2,), generator=gen)
        width.append(lo + min(int(r[0] * (u.units - lo + 1)), u.units - lo))
        depth.append(not (u.droppable and float(r[1]) < drop_prob))
    for s, seg in enumerate(space.streams):
        lo, r = space.stream_min_keep(s), float(torch.rand((1,), generator=gen))
        stream.append(lo + min(int(r * (seg.size - lo + 1)), seg.size - lo))
    return SubnetConfig(tuple(width), tuple(depth), tuple(stream))
