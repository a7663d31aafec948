"""The channel-ratio search every Diff-Pruning family shares: bisect a ratio until the pruned
model's MACs land on a target (:func:`diffprune.pruning.taylor.search_ratio` for pixel UNets; the
latent families' stages give their own probe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import ConfigError
from .surgery import PruningError


@dataclass(frozen=True)
class RatioSearch:
    """What :func:`bisect_ratio` found: the channel ``ratio``, its ``macs_ratio``, ``within`` tolerance."""

    ratio: float
    macs_ratio: float
    target: float
    within: bool


def bisect_ratio(macs_at: Callable[[float], float], target: float, *, tolerance: float = 0.02,
                 iters: int = 14) -> RatioSearch:
    """Bisect the channel ratio in (0, 0.99) until ``macs_at(ratio)`` (pruned / teacher MACs, a
    :class:`PruningError` for a ratio that leaves nothing consistent) is within ``tolerance``
    (relative) of ``target``; the closest probe, ``within`` saying whether it met the tolerance."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"taylor.target_macs_ratio = {target!r}: must be in (0, 1)")
    lo, hi, best = 0.0, 0.99, None
    for _ in range(iters):
        mid = round(0.5 * (lo + hi), 6)
        try:
            got = macs_at(mid)
        except PruningError:  # nothing consistent left at this ratio: prune less
            got = 0.0
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        if abs(got - target) <= tolerance * target:
            break
        lo, hi = (mid, hi) if got > target else (lo, mid)
    assert best is not None
    return RatioSearch(best[0], best[1], target, abs(best[1] - target) <= tolerance * target)
