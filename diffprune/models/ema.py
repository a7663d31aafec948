"""Exponential moving average of a model's parameters: ``diffusers.training_utils.EMAModel``.

The house uses diffusers' EMA with its default warm-up: the decay at optimisation step ``s`` is
``min(decay, (1 + s) / (10 + s))`` (0 on the first step), so the average forgets the initial
weights at once instead of keeping ``decay ** steps`` of them (``0.99 ** 200 = 13 %`` of a short
fine-tune's saved weights were the un-fine-tuned pruned init with a plain EMA). :class:`EMA` only
adds what the house needs around it: updates and copies from / to a module, and a state that
restores onto the device of the model it tracks.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from diffusers.training_utils import EMAModel
from torch import nn


class EMA(EMAModel):
    """diffusers' :class:`~diffusers.training_utils.EMAModel` of ``model``'s parameters.

    Its ``state_dict()`` holds tensors and JSON scalars only, so it saves through
    :class:`diffprune.training.TrainState`.

    Args:
        model: the network whose parameters are averaged (buffers are not: a UNet has none that
            are trained).
        decay: the largest decay, in ``[0, 1)``; the warm-up ``(1 + s) / (10 + s)`` caps it early on.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay = {decay!r}: must be in [0, 1)")
        super().__init__(model.parameters(), decay=float(decay))

    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters (call after each optimiser step)."""
        self.step(model.parameters())

    def copy_to(self, target: nn.Module | Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged weights into ``target`` (a module, or its parameters in order)."""
        super().copy_to(target.parameters() if isinstance(target, nn.Module) else target)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, keeping the averaged weights on the device they were on.

        Raises:
            ValueError: when the saved weights do not match the tracked parameters in number or shape.
        """
        saved = state_dict.get("shadow_params")
        if saved is not None:
            ours = [tuple(p.shape) for p in self.shadow_params]
            theirs = [tuple(p.shape) for p in saved]
            if ours != theirs:
                raise ValueError(f"EMA state does not match the model: {len(theirs)} saved tensors "
                                 f"{theirs[:3]}..., {len(ours)} parameters {ours[:3]}...")
        devices = [p.device for p in self.shadow_params]
        super().load_state_dict(state_dict)
        self.shadow_params = [p.to(d) for p, d in zip(self.shadow_params, devices)]

