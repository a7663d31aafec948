"""A mixture of timestep experts as ONE denoiser module that diffusers' pipelines accept.

``TimestepRouted(experts, boundaries)`` stands where a pipeline expects its network
(``DiTPipeline(transformer=...)``, ``StableDiffusionPipeline(unet=...)``): each call goes, with all
its arguments, to the expert whose interval holds the call's timestep (expert k serves
``boundaries[k-1] <= t < boundaries[k]``, as :class:`~diffprune.sampling.ExpertMixture` routes).
The pipeline reads the first expert's ``config`` (sizes, channels), so the experts share those;
their inner widths may differ (pruned experts).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class TimestepRouted(nn.Module):
    """``K`` experts of one family and their ``K - 1`` ascending boundaries, called as one network."""

    def __init__(self, experts: Sequence[nn.Module], boundaries: Sequence[int]) -> None:
        super().__init__()
        if not experts or len(boundaries) != len(experts) - 1 or list(boundaries) != sorted(boundaries):
            raise ValueError(f"{len(experts)} experts need {max(len(experts) - 1, 0)} ascending boundaries, "
                             f"got {list(boundaries)}")
        shared = ("in_channels", "sample_size")
        for k, e in enumerate(experts[1:], 1):
            bad = [a for a in shared if getattr(e.config, a, None) != getattr(experts[0].config, a, None)]
            if bad or type(e) is not type(experts[0]):
                raise ValueError(f"expert {k} differs from expert 0 in {bad or ['class']}: a pipeline runs them alike")
        self.experts = nn.ModuleList(experts)
        self.boundaries = [int(b) for b in boundaries]
        self.config = experts[0].config  # what pipelines read: sizes, channels, class count
        self.train(any(e.training for e in experts))  # eval experts make an eval mixture

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def out_channels(self) -> int:
        return int(self.config.out_channels)

    def expert_index(self, t: int) -> int:
        return sum(int(t) >= b for b in self.boundaries)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The expert of the call's timestep (``timestep=`` or the second positional argument) runs it."""
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = int(torch.as_tensor(t).flatten()[0])  # one timestep per call: every row of a trajectory step shares it
        return self.experts[self.expert_index(t)](*args, **kwargs)
