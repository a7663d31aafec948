"""Baselines from diffusers itself: its transformer caches on a DiT, at the MACs of a DiP-GO schedule.

diffusers ships training-free caches for transformers (``diffusers.hooks``: FirstBlockCache,
TaylorSeer, MagCache, FasterCache, PyramidAttentionBroadcast, ...). Two of them are baselines here:

- **FirstBlockCache**, which like DiP-GO skips whole transformer blocks: at every call the first
  block is computed, and when its residual changed by less than ``threshold`` (relative L1) since
  the last fully computed call, the other blocks are skipped and their cached residual is added
  instead. Its savings depend on the trajectory, so its threshold is bisected to a MACs target
  (:func:`first_block_cache_for_macs`).
- **TaylorSeer** (Liu et al. 2025): every ``cache_interval`` steps (after ``warmup`` full steps)
  the hooked modules compute; in between their outputs are extrapolated by a Taylor series of
  their history. The hooked modules are each block's self-attention and feed-forward
  (``attn1``, ``ff``, as diffusers' own FLUX template for it hooks attention and feed-forward;
  its default hooks only the attention, and its "lite" mode looks for a ``proj_out`` DiT does not
  have). Its cost is set by ``(cache_interval, warmup)``, its fidelity also by the series' order
  (TaylorSeer's DiT-XL/2 recommendation: interval 4, order 4): :func:`taylorseer_for_macs` measures
  the grid and takes the setting within the MACs tolerance whose probe trajectory is closest to the
  full model's.

The others are not baselines here: PyramidAttentionBroadcast and FasterCache skip attention only
(34% of the dit-digits DiT's MACs, counted: too little to reach DiP-GO's 0.5 / 0.35 budgets), and
MagCache needs per-model magnitude ratios calibrated first.

The hooks are diffusers' own (``apply_first_block_cache``, ``apply_taylorseer_cache``); this module
only installs them for the duration of a ``with`` block (:func:`diffusers_cache`), sets the cache
context each model call needs (the pipelines do it with ``CacheMixin.cache_context``, which
``DiTTransformer2DModel`` lacks), resets the cached state at the start of every trajectory, and
takes every hook it added off again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig, apply_first_block_cache,
                             apply_taylorseer_cache)
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
def diffusers_cache(transformer: nn.Module, config: FirstBlockCacheConfig | TaylorSeerCacheConfig
                    ) -> Iterator[Callable[[Callable], CachedDenoiser]]:
    """diffusers' cache of ``config`` on ``transformer`` while active; yields ``wrap(denoiser) -> CachedDenoiser``.

    Every hook it added is taken off on exit and the modules are as before (no registry, no bound
    ``forward`` where there was none).
    """
    apply = {FirstBlockCacheConfig: apply_first_block_cache, TaylorSeerCacheConfig: apply_taylorseer_cache}
    if type(config) not in apply:
        raise TypeError(f"config: {type(config).__name__} is not one of {', '.join(c.__name__ for c in apply)}")
    before = {m: (hasattr(m, "_diffusers_hook"), "forward" in vars(m),
                  set(getattr(m, "_diffusers_hook").hooks) if hasattr(m, "_diffusers_hook") else set())
              for m in transformer.modules()}
    apply[type(config)](transformer, config)
    try:
        yield lambda denoiser: CachedDenoiser(denoiser, transformer)
    finally:
        for m in transformer.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is None:
                continue
            had_registry, had_forward, had_hooks = before.get(m, (False, False, set()))
            for name in [n for n in registry.hooks if n not in had_hooks]:
                registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                if not had_forward:
                    vars(m).pop("forward", None)
                if not had_registry:
                    del m._diffusers_hook


def first_block_cache(transformer: nn.Module, threshold: float):
    """:func:`diffusers_cache` with FirstBlockCache at ``threshold`` (>= 0)."""
    if not threshold >= 0:
        raise ValueError(f"threshold = {threshold!r}: must be >= 0")
    return diffusers_cache(transformer, FirstBlockCacheConfig(threshold=float(threshold)))


TAYLORSEER_MODULES = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


def taylorseer_cache(transformer: nn.Module, cache_interval: int, warmup: int, max_order: int = 1):
    """:func:`diffusers_cache` with TaylorSeer over every block's ``attn1`` and ``ff``: ``warmup`` full
    steps (>= 1: the series needs a first value), then a full step every ``cache_interval``, the
    steps between forecast by the series of order ``max_order``."""
    if not (isinstance(cache_interval, int) and cache_interval >= 1):
        raise ValueError(f"cache_interval = {cache_interval!r}: must be an integer >= 1")
    if not (isinstance(warmup, int) and warmup >= 1):
        raise ValueError(f"warmup = {warmup!r}: must be an integer >= 1 (step 0 computes)")
    if not (isinstance(max_order, int) and max_order >= 0):
        raise ValueError(f"max_order = {max_order!r}: must be an integer >= 0")
    return diffusers_cache(transformer, TaylorSeerCacheConfig(
        cache_interval=cache_interval, disable_cache_before_step=warmup, max_order=max_order,
        taylor_factors_dtype=torch.float32, cache_identifiers=list(TAYLORSEER_MODULES)))


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


@dataclass(frozen=True)
class TaylorSeerSearch:
    """What :func:`taylorseer_for_macs` found: the setting, its measured ``macs_ratio`` and the probe's
    mean squared distance to the full model's trajectory (``None`` when no setting was within)."""

    cache_interval: int
    warmup: int
    max_order: int
    macs_ratio: float
    target: float
    within: bool
    probe_mse: Optional[float]


def taylorseer_for_macs(run: Callable[[Callable], torch.Tensor], denoiser: Callable, transformer: nn.Module,
                        target_ratio: float, *, tolerance: float = 0.02, intervals: range = range(2, 11),
                        warmups: range = range(1, 9), orders: tuple[int, ...] = (1, 2, 4)) -> TaylorSeerSearch:
    """The TaylorSeer setting ``(cache_interval, warmup, max_order)`` whose trajectory MACs are
    ``target_ratio`` of ``denoiser``'s own (the order changes the forecast, not the cost).

    ``run(d)`` samples a fixed probe trajectory with denoiser ``d`` and returns its output. Every
    setting of the grid is measured; of those within ``tolerance`` (relative) the one whose probe
    output is closest to the full model's is returned (the baseline at its best for that cost).
    The cost moves in whole full steps (1/T of the trajectory each), so no setting may be within:
    then the cheapest one at or above the target is returned (never cheaper than what it is compared
    with; ``within`` False), or the one nearest it when every setting is cheaper.
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio = {target_ratio!r}: must be in (0, 1]")
    with MacCounter(transformer) as c:
        reference = run(denoiser)
    full = c.total
    found = []
    for n in intervals:
        for w in warmups:
            for order in orders:
                with taylorseer_cache(transformer, n, w, order) as wrap:
                    with MacCounter(transformer) as c:
                        out = run(wrap(denoiser))
                r = c.total / full
                found.append((n, w, order, r, abs(r - target_ratio) <= tolerance * target_ratio,
                              float((out.double() - reference.double()).pow(2).mean())))
    inside, above = [f for f in found if f[4]], [f for f in found if f[3] >= target_ratio]
    if inside:
        n, w, order, r, ok, mse = min(inside, key=lambda f: f[5])
    else:
        n, w, order, r, ok, mse = min(above or found, key=lambda f: (abs(f[3] - target_ratio), f[5]))
    return TaylorSeerSearch(n, w, order, r, target_ratio, ok, mse if ok else None)
