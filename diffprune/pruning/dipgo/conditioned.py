"""DiP-GO's pruner on a conditional latent model: guided calls with per-row conditions, unclamped
latents, and the consistency loss on decoded images.

The pruner (:func:`~.pruner.train_pruner`) trains on a graph whose ``call_model(x, t)`` is the
denoiser of one trajectory. :class:`ConditionedGraph` makes a conditional family's graph
(:class:`~.dit.DiTGraph`, :class:`~.sd.SDUNetGraph`) such a graph: row i of a call is conditioned on
``conds[rows[i] % n]`` (a class label, a prompt's embeddings) and guided on the doubled batch by the
family's own denoiser (``GuidedDiT`` / ``GuidedSD``: the same formula as the plain sampler). The
pruner sets ``rows`` to the pool rows of each batch (:meth:`ConditionedGraph.rows`), so a pooled
noise keeps the condition its full-model target was drawn with. With a VAE the latents are
not clamped (``latent``) and the consistency loss compares the images it decodes (``decode``), as the
paper's SSIM on the decoded final images does; a class-conditional model in pixel space has none.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .graph import BlockGraph, BlockOutputs, RunBlock

# make(rows (B,), call) -> a house denoiser (x, t, step) -> eps for those rows' conditions, whose
# model call is ``call(x', t', cond', step)`` on the (doubled) batch
MakeDenoiser = Callable[[torch.Tensor, Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]


class ConditionedGraph(BlockGraph):
    """``inner``'s blocks; its forward is a guided, conditioned denoiser call.

    Args:
        inner: the family's graph (with ``conditioned(cond)`` and ``call_model``).
        num_conditions: how many conditions the rows index (a row without ``rows`` set is ``i % n``).
        make_denoiser: builds the guided denoiser for a batch's rows (see :data:`MakeDenoiser`).
        decoder: the VAE whose ``decode`` turns final latents into images for the loss; ``None`` for a
            model in pixel space (its final samples are then clamped to [-1, 1], as the house's).
    """

    def __init__(self, inner: BlockGraph, num_conditions: int, make_denoiser: MakeDenoiser,
                 decoder: Optional[nn.Module] = None) -> None:
        if num_conditions < 1:
            raise ValueError(f"num_conditions = {num_conditions}: need >= 1")
        self.inner, self.model, self.decoder = inner, inner.model, decoder
        self.latent = decoder is not None  # latents are never clamped to the pixel range
        self.num_conditions, self.make_denoiser = num_conditions, make_denoiser
        self._rows: Optional[torch.Tensor] = None

    @property
    def block_names(self) -> list[str]:
        return self.inner.block_names

    @property
    def block_modules(self) -> list[nn.Module]:
        return self.inner.block_modules

    @property
    def consumers(self) -> list[list[int | str]]:
        return self.inner.consumers

    def pack_outputs(self, k: int, native: Any) -> BlockOutputs:
        return self.inner.pack_outputs(k, native)

    def native_outputs(self, k: int, outputs: Optional[BlockOutputs]) -> Any:
        return self.inner.native_outputs(k, outputs)

    def block_hook(self, k: int, run_block: RunBlock) -> ModelHook:
        return self.inner.block_hook(k, run_block)

    @contextlib.contextmanager
    def rows(self, rows: torch.Tensor) -> Iterator["ConditionedGraph"]:
        """Calls inside condition row i on ``conds[rows[i] % n]`` (pool row j has condition ``j % n``)."""
        self._rows = rows
        try:
            yield self
        finally:
            self._rows = None

    def _inner_call(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, step: int) -> torch.Tensor:
        with self.inner.conditioned(cond):
            return self.inner.call_model(x, t)

    def call_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided eps ``(B, C, h, w)`` of ``x: (B, C, h, w)``; the blocks see the doubled batch."""
        rows = self._rows if self._rows is not None else torch.arange(x.shape[0])
        if len(rows) != x.shape[0]:
            raise ValueError(f"a batch of {x.shape[0]} latents, but {len(rows)} condition rows")
        return self.make_denoiser(rows.cpu() % self.num_conditions, self._inner_call)(x, t, 0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images for the consistency loss (differentiable; the decoder is frozen by the pruner)."""
        if self.decoder is None:
            return latents
        return self.decoder.decode(latents / self.decoder.config.scaling_factor).sample


def dit_conditioned(transformer: nn.Module, labels: torch.Tensor, guidance_scale: float,
                    vae: Optional[nn.Module] = None) -> ConditionedGraph:
    """A DiT's :class:`ConditionedGraph`: row i carries ``labels[rows[i]]``, guided as ``GuidedDiT``."""
    from ...models.dit import GuidedDiT
    from .dit import DiTGraph

    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)

    def make(rows: torch.Tensor, call):
        return GuidedDiT(transformer, labels[rows], guidance_scale, call=call)

    return ConditionedGraph(DiTGraph(transformer), len(labels), make, vae)


def sd_conditioned(unet: nn.Module, text: torch.Tensor, negative: torch.Tensor, guidance_scale: float,
                   vae: Optional[nn.Module] = None) -> ConditionedGraph:
    """A text-to-image UNet's :class:`ConditionedGraph`: row i attends to ``text[rows[i]]`` (``(P, L, D)``
    prompt embeddings), guided against ``negative`` (``(1, L, D)``, the empty prompt's) as ``GuidedSD``."""
    from ...models.sd import GuidedSD
    from .sd import SDUNetGraph

    def make(rows: torch.Tensor, call):
        cond = text[rows.to(text.device)]
        if guidance_scale <= 1:
            return GuidedSD(unet, cond, guidance_scale, call=call)
        return GuidedSD(unet, torch.cat([negative.expand(len(rows), -1, -1), cond]), guidance_scale, call=call)

    return ConditionedGraph(SDUNetGraph(unet, tokens=text.shape[1]), len(text), make, vae)
