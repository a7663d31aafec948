"""DiP-GO on a class-conditional DiT: every transformer block's residual update reused from its last step.

A DiT block maps the token stream ``h (B', L, D)`` to ``h + delta_k(h, t, y)``. :class:`DiTGraph` gates
the update: a computed block returns its own output (bit for bit) and keeps ``delta = out - h`` as its
backup; a reusing block returns ``h + delta`` on the *current* stream, so the blocks after it still
see the change made upstream at this step. The stream itself is always carried, so every block's
consumer is the always-computed part (:data:`~.graph.OUTPUT`): no block is ever "not needed", and a
skipped block costs nothing (the add is no multiply-accumulate). Deviation from the DiP-GO paper,
named: the paper's SuperNet (on SD's UNet) reuses a block's *output*; for DiT's chain of residual
blocks we reuse the residual update, as the issue asks (reusing the output would throw away every
update computed upstream of the block at this step).

Conditioning passes through the cache by rows: with guidance, the runner sees the doubled batch
``[cond, uncond]`` on every step, so row i's backup is always row i's own update (its class label,
or the null class). :class:`SkipScheduleDiT` is :class:`~diffprune.models.dit.GuidedDiT` with its
transformer call routed through a :class:`~.supernet.GatedRunner`, so labels and guidance are
handled where the plain sampler handles them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from diffusers import DiTTransformer2DModel
from diffusers.hooks import ModelHook
from torch import nn

from ...models.dit import GuidedDiT
from .graph import OUTPUT, BlockGraph, BlockOutputs, RunBlock
from .schedule import Schedule, schedule_macs
from .supernet import ScheduledCall


class DiTGraph(BlockGraph):
    """Adapter for diffusers' ``DiTTransformer2DModel``: blocks ``block_0..block_{N-1}`` (the transformer blocks).

    The class labels of a call are set with :meth:`conditioned`; outside it (costing) every row is
    the null class, which costs the same.
    """

    def __init__(self, model: DiTTransformer2DModel) -> None:
        if not isinstance(model, DiTTransformer2DModel):
            raise TypeError(f"DiTGraph: expected a DiTTransformer2DModel, got {type(model).__name__}")
        self.model = model

    @property
    def block_names(self) -> list[str]:
        return [f"block_{i}" for i in range(len(self.model.transformer_blocks))]

    @property
    def block_modules(self) -> list[nn.Module]:
        return list(self.model.transformer_blocks)

    @property
    def consumers(self) -> list[list[int | str]]:
        """Every block's update is read by the residual stream, which is always carried."""
        return [[OUTPUT] for _ in self.model.transformer_blocks]

    def pack_outputs(self, k: int, native: Any) -> BlockOutputs:
        return (native,)

    def native_outputs(self, k: int, outputs: Optional[BlockOutputs]) -> Any:
        return None if outputs is None else outputs[0]

    def block_hook(self, k: int, run_block: RunBlock) -> ModelHook:
        return _ResidualHook(k, run_block)

    def call_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``DiTTransformer2DModel.forward``'s raw output ``(B', C_out, h, w)`` for ``x: (B', C, h, w)``, ``t: (B',)``."""
        y = self.condition
        if y is None:
            y = torch.full((x.shape[0],), int(self.model.config.num_embeds_ada_norm), device=x.device)
        return self.model(x, timestep=t, class_labels=y, return_dict=False)[0]


class _ResidualHook(ModelHook):
    """Block k's forward as ``run_block(k, compute)``; the backup is the update ``out - h``."""

    def __init__(self, k: int, run_block: RunBlock) -> None:
        super().__init__()
        self.k, self.run_block = k, run_block

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]  # (B', L, D)
        produced: dict[str, Any] = {}

        def compute() -> BlockOutputs:
            produced["out"] = self.fn_ref.original_forward(*args, **kwargs)
            produced["delta"] = (produced["out"] - h,)
            return produced["delta"]

        result = self.run_block(self.k, compute)
        if result is None:  # not needed (never, with the stream as consumer): the stream passes on
            return h
        if result is produced.get("delta"):  # computed at this step: the block's own output, bit for bit
            return produced["out"]
        return h + result[0]  # reused (or mixed by soft gates): the update on the current stream


class SkipScheduleDiT(ScheduledCall, GuidedDiT):
    """:class:`GuidedDiT` running a skip :class:`Schedule` over the transformer blocks with real savings.

    Args:
        transformer: the (frozen) ``DiTTransformer2DModel``; left unchanged.
        schedule: gates ``[T][N]`` for :class:`DiTGraph`'s block names.
        class_labels, guidance_scale: as :class:`GuidedDiT`.
    """

    def __init__(self, transformer: DiTTransformer2DModel, schedule: Schedule,
                 class_labels: Sequence[int] | torch.Tensor, guidance_scale: float = 1.0) -> None:
        super().__init__(transformer, class_labels, guidance_scale, call=self._gated)
        self._schedule_over(DiTGraph(transformer), schedule)


def guided_schedule_macs(transformer: DiTTransformer2DModel, schedule: Schedule, guidance_scale: float,
                         num_images: int = 1) -> int:
    """Trajectory MACs of sampling ``num_images`` latents under ``schedule``, guidance included.

    Guidance (``guidance_scale > 1``) runs every call on the doubled batch: twice the MACs.
    """
    graph = DiTGraph(transformer)
    c = transformer.config
    per_image = schedule_macs(graph, schedule, (c.in_channels, c.sample_size, c.sample_size))
    return per_image * (2 if guidance_scale > 1 else 1) * num_images
