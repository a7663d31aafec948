"""A DiP-GO skip schedule inside diffusers' own pipelines.

``ScheduledNetwork(model, schedule, scheduler)`` stands where a pipeline expects its network
(``DiTPipeline(transformer=...)``, ``StableDiffusionPipeline(unet=...)``) and runs each call with
its step's gates: kept blocks compute (and become the backups), skipped ones hand on their backup
from the previous step, blocks no kept block reads do not run. The call's step is the position of
its timestep in ``scheduler.timesteps``, the pipeline's own scheduler, so a pipeline run with
another step count than the schedule's is refused at its first call, and step 0 drops the backups
of any earlier (or interrupted) run.

The pipeline's call is the model's own (its conditioning, the doubled guidance batch, its output
type), with the block hooks of :mod:`.graph` installed for that call only, as the house sampler
runs a schedule (:class:`~.supernet.SkipScheduleDenoiser`): same gates, same images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .graph import block_graph
from .schedule import Schedule, check_block_names
from .supernet import GatedRunner


class ScheduledNetwork(nn.Module):
    """``model`` (a UNet or a DiT) running ``schedule`` as the network of a diffusers pipeline whose
    scheduler is ``scheduler``."""

    def __init__(self, model: nn.Module, schedule: Schedule, scheduler: Any) -> None:
        super().__init__()
        if hasattr(model, "experts"):
            raise TypeError("ScheduledNetwork: a mixture of experts runs its schedule through the house sampler "
                            "(targets.load_target), not inside a pipeline")
        self.model = model
        self.graph = block_graph(model)
        check_block_names(self.graph, schedule)
        self.schedule = schedule
        self.runner = GatedRunner(self.graph)
        self.config = model.config  # what pipelines read: sizes, channels, class count
        self._scheduler = scheduler  # not a module: the pipeline owns it
        self.train(model.training)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def step_of(self, t: Any) -> int:
        """The step of timestep ``t`` in the scheduler's current trajectory (a clear error otherwise)."""
        steps = getattr(self._scheduler, "num_inference_steps", None)
        if steps != self.schedule.num_steps:
            raise ValueError(f"the pipeline runs num_inference_steps = {steps} but the DiP-GO schedule has "
                             f"{self.schedule.num_steps} steps: call it with num_inference_steps="
                             f"{self.schedule.num_steps}")
        t = int(torch.as_tensor(t).flatten()[0])  # one timestep per call: every row of a step shares it
        hits = (torch.as_tensor(self._scheduler.timesteps).flatten().long() == t).nonzero().flatten().tolist()
        if len(hits) != 1:
            raise ValueError(f"timestep {t} is {'not' if not hits else 'more than once'} in the scheduler's "
                             f"trajectory: a skip schedule needs one call per step")
        return hits[0]

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own call (``timestep=`` or the second positional argument), gated by its step."""
        step = self.step_of(kwargs["timestep"] if "timestep" in kwargs else args[1])
        if step == 0:
            self.runner.reset()
        with self.graph.hooks(self.runner.hard_blocks(self.schedule.keep[step])):
            return self.model(*args, **kwargs)
