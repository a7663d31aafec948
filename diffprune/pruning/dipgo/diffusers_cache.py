"""Baselines from diffusers itself: its First Block Cache on a DiT, at the MACs of a DiP-GO schedule.

diffusers ships training-free caches for transformers (``diffusers.hooks``: FirstBlockCache,
MagCache, FasterCache, PyramidAttentionBroadcast, ...). FirstBlockCache is the one that, like
DiP-GO, skips whole transformer blocks: at every call the first block is computed, and when its
residual changed by less than ``threshold`` (relative L1) since the last fully computed call, the
other blocks are skipped and their cached residual is added instead. Its savings depend on the
trajectory, so its MACs are measured (a :class:`~diffprune.metrics.cost.MacCounter` counts only the
blocks that run) and its threshold is searched to a MACs target (:func:`first_block_cache_for_macs`).

The hooks are diffusers' own (``apply_first_block_cache``); this module only installs them for the
duration of a ``with`` block (:func:`first_block_cache`), sets the cache context each model call
needs (the pipelines do it with ``CacheMixin.cache_context``, which ``DiTTransformer2DModel`` lacks),
resets the cached state at the start of every trajectory, and takes every hook off again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch import nn

from ...metrics.cost import MacCounter

CONTEXT = "cond_uncond"  # one context: guidance runs cond and uncond rows in ONE batched call


class CachedDenoiser:
    """``denoiser`` (a house denoiser calling ``transformer``) with the cache context set per call and
    the cached state dropped at every trajectory's start."""

    def __init__(self, denoiser: Callable, transformer: nn.Module) -> None:
        self.denoiser, self.transformer = denoiser, transformer

    def __getattr__(self, name: str):  # the wrapped denoiser's labels, latent shape, ... (samplers read them)
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def start(self, num_steps: int) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
        if hasattr(self.denoiser, "start"):
            self.denoiser.start(num_steps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        _set_cache_context(self.transformer, CacheContext(CONTEXT, step_index=step))
        try:
            return self.denoiser(x, t, step)
        finally:
            _set_cache_context(self.transformer, None)


@contextlib.contextmanager
def first_block_cache(transformer: nn.Module, threshold: float) -> Iterator[Callable[[Callable], CachedDenoiser]]:
    """diffusers' FirstBlockCache on ``transformer`` while active; yields ``wrap(denoiser) -> CachedDenoiser``.

    Every hook is taken off on exit and the modules are as before (no registry, no bound ``forward``).
    """
    if not threshold >= 0:
        raise ValueError(f"threshold = {threshold!r}: must be >= 0")
    before = {m: (hasattr(m, "_diffusers_hook"), "forward" in vars(m)) for m in transformer.modules()}
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=float(threshold)))
    try:
        yield lambda denoiser: CachedDenoiser(denoiser, transformer)
    finally:
        for m in transformer.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is None:
                continue
            for name in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK):
                if name in registry.hooks:
                    registry.remove_hook(name, recurse=False)
            had_registry, had_forward = before.get(m, (False, False))
            if not registry.hooks:
                if not had_forward:
                    vars(m).pop("forward", None)
                if not had_registry:
                    del m._diffusers_hook


@dataclass(frozen=True)
class CacheSearch:
    """What :func:`first_block_cache_for_macs` found: the ``threshold`` and its measured ``macs_ratio``."""

    threshold: float
    macs_ratio: float
    target: float
    within: bool


def trajectory_macs(run: Callable[[Callable], object], denoiser: Callable, transformer: nn.Module) -> int:
    """MACs executed inside ``transformer`` while ``run(denoiser)`` samples."""
    with MacCounter(transformer) as c:
        run(denoiser)
    return c.total


def first_block_cache_for_macs(run: Callable[[Callable], object], denoiser: Callable, transformer: nn.Module,
                               target_ratio: float, *, tolerance: float = 0.02, hi: float = 4.0,
                               iterations: int = 24) -> CacheSearch:
    """The FirstBlockCache threshold whose trajectory MACs are ``target_ratio`` of ``denoiser``'s own.

    ``run(d)`` samples a fixed probe trajectory with denoiser ``d`` (the same noise every time).
    Bisection on the threshold (more threshold, fewer blocks run); the threshold nearest the target is
    returned, ``within`` when it is within ``tolerance`` (relative) of it.
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio = {target_ratio!r}: must be in (0, 1]")
    full = trajectory_macs(run, denoiser, transformer)

    def ratio(th: float) -> float:
        with first_block_cache(transformer, th) as wrap:
            return trajectory_macs(run, wrap(denoiser), transformer) / full

    lo, best = 0.0, (0.0, ratio(0.0))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        r = ratio(mid)
        if abs(r - target_ratio) < abs(best[1] - target_ratio):
            best = (mid, r)
        if abs(r - target_ratio) <= tolerance * target_ratio:
            break
        lo, hi = (mid, hi) if r > target_ratio else (lo, mid)
    return CacheSearch(best[0], best[1], target_ratio, abs(best[1] - target_ratio) <= tolerance * target_ratio)
