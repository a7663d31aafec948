"""The residual stream of a diffusers UNet as elastic width, and the exact MACs of any sub-network.

The *stream* is every tensor the UNet passes between its sub-blocks: the outputs of ``conv_in``,
of every ``ResnetBlock2D`` and ``Attention``, of every resampler conv, and their concatenations
with the skips in the up blocks. A *segment* is a maximal set of those tensors that must share one
channel set: a resnet without shortcut conv and an attention (residual) keep their input segment;
``conv_in``, a resnet with a shortcut conv and a resampler conv start a new one. Diff-Pruning prunes
each such coupled group; here each segment is a :class:`StreamUnit`.

Width follows the GroupNorm-aware grouping of Diff-Pruning (:mod:`diffprune.pruning.groupnorm`):
the ``C`` channels of a segment form ``B`` blocks of ``n = C / B`` (``B`` = the least common
multiple of the ``num_groups`` of every GroupNorm that reads the segment), and a sub-network keeps
the same number ``k`` of channels, the first ones, in every block. Every GroupNorm keeps its
``num_groups`` (a concatenation keeps a multiple of it), so the pruned net is a plain diffusers UNet.
:func:`masked_group_norm` is what such a pruned GroupNorm computes, run on the full-width tensor.

:class:`CostTerm` s give the MACs of every counted module as ``coef * C_in * C_out`` with its input
and output widths written in the elastic variables, so the MACs of any config (and their
straight-through relaxation) follow exactly without running the network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_UP = ("UpBlock2D", "AttnUpBlock2D")
Piece = tuple[str, int]  # ("s", segment) | ("u", elastic unit) | ("f", fixed channels)


@dataclass(frozen=True)
class StreamUnit:
    """One segment of the residual stream and every layer that reads or writes its channels.

    Attributes:
        name: the module whose output starts the segment.
        channels: ``C``.
        blocks: ``B``; a sub-network keeps ``k`` of the ``n = C / B`` channels of every block.
        outputs: modules whose output lies on the segment (masked by the controller).
        producers: ``Conv2d`` / ``Linear`` whose output channels are the segment.
        consumers: ``(Conv2d / Linear, input offset)`` reading the segment.
        norms: ``(GroupNorm, channel offset)`` reading the segment.
    """

    name: str
    channels: int
    blocks: int
    outputs: tuple[str, ...]
    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    norms: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        """``n``: channels per block, the most a sub-network keeps per block."""
        return self.channels // self.blocks

    def kept(self, k: int) -> list[int]:
        """Channel indices kept at width ``k``: the first ``k`` of every block, ascending."""
        n = self.size
        return [b * n + j for b in range(self.blocks) for j in range(k)]

    def channel_mask(self, k: int) -> Optional[torch.Tensor]:
        """``(C,)`` 0/1 mask of :meth:`kept`, None at full width."""
        return None if k >= self.size else (torch.arange(self.size) < k).float().repeat(self.blocks)

    @classmethod
    def from_json(cls, d: dict) -> "StreamUnit":
        return cls(d["name"], int(d["channels"]), int(d["blocks"]), tuple(d["outputs"]), tuple(d["producers"]),
                   tuple((n, int(o)) for n, o in d["consumers"]), tuple((n, int(o)) for n, o in d["norms"]))


@dataclass(frozen=True)
class CostTerm:
    """MACs of one module: ``coef * sum(ins) * sum(outs)``, times the depth gate of unit ``gate``
    (-1 = always runs). A piece is ``("s", i)`` kept channels of stream ``i``, ``("u", i)`` kept
    width channels of unit ``i``, ``("f", c)`` a fixed count ``c``."""

    coef: int
    ins: tuple[Piece, ...]
    outs: tuple[Piece, ...]
    gate: int = -1

    def to_json(self) -> list:
        return [self.coef, [list(p) for p in self.ins], [list(p) for p in self.outs], self.gate]

    @classmethod
    def from_json(cls, d: list) -> "CostTerm":
        return cls(int(d[0]), tuple((k, int(v)) for k, v in d[1]), tuple((k, int(v)) for k, v in d[2]), int(d[3]))


def evaluate(terms: Sequence[CostTerm], stream_ch: Sequence[Any], unit_ch: Sequence[Any], gates: Sequence[Any]) -> Any:
    """Total MACs of ``terms`` (ints give an exact int; float64 tensors a differentiable total)."""
    def ch(p: Piece) -> Any:
        return stream_ch[p[1]] if p[0] == "s" else unit_ch[p[1]] if p[0] == "u" else p[1]

    total: Any = 0
    for t in terms:
        v = t.coef * sum(ch(p) for p in t.ins) * sum(ch(p) for p in t.outs)
        total = total + (v if t.gate < 0 else gates[t.gate] * v)
    return total


def streams_to_json(streams: Sequence[StreamUnit], terms: Sequence[CostTerm]) -> dict:
    return {"streams": [asdict(s) for s in streams], "terms": [t.to_json() for t in terms]} if streams else {}


# ----------------------------------------------------------------------------- the segments

class _Walk:
    """Follows ``UNet2DModel.forward`` block by block, recording every segment's readers and writers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.segs: list[dict] = []

    def name(self, m: nn.Module) -> str:
        return self.names[id(m)]

    def new(self, name: str, channels: int) -> int:
        self.segs.append({"name": name, "channels": channels, "outputs": [], "producers": [], "consumers": [],
                          "norms": []})
        return len(self.segs) - 1

    def read(self, pieces: Sequence[int], convs: Sequence[Optional[nn.Module]], norm: Optional[nn.Module]) -> None:
        """Segments ``pieces`` concatenated into ``convs`` (and the GroupNorm ``norm``)."""
        if norm is not None and not isinstance(norm, nn.GroupNorm):
            raise NotImplementedError(f"{type(norm).__name__} on the stream (only GroupNorm is supported)")
        off = 0
        for s in pieces:
            for c in convs:
                if c is not None:
                    self.segs[s]["consumers"].append((self.name(c), off))
            if norm is not None:
                self.segs[s]["norms"].append((self.name(norm), off))
            off += self.segs[s]["channels"]

    def resnet(self, m: ResnetBlock2D, pieces: Sequence[int]) -> int:
        if m.up or m.down or not isinstance(m.conv_shortcut, (nn.Conv2d, type(None))):
            raise NotImplementedError(f"{self.name(m)}: resampling resnets are not supported")
        self.read(pieces, (m.conv1, m.conv_shortcut), m.norm1)
        if m.conv_shortcut is None:
            if len(pieces) != 1:
                raise NotImplementedError(f"{self.name(m)}: concatenated input without a shortcut conv")
            out = pieces[0]
        else:
            out = self.new(self.name(m), m.conv2.out_channels)
            self.segs[out]["producers"].append(self.name(m.conv_shortcut))
        self.segs[out]["producers"].append(self.name(m.conv2))
        self.segs[out]["outputs"].append(self.name(m))
        return out

    def attention(self, m: Optional[Attention], s: int) -> int:
        if m is None:
            return s
        if not m.residual_connection or getattr(m, "spatial_norm", None) is not None or m.norm_cross:
            raise NotImplementedError(f"{self.name(m)}: only residual self-attention is supported")
        self.read([s], (m.to_q, m.to_k, m.to_v), m.group_norm)
        self.segs[s]["producers"].append(self.name(m.to_out[0]))
        self.segs[s]["outputs"].append(self.name(m))
        return s

    def resample(self, m: nn.Module, s: int) -> int:
        if not isinstance(m, (Downsample2D, Upsample2D)) or getattr(m, "norm", None) is not None \
                or getattr(m, "use_conv_transpose", False):
            raise NotImplementedError(f"{self.name(m)}: only plain Downsample2D / Upsample2D are supported")
        conv = getattr(m, "conv", None)
        if isinstance(conv, nn.Conv2d):
            self.read([s], (conv,), None)
            s = self.new(self.name(m), conv.out_channels)
            self.segs[s]["producers"].append(self.name(conv))
        self.segs[s]["outputs"].append(self.name(m))
        return s


