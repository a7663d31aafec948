"""Classifier-free guidance against a null class: the part of a class-conditional denoiser that does
not depend on the network (DiT's ``GuidedDiT``, the latent UNet's ``GuidedUNet``).

With ``guidance_scale > 1`` each call runs ONE model call on the doubled batch ``[x, x]`` with
labels ``[y, null]`` and returns ``eps_uncond + g * (eps_cond - eps_uncond)`` on the first ``C``
output channels (a learned-sigma model's variance channels are dropped), ``DiTPipeline``'s formula
term for term; ``<= 1`` runs the conditional model alone on batch B.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

ModelCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``call(x (B', C, h, w), t (B',), class_labels (B',), step) -> raw model output (B', C_out, h, w)``."""


class LabelGuided:
    """A class-conditional model as a house denoiser ``(x_t (B, C, h, w), t (B,), step) -> eps (B, C, h, w)``.

    Args:
        class_labels: ``(B,)`` class ids in ``[0, num_classes)``, one per image of the batch.
        num_classes: the model's class count; ``null_class`` its unconditional id.
        latent_shape: ``(C, h, w)`` of what it denoises.
        guidance_scale: g; ``<= 1`` runs the conditional model alone (batch B).
        call: the model call; a subclass gives its plain one (``_plain``), a block-skip runner its own.
    """

    def __init__(self, class_labels: Sequence[int] | torch.Tensor, num_classes: int, null_class: int,
                 latent_shape: Sequence[int], guidance_scale: float = 1.0, *, call: Optional[ModelCall] = None) -> None:
        self.class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).cpu()
        self.num_classes, self.null_class = int(num_classes), int(null_class)
        bad = [int(y) for y in self.class_labels if not 0 <= int(y) < self.num_classes]
        if bad or not len(self.class_labels):
            raise ValueError(f"class_labels = {self.class_labels.tolist()}: need >= 1 ids in [0, {self.num_classes})")
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.latent_channels = self.latent_shape[0]
        self.guidance_scale = float(guidance_scale)
        self._call = call if call is not None else self._plain

    def _plain(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def guided(self) -> bool:
        """Whether each call doubles the batch with the null class (``guidance_scale > 1``)."""
        return self.guidance_scale > 1

    def model_inputs(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, t, labels)`` of the model call: batch B, or 2B ``[cond, uncond]`` when guided."""
        if x.shape[0] != len(self.class_labels):
            raise ValueError(f"batch of {x.shape[0]} latents, but {len(self.class_labels)} class labels")
        y = self.class_labels.to(x.device)
        if not self.guided:
            return x, t, y
        null = torch.full_like(y, self.null_class)
        return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])

    def guide(self, out: torch.Tensor) -> torch.Tensor:
        """Raw output ``(B', C_out, h, w)`` -> guided eps ``(B, C, h, w)``."""
        eps = out[:, : self.latent_channels]  # learned sigma: the variance channels are dropped
        if not self.guided:
            return eps
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        return uncond + self.guidance_scale * (cond - uncond)  # DiTPipeline's formula, term for term

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        # 1. the model input: doubled with the null class when guided
        x_in, t_in, y_in = self.model_inputs(x, t)
        # 2. one model call, then guidance on eps
        return self.guide(self._call(x_in, t_in, y_in, step))


class LabelDropout:
    """A training call (:data:`diffprune.training.ConditionalCall`) that drops each label to the null
    class with probability ``p`` in training mode (the global RNG, as DiT's label embedding): what
    classifier-free guidance needs. ``forward(model, x, t, labels) -> eps``: the family's own call."""

    def __init__(self, forward: Callable[..., torch.Tensor], null_class: Callable[[torch.nn.Module], int],
                 p: float) -> None:
        self.forward, self.null_class, self.p = forward, null_class, float(p)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if model.training and self.p > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.p
            labels = torch.where(drop, torch.full_like(labels, self.null_class(model)), labels)
        return self.forward(model, x, t, labels)


__all__ = ["LabelDropout", "LabelGuided", "ModelCall"]


@contextmanager
def bare_call_defaults(net: torch.nn.Module, fill: Callable[[torch.Tensor], dict]) -> Iterator[None]:
    """Within it, a call ``net(x, t)`` that lacks the keyword arguments ``fill(x)`` gives (its
    conditioning: class labels, text) takes them from ``fill``. Code that counts MACs or checks
    shapes calls a network so, and the conditions' values change neither. The hook goes on exit."""
    def pre(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) < 3:
            extra = fill(args[0] if args else kwargs["sample"])
            kwargs = kwargs | {k: v for k, v in extra.items() if kwargs.get(k) is None}
        return args, kwargs

    handle = net.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
