"""DiP-GO over a mixture of timestep experts: one block graph whose calls go to the serving expert.

A mixture (:class:`~diffprune.pruning.experts.prune.ExpertMixtureModel` or
:class:`~diffprune.models.routed.TimestepRouted`: ``.experts`` and ascending ``.boundaries``) runs
each sampling step on one expert. :class:`RoutedGraph` gives the SuperNet that view: the blocks
are the experts' blocks (the experts share one architecture, so they share block names, consumers
and, when pruned alike, per-block costs), and each call runs the block graph of the expert its
timestep picks, with the runner's backups and gates.

A backup is one expert's block output. At the first step an expert serves, the previous step's
backups are another expert's (its channels mean other things when the experts were pruned by
their own intervals), so those steps compute every block: :func:`switch_steps` names them and the
pruner and the post-processing keep them whole, as they keep step 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .graph import BlockGraph, BlockOutputs, RunBlock, block_graph


def _index(boundaries: Sequence[int], t: int) -> int:
    return sum(int(t) >= b for b in boundaries)


class RoutedGraph(BlockGraph):
    """The block graph of a timestep mixture: block k of step i is block k of the expert serving step i."""

    def __init__(self, mixture: nn.Module) -> None:
        experts, boundaries = getattr(mixture, "experts", None), getattr(mixture, "boundaries", None)
        if experts is None or boundaries is None:
            raise TypeError(f"RoutedGraph: {type(mixture).__name__} has no .experts / .boundaries")
        self.model = mixture
        self.boundaries = [int(b) for b in boundaries]
        self.graphs = [block_graph(e) for e in experts]
        first = self.graphs[0]
        for k, g in enumerate(self.graphs[1:], 1):
            if g.block_names != first.block_names or g.consumers != first.consumers:
                raise ValueError(f"expert {k}'s blocks {g.block_names} differ from expert 0's {first.block_names}: "
                                 "a skip schedule needs one block structure")

    def expert_index(self, t: int) -> int:
        return _index(self.boundaries, t)

    @property
    def block_names(self) -> list[str]:
        return self.graphs[0].block_names

    @property
    def block_modules(self) -> list[nn.Module]:
        return self.graphs[0].block_modules

    @property
    def consumers(self) -> list[list[int | str]]:
        return self.graphs[0].consumers

    def pack_outputs(self, k: int, native) -> BlockOutputs:
        return self.graphs[0].pack_outputs(k, native)

    def native_outputs(self, k: int, outputs: Optional[BlockOutputs]):
        return self.graphs[0].native_outputs(k, outputs)

    def _graph(self, t: torch.Tensor) -> BlockGraph:
        return self.graphs[self.expert_index(int(t.flatten()[0]))]  # one timestep per call

    def call_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._graph(t).call_model(x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, run_block: RunBlock) -> torch.Tensor:
        """The serving expert's forward, its block calls routed through ``run_block``."""
        return self._graph(t).forward(x, t, run_block)


def switch_steps(boundaries: Sequence[int], timesteps: Sequence[int]) -> list[int]:
    """The sampling steps (indices into ``timesteps``, the sampler's order) at which the serving
    expert differs from the previous step's: they must compute every block. Step 0 is not listed
    (it always computes everything)."""
    experts = [_index(boundaries, int(t)) for t in timesteps]
    return [i for i in range(1, len(experts)) if experts[i] != experts[i - 1]]
