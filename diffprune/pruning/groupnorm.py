"""GroupNorm-aware channel selection and the reference Taylor score, on torch-pruning's extension points.

Diff-Pruning's reference implementation (github.com/VainF/Diff-Pruning, with its bundled torch-pruning)
treats a coupled channel group whose layers feed a ``GroupNorm`` of ``G`` groups as ``G`` contiguous
blocks of ``g = C / G`` channels, and removes the same number from every block, each block's channels
ranked by importance *within* the block. Upstream torch-pruning 1.6 instead averages the importance of
position ``i`` over all blocks, removes the same positions from every block, and keeps
``int((1 - r) * g)`` channels per block: with ``g`` = 4 .. 8, a ratio of 0.3 removes 37-50 % of a layer.

:class:`GroupwisePruner` subclasses ``torch_pruning.pruner.BasePruner`` and overrides only its hooks:

* ``_get_channel_groups`` reports a flat layer (1) for every non-attention group, so the base class
  ranks all ``C`` channels of the group at once instead of averaging the blocks;
* ``estimate_importance`` turns the raw per-channel score into the *rank within its block*
  (0 = least important), so the ``k * G`` lowest ranks are exactly the ``k`` weakest of every block;
* ``get_target_pruning_ratio`` gives each group the ratio whose count ``C - int(C * (1 - ratio))``
  is ``k * G`` with ``k = floor(r * g)``, capped at ``g - 1`` so a block never vanishes.

Attention groups (q/k/v heads) keep the base class's whole-head logic untouched.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch_pruning as tp
from torch import nn

from .surgery import PruningError, attention_layers

__all__ = ["ReferenceTaylorImportance", "GroupwisePruner", "per_block_removed", "rank_within_blocks", "heads_to_remove",
           "head_plan"]

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


class ReferenceTaylorImportance(tp.importance.Importance):
    """The reference's per-channel Taylor score: ``sum over coupled layers of (w * dw)^2``.

    Every weight the channel owns contributes: conv/linear rows (output) and columns (input), and the
    ``GroupNorm`` affine *weight* (upstream 1.6's ``GroupTaylorImportance`` skips GroupNorm and uses the
    mean of ``|w * dw|``). Biases are left out, as in the reference. No normalisation: the selection
    only compares channels of one group. Needs ``.grad`` on every scored weight.
    """

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        """``group -> (C,)`` score per root channel, or ``None`` if no scored layer is in it."""
        parts: list[tuple[torch.Tensor, list[int]]] = []
        for item in group:
            dep, idxs, root_idxs = item.dep, list(item.idxs), item.root_idxs
            layer, fn = dep.target.module, dep.handler
            if isinstance(layer, nn.GroupNorm):
                if layer.affine:
                    parts.append((_sq_taylor(layer.weight)[idxs], root_idxs))
            elif isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and (fn in _OUT_FNS or fn in _IN_FNS):
                parts.append((_conv_linear_score(layer, fn in _OUT_FNS)[idxs], root_idxs))
        if not parts:
            return None
        score = torch.zeros(len(group[0].idxs), dtype=torch.float32, device=parts[0][0].device)  # (C,)
        for local, root in parts:
            if any(r is None for r in root):
                continue
            score.scatter_add_(0, torch.as_tensor(root, device=score.device), local.float())
        return score


def _sq_taylor(p: nn.Parameter) -> torch.Tensor:
    """``(w * dw)^2`` element-wise, same shape as ``p``."""
    if p.grad is None:
        raise PruningError(f"parameter of shape {tuple(p.shape)} has no gradient to score")
    return (p.detach() * p.grad.detach()).pow(2)


def _conv_linear_score(layer: nn.Module, out: bool) -> torch.Tensor:
    """``(channels,)``: ``(w * dw)^2`` summed over everything but the output (or input) channel axis."""
    sq = _sq_taylor(layer.weight)  # (O, I/groups, *k) or for transposed convs (I, O/groups, *k)
    transposed = getattr(layer, "transposed", False)
    if out != transposed:
        return sq.flatten(1).sum(1)
    per_in = sq.transpose(0, 1).flatten(1).sum(1)
    groups = getattr(layer, "groups", 1)
    return per_in.repeat(groups) if groups > 1 else per_in


def rank_within_blocks(score: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(C,) -> (C,)``: each channel's rank (0 = lowest score) inside its block of ``C / blocks``.

    Ties keep the lower index first (a stable sort), so a selection is deterministic.
    """
    if score.ndim != 1 or blocks < 1 or score.numel() % blocks:
        raise PruningError(f"cannot split {tuple(score.shape)} scores into {blocks} equal blocks")
    per_block = score.detach().float().view(blocks, -1)  # (G, g)
    order = torch.argsort(per_block, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(per_block.shape[1], device=order.device).expand_as(order))
    return ranks.flatten().float()


