"""The denoising loop, and the denoisers it drives.

A *denoiser* is any callable ``(x_t, t, step) -> model_output`` with ``x_t: (B, C, H, W)``,
``t: (B,)`` long timesteps and ``step`` the index of this step in the trajectory (0 = first, the
noisiest). Plain models, timestep-expert mixtures and skip-schedule runners are all denoisers, so
there is one trajectory loop, :func:`trajectory`, which :func:`sample` and DiP-GO's pruner
training both run. A denoiser may define ``start(num_steps)``; it is called before every trajectory
(to reset caches). A conditional latent model's denoiser may also define ``condition(indices)`` (called
by :func:`sample` before each batch with the range of its image indices: it sets their conditions)
and ``decode(latents) -> images`` (the VAE: :func:`sample` then leaves the latents unclamped and
returns the decoded images); :class:`diffprune.models.dit.ClassCycle` is one.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor: ...


Predictor = Callable[[torch.Tensor, torch.Tensor], Any]


def predict(model: Predictor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The output tensor ``(B, C, H, W)`` of ``model(xt, t)`` (a diffusers output's ``.sample``).

    Args:
        model: a network, or any callable ``(x_t (B, C, H, W), t (B,)) -> prediction``.
        xt: noisy images ``(B, C, H, W)``.
        t: timesteps ``(B,)``.
    """
    out = model(xt, t)
    return out.sample if hasattr(out, "sample") else out


class ModelDenoiser:
    """A diffusers UNet (or any ``model(x, t).sample``) as a denoiser."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return predict(self.model, x, t)


class ExpertMixture:
    """Routes each step to the expert whose timestep interval holds ``t``.

    ``boundaries`` are the K-1 ascending cut points: expert k serves ``b[k-1] <= t < b[k]``
    (expert 0 serves the lowest, least noisy timesteps).
    """

    def __init__(self, experts: Sequence[nn.Module], boundaries: Sequence[int]) -> None:
        if len(boundaries) != len(experts) - 1:
            raise ValueError(f"{len(experts)} experts need {len(experts) - 1} boundaries, got {list(boundaries)}")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries = {list(boundaries)}: must be ascending")
        self.experts = [ModelDenoiser(e) for e in experts]
        self.boundaries = list(boundaries)

    def expert_index(self, t: int) -> int:
        return sum(int(t) >= b for b in self.boundaries)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        k = self.expert_index(int(t.flatten()[0]))
        return self.experts[k](x, t, step)


def initial_noise(num_images: int, sample_shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting noise x_T for images 0..N-1: the same seed gives the same noise for every model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_images, *sample_shape), generator=g)


def trajectory(
    denoiser: Denoiser | Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler,
    x_T: torch.Tensor,
    steps: int,
    *,
    grad: bool = False,
    generator: Optional[torch.Generator] = None,
    on_step: Optional[Callable[[int], None]] = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Denoise ``x_T: (B, C, H, W)`` through ``steps`` scheduler steps; returns x_0 ``(B, C, H, W)`` in [-1, 1].

    The one trajectory loop of the house: plain models, expert mixtures, skip-schedule runners and
    DiP-GO's gated SuperNet all go through it. ``scheduler`` is deep-copied and set to ``steps``, so
    stateful multistep solvers start fresh; ``denoiser.start(num_steps)`` is called first if the
    denoiser defines it. The result stays on ``x_T``'s device.

    Args:
        denoiser: ``(x_t, t, step) -> model output``.
        scheduler: a diffusers scheduler (left unchanged).
        x_T: the initial noise.
        steps: number of sampling steps.
        grad: record autograd through every step (pruner training); otherwise run under ``no_grad``.
        generator: the step noise of stochastic schedulers (DDPM); unused by deterministic ones.
        on_step: called with the step index after each step (progress display).
        clamp: clamp x_0 to the pixel range [-1, 1]; ``False`` for latents (a VAE's latent space is
            unbounded, and DiTPipeline hands its latents to the VAE unclamped).
    """
    if steps < 1:
        raise ValueError(f"steps = {steps}: must be >= 1")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    step_kwargs = {"generator": generator} if generator is not None and _takes_generator(sched) else {}
    if hasattr(denoiser, "start"):
        denoiser.start(len(sched.timesteps))
    x = x_T
    with torch.set_grad_enabled(grad):
        for step, t in enumerate(sched.timesteps):
            tb = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            # 1. predict the model output (noise, sample or v, as the scheduler expects)
            out = denoiser(sched.scale_model_input(x, t), tb, step)
            # 2. x_t -> x_{t-1}
            x = sched.step(out, t, x, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(step)
        return x.clamp(-1, 1) if clamp else x


def _takes_generator(scheduler) -> bool:
    """Whether ``scheduler.step`` accepts a ``generator`` (for its step noise)."""
    return "generator" in scheduler.step.__code__.co_varnames


@torch.no_grad()
def sample(
    denoiser: Denoiser | Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler,
    *,
    num_images: int,
    sample_shape: Sequence[int],
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``num_images`` samples; returns ``(N, C, H, W)`` in [-1, 1] on the CPU.

    Deterministic for a given ``seed`` (DDIM with eta=0 is fully deterministic; DDPM draws its step
    noise from a generator seeded by ``seed`` and the batch index). Each batch is one
    :func:`trajectory` from :func:`initial_noise`; a latent denoiser (with ``decode``) is sampled in
    ``sample_shape`` latents and the images it decodes are returned.
    """
    if num_images < 1 or steps < 1:
        raise ValueError(f"num_images={num_images}, steps={steps}: both must be >= 1")
    noise = initial_noise(num_images, sample_shape, seed)
    decode = getattr(denoiser, "decode", None)  # a latent model's VAE
    out = []
    batches = range(0, num_images, batch_size)
    bar = tqdm(total=len(batches) * steps, desc="sampling", disable=not progress, leave=False)
    for bi, i in enumerate(batches):
        gen = torch.Generator().manual_seed(seed * 100_003 + bi)
        x_T = noise[i : i + batch_size].to(device)
        if hasattr(denoiser, "condition"):  # the conditions of images i .. i + B - 1
            denoiser.condition(range(i, i + len(x_T)))
        x0 = trajectory(denoiser, scheduler, x_T, steps, generator=gen, on_step=lambda _: bar.update(1),
                        clamp=decode is None)
        out.append((x0 if decode is None else decode(x0)).cpu())
    bar.close()
    return torch.cat(out)