def _walk_unet(model: nn.Module) -> _Walk:
    w = _Walk(model)
    s = w.new("conv_in", model.conv_in.out_channels)
    w.segs[s]["producers"].append("conv_in")
    w.segs[s]["outputs"].append("conv_in")
    skips = [s]
    for blk in model.down_blocks:
        if type(blk).__name__ not in _DOWN:
            raise NotImplementedError(f"{type(blk).__name__} is not supported")
        attns = getattr(blk, "attentions", None)
        for j, r in enumerate(blk.resnets):
            s = w.resnet(r, [s])
            s = w.attention(attns[j], s) if attns is not None else s
            skips.append(s)
        for d in blk.downsamplers or []:
            s = w.resample(d, s)
            skips.append(s)
    mid = model.mid_block
    if mid is not None:
        if type(mid).__name__ != "UNetMidBlock2D":
            raise NotImplementedError(f"{type(mid).__name__} is not supported")
        s = w.resnet(mid.resnets[0], [s])
        for a, r in zip(mid.attentions, mid.resnets[1:]):
            s = w.resnet(r, [w.attention(a, s)])
    for blk in model.up_blocks:
        if type(blk).__name__ not in _UP:
            raise NotImplementedError(f"{type(blk).__name__} is not supported")
        attns = getattr(blk, "attentions", None)
        for j, r in enumerate(blk.resnets):
            s = w.resnet(r, [s, skips.pop()])
            s = w.attention(attns[j], s) if attns is not None else s
        for u in blk.upsamplers or []:
            s = w.resample(u, s)
    w.read([s], (model.conv_out,), model.conv_norm_out)
    return w