def per_block_removed(ratio: float, block: int) -> int:
    """Channels removed from one block of ``block`` channels: ``floor(ratio * block)``, keeping one."""
    return max(0, min(block - 1, int(math.floor(ratio * block + 1e-9))))


class GroupwisePruner(tp.pruner.BasePruner):
    """``BasePruner`` (local pruning) removing ``floor(r * g)`` channels from every GroupNorm block.

    Same arguments as ``BasePruner``; ``pruning_ratio`` is the nominal ``r``. Each prunable layer gets
    its own ranking scope (a ``pruning_ratio_dict`` over the whole model) so that the per-group count
    can be set through ``get_target_pruning_ratio``. ``plan`` maps every root layer pruned so far to
    ``(C, G, k)``: channels, blocks, channels removed per block.
    """

    def __init__(self, model: nn.Module, *args, pruning_ratio: float = 0.5, **kwargs) -> None:
        if kwargs.get("global_pruning") or kwargs.get("pruning_ratio_dict") or kwargs.get("iterative_steps", 1) != 1:
            raise PruningError("GroupwisePruner supports one local step with a single pruning_ratio only")
        self.plan: dict[nn.Module, tuple[int, int, int]] = {}
        super().__init__(model, *args, pruning_ratio=pruning_ratio, pruning_ratio_dict={model: pruning_ratio},
                         **kwargs)

    def _get_channel_groups(self, group) -> int:
        if self._is_atten_group(group)[0]:
            return super()._get_channel_groups(group)
        return 1  # flat: the blocks are handled by the rank importance below

    @staticmethod
    def _blocks(group, channels: int) -> int:
        """``G``: the most GroupNorm groups of a coupled layer that split ``channels`` evenly, else 1.

        A GroupNorm over a concatenation (a UNet skip) splits its own, wider input; the blocks follow
        the group's own width, as in the reference. Where no GroupNorm divides it (no diffusers UNet2D
        block here), the layer is ranked as one block and :func:`.surgery.check_pruned` judges the result.
        """
        found = sorted({dep.target.module.num_groups for dep, _ in group
                        if isinstance(dep.target.module, nn.GroupNorm)}, reverse=True)
        return next((g for g in found if channels % g == 0), 1)

    def estimate_importance(self, group) -> Optional[torch.Tensor]:
        """Raw score for attention groups; otherwise the rank of each channel within its GN block."""
        score = super().estimate_importance(group)
        if score is None or self._is_atten_group(group)[0]:
            return score
        channels = len(score)
        blocks = self._blocks(group, channels)
        removed = per_block_removed(self.pruning_ratio, channels // blocks)
        self.plan[group[0].dep.target.module] = (channels, blocks, removed)
        return rank_within_blocks(score, blocks)

    def get_target_pruning_ratio(self, module, step: int = -1) -> float:
        """The ratio that makes the base class remove exactly ``k * G`` of the ``C`` channels."""
        if module not in self.plan:
            return super().get_target_pruning_ratio(module, step)
        channels, blocks, removed = self.plan[module]
        # C - int(C * (1 - ratio)) == k * G exactly, with half a channel of slack against rounding
        return (removed * blocks - 0.5) / channels if removed > 0 else 0.0


def heads_to_remove(heads: int, ratio: float) -> int:
    """Whole heads to drop: ``floor(ratio * heads)``, always keeping at least one."""
    return max(0, min(heads - 1, int(math.floor(ratio * heads + 1e-9))))


def head_plan(model: nn.Module, ratio: float) -> tuple[dict[nn.Module, int], dict[nn.Module, float]]:
    """torch-pruning's ``num_heads`` (q/k/v -> heads) and per-attention head pruning ratios.

    A single-head attention is left out: its one head cannot go, so its inner width (q/k/v outputs,
    ``to_out`` inputs, one coupled group) is pruned like any layer, as in the reference; its softmax
    scale stays the teacher's. Keeping it whole instead leaves the CIFAR-10 DDPM at 3.63G MACs, not
    3.50G, after ratio 0.3 (paper: 3.4G).
    """
    num_heads: dict[nn.Module, int] = {}
    head_ratio: dict[nn.Module, float] = {}
    for name, attn in attention_layers(model).items():
        if any(getattr(attn, proj, None) is None for proj in ("to_q", "to_k", "to_v")):
            raise PruningError(f"{name}: attention without separate to_q/to_k/to_v projections is not supported")
        if attn.heads == 1:
            continue
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            num_heads[proj] = attn.heads
        k = heads_to_remove(attn.heads, ratio)
        # torch-pruning removes ceil(r * heads) heads per layer; (k - 0.5) / heads yields exactly k
        head_ratio[attn] = (k - 0.5) / attn.heads if k > 0 else 0.0
    return num_heads, head_ratio
