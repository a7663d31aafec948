"""Physical pruning of an expert to its selected sub-network, and the mixture as one checkpoint.

:func:`prune_to_config` removes what the masks only hid: the channels of the residual stream a
segment does not keep (:func:`.elastic_stream.prune_streams`), the trailing (least important) groups of
each resnet's hidden width and the trailing heads of each attention become smaller real layers
(Torch-Pruning's layer pruning functions, then the attribute repair and consistency check of
:mod:`diffprune.pruning.taylor`), and dropped sub-blocks are replaced by :class:`SkippedBlock`
(the identity) or, for a resnet with a shortcut conv, by :class:`ShortcutBlock`.
The result computes what the masked expert computed, with exactly
:meth:`~diffprune.pruning.experts.elastic.ElasticSpace.macs` MACs.

:class:`ExpertMixtureModel` holds the ``K`` (pruned) experts and their interval boundaries in one
module, so :func:`~diffprune.models.checkpoint.save_model` / ``load_model`` round-trip the whole
mixture (shapes, dropped blocks and heads included) as one pickle-free checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch_pruning as tp
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from ...io import ArtifactError
from ...models.blocks import ShortcutBlock, SkippedBlock, ZeroBranch
from ...models.checkpoint import load_model, save_model, set_module
from ...sampling import ExpertMixture
from ..surgery import check_pruned, repair_attributes
from .elastic import MLP, RESNET, ElasticSpace, SubnetConfig
from .elastic_stream import prune_streams


def _trailing(unit_size: int, keep: int, units: int) -> list[int]:
    """Channel indices of units ``keep .. units-1`` (the least important ones)."""
    return list(range(keep * unit_size, units * unit_size))


@torch.no_grad()
def prune_to_config(model: nn.Module, space: ElasticSpace, cfg: SubnetConfig,
                    sample_shape: Sequence[int] | None = None) -> nn.Module:
    """A physically pruned copy of an (importance-ordered) expert; ``model`` is left untouched.

    Args:
        model: the elastic expert, the full architecture of ``space``.
        cfg: the sub-network to keep.
        sample_shape: ``(C, H, W)``; when given, the pruned net is checked on a dummy input.

    Raises:
        ValueError: ``cfg`` lies outside ``space``.
        diffprune.pruning.taylor.PruningError: the pruned network is inconsistent.
    """
    space.check(cfg)
    net = copy.deepcopy(model)
    prune_streams(net, space.streams, space.stream_of(cfg))  # stream first: the blocks below then carry it
    for u, keep, on in zip(space.units, cfg.width, cfg.depth):
        m = net.get_submodule(u.name)
        if not on:  # depth: the residual branch goes
            if u.drop_to == "zero":  # a transformer block's branch: the block adds nothing
                set_module(net, u.name, ZeroBranch(u.kind))
            elif u.kind == RESNET and getattr(m, "conv_shortcut", None) is not None:
                set_module(net, u.name, ShortcutBlock.of(m))
            else:
                channels = m.conv1.in_channels if u.kind == RESNET else m.to_q.in_features
                set_module(net, u.name, SkippedBlock(channels, u.kind))
            continue
        if keep == u.units:
            continue
        idxs = _trailing(u.unit_size, keep, u.units)
        if u.kind == RESNET:  # width: conv1 outputs = time_emb_proj outputs = norm2 groups = conv2 inputs
            tp.prune_conv_out_channels(m.conv1, idxs)
            tp.prune_linear_out_channels(m.time_emb_proj, idxs)
            tp.prune_groupnorm_out_channels(m.norm2, idxs)
            m.norm2.num_groups = keep  # whole groups removed: the group size is unchanged
            tp.prune_conv_in_channels(m.conv2, idxs)
        elif u.kind == MLP:  # hidden channels: the first linear's outputs, the second's inputs
            tp.prune_linear_out_channels(m.net[0].proj, idxs)
            tp.prune_linear_in_channels(m.net[2], idxs)
        else:  # heads: q/k/v outputs and to_out inputs, whole heads
            for lin in (m.to_q, m.to_k, m.to_v):
                tp.prune_linear_out_channels(lin, idxs)
            tp.prune_linear_in_channels(m.to_out[0], idxs)
    repair_attributes(net)
    if sample_shape is not None:
        check_pruned(net, tuple(sample_shape), what="pruned expert")
    return net


# ----------------------------------------------------------------------------- the mixture

# the networks a mixture's experts may be (a pixel or latent UNet, a text-to-image UNet, a DiT)
EXPERT_CLASSES: dict[str, type[nn.Module]] = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel,
                                              "DiTTransformer2DModel": DiTTransformer2DModel}


class ExpertMixtureModel(nn.Module):
    """``K`` timestep experts and the ``K - 1`` ascending boundaries of their intervals.

    Expert ``k`` serves ``boundaries[k-1] <= t < boundaries[k]`` (expert 0 the least noisy steps).
    :meth:`denoiser` gives the :class:`~diffprune.sampling.ExpertMixture` the sampler runs.

    Args:
        experts: diffusers ``UNet2DModel`` s built from one config (they may be pruned differently).
        boundaries: ``K - 1`` ascending timesteps.
    """

    def __init__(self, experts: Sequence[nn.Module], boundaries: Sequence[int]) -> None:
        super().__init__()
        if len(boundaries) != len(experts) - 1 or list(boundaries) != sorted(boundaries):
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} ascending boundaries, "
                             f"got {list(boundaries)}")
        self.experts = nn.ModuleList(experts)
        self.boundaries = [int(b) for b in boundaries]
        base = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(experts[0].config).items()}
        self.config = {
            "num_experts": len(experts),
            "boundaries": self.boundaries,
            "unet_class": type(experts[0]).__name__,
            "unet": base,
            "sample_size": base["sample_size"],
            "in_channels": base["in_channels"],
            "out_channels": base["out_channels"],
        }

    @classmethod
    def from_config(cls, config: dict) -> "ExpertMixtureModel":
        """The unpruned skeleton of a saved mixture (checkpoint loading then reshapes it); its experts'
        class is one of :data:`EXPERT_CLASSES` (a mixture saved before it was recorded: ``UNet2DModel``)."""
        unet = dict(config["unet"])
        name = config.get("unet_class", "UNet2DModel")
        if name not in EXPERT_CLASSES:
            raise ArtifactError(f"unet_class = {name!r}: a mixture's experts are one of {sorted(EXPERT_CLASSES)}")
        return cls([EXPERT_CLASSES[name].from_config(unet) for _ in range(int(config["num_experts"]))],
                   config["boundaries"])

    def denoiser(self) -> ExpertMixture:
        return ExpertMixture(list(self.experts), self.boundaries)

    def expert_for(self, t: torch.Tensor) -> nn.Module:
        """The expert serving timestep ``t`` (a batch shares one: its first)."""
        return self.experts[sum(int(t.flatten()[0]) >= b for b in self.boundaries)]



def save_mixture(mixture: ExpertMixtureModel, path: str | Path, *, scheduler_config: dict | None = None,
                 meta: dict | None = None) -> Path:
    """:func:`~diffprune.models.checkpoint.save_model` for a mixture (atomic, pickle-free)."""
    return save_model(mixture, path, scheduler_config=scheduler_config, meta=meta)


def load_mixture(path: str | Path, device: str | torch.device = "cpu") -> ExpertMixtureModel:
    """Load a mixture saved by :func:`save_mixture`; refuses any other checkpoint."""
    model = load_model(path, device)
    if not isinstance(model, ExpertMixtureModel):
        raise ArtifactError(f"{path}: holds a {type(model).__name__}, not an ExpertMixtureModel")
    return model