def stream_units(model: nn.Module) -> tuple[StreamUnit, ...]:
    """The segments of a diffusers ``UNet2DModel``'s residual stream (NotImplementedError if unsupported).

    A segment whose channels no block count divides is kept whole (``blocks = C``: one width only).
    """
    if not all(hasattr(model, a) for a in ("conv_in", "down_blocks", "up_blocks", "conv_out")) \
            or getattr(model.config, "center_input_sample", False) or getattr(model, "class_embedding", None):
        raise NotImplementedError(f"{type(model).__name__}: not a supported UNet2DModel")
    w = _walk_unet(model)
    out = []
    for seg in w.segs:
        groups = [model.get_submodule(n).num_groups for n, _ in seg["norms"]]
        b = math.lcm(*groups) if groups else 1
        c = seg["channels"]
        out.append(StreamUnit(seg["name"], c, b if c % b == 0 else c, tuple(seg["outputs"]),
                              tuple(seg["producers"]), tuple(seg["consumers"]), tuple(seg["norms"])))
    return tuple(out)


# ----------------------------------------------------------------------------- the MACs

def cost_terms(model: nn.Module, per: dict[str, int], units: Sequence[Any],
               streams: Sequence[StreamUnit]) -> tuple[CostTerm, ...]:
    """A :class:`CostTerm` for every module with MACs in ``per`` (one image, full model)."""
    ins: dict[str, list[Piece]] = {}
    outs: dict[str, list[Piece]] = {}
    for i, s in enumerate(streams):
        for p in s.producers:
            outs.setdefault(p, []).append(("s", i))
        for c, _ in s.consumers:
            ins.setdefault(c, []).append(("s", i))
    gate: dict[str, int] = {}
    for i, u in enumerate(units):
        m = model.get_submodule(u.name)
        if u.kind == "resnet":
            for c in ("conv1", "time_emb_proj"):
                outs[f"{u.name}.{c}"] = [("u", i)]
            ins[f"{u.name}.conv2"] = [("u", i)]
        else:
            for c in ("to_q", "to_k", "to_v"):
                outs[f"{u.name}.{c}"] = [("u", i)]
            ins[f"{u.name}.to_out.0"] = [("u", i)]
            ins[u.name], outs[u.name] = [("u", i)], [("f", 1)]  # the two attention products
        for n, _ in m.named_modules(prefix=u.name):
            if n != f"{u.name}.conv_shortcut":
                gate[n] = i
    terms = []
    for name, macs in per.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            full_in, full_out = m.in_channels, m.out_channels
        elif isinstance(m, nn.Linear):
            full_in, full_out = m.in_features, m.out_features
        elif isinstance(m, Attention):
            full_in, full_out = m.to_q.out_features, 1
        else:
            terms.append(CostTerm(macs, (("f", 1),), (("f", 1),), gate.get(name, -1)))
            continue
        t_in, t_out = _complete(ins.get(name, []), full_in, streams, units), _complete(outs.get(name, []), full_out,
                                                                                     streams, units)
        if macs % (full_in * full_out):
            raise RuntimeError(f"{name}: {macs} MACs are not a multiple of {full_in} x {full_out} channels")
        terms.append(CostTerm(macs // (full_in * full_out), t_in, t_out, gate.get(name, -1)))
    return tuple(terms)


def _complete(pieces: list[Piece], full: int, streams: Sequence[StreamUnit], units: Sequence[Any]) -> tuple[Piece, ...]:
    """``pieces`` and, for channels they do not cover, one fixed piece."""
    covered = sum(streams[v].channels if k == "s" else units[v].units * units[v].unit_size if k == "u" else v
                  for k, v in pieces)
    if covered > full:
        raise RuntimeError(f"elastic pieces {pieces} cover {covered} > {full} channels")
    return tuple(pieces) + ((("f", full - covered),) if covered < full else ())


# ----------------------------------------------------------------------------- masked and pruned

def masked_group_norm(gn: nn.GroupNorm, x: torch.Tensor,
                      pieces: Sequence[tuple[int, Optional[torch.Tensor], int]]) -> torch.Tensor:
    """What ``gn`` pruned to the kept channels computes, on the full-width ``x`` (zeros elsewhere).

    Args:
        pieces: ``(offset, channel mask or None = all kept, channels)`` of every segment in ``x``.
    """
    idx = []
    for off, mask, c in sorted(pieces, key=lambda p: p[0]):  # channel order, as the pruned layer keeps them
        keep = torch.arange(c, device=x.device) if mask is None else torch.nonzero(mask > 0.5).flatten().to(x.device)
        idx.append(keep + off)
    idx_t = torch.cat(idx)
    w = gn.weight[idx_t] if gn.affine else None
    b = gn.bias[idx_t] if gn.affine else None
    out = torch.zeros(x.shape[0], gn.num_channels, *x.shape[2:], dtype=x.dtype, device=x.device)
    out[:, idx_t] = F.group_norm(x[:, idx_t], gn.num_groups, w, b, gn.eps)
    return out


def prune_streams(net: nn.Module, streams: Sequence[StreamUnit], widths: Sequence[int]) -> None:
    """Remove the channels of every segment that width ``widths[i]`` does not keep (in place)."""
    plan: dict[tuple[str, str], list[int]] = {}
    for s, k in zip(streams, widths):
        if k >= s.size:
            continue
        kept = set(s.kept(k))
        gone = [c for c in range(s.channels) if c not in kept]
        for p in s.producers:
            plan.setdefault((p, "out"), []).extend(gone)
        for n, off in s.consumers:
            plan.setdefault((n, "in"), []).extend(off + c for c in gone)
        for n, off in s.norms:
            plan.setdefault((n, "out"), []).extend(off + c for c in gone)
    for (name, side), idxs in plan.items():
        m = net.get_submodule(name)
        idxs = sorted(idxs)
        if isinstance(m, nn.GroupNorm):
            tp.prune_groupnorm_out_channels(m, idxs)
        elif isinstance(m, nn.Conv2d):
            (tp.prune_conv_out_channels if side == "out" else tp.prune_conv_in_channels)(m, idxs)
        else:
            (tp.prune_linear_out_channels if side == "out" else tp.prune_linear_in_channels)(m, idxs)
