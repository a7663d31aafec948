"""Cost of a model: multiply-accumulates (MACs) per call, parameters, wall-clock latency.

MACs are counted by forward hooks on what actually executes: ``nn.Conv2d``, ``nn.Linear`` and the
two matrix products inside diffusers ``Attention`` (QK^T and AV). A module that is not executed
(a skipped block) is not counted, so a :class:`MacCounter` around a sampler measures real work.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

try:  # diffusers is a hard dependency, but keep the counter usable on plain torch modules
    from diffusers.models.attention_processor import Attention
except ImportError:  # pragma: no cover
    Attention = ()  # type: ignore


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return out.numel() * (m.in_channels // m.groups) * kh * kw


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


def _attn_macs(m: nn.Module, inp: tuple, out: torch.Tensor) -> int:
    x = inp[0]
    if x.ndim == 4:  # (B, C, H, W) -> L = H*W
        b, l = x.shape[0], x.shape[2] * x.shape[3]
    else:  # (B, L, C)
        b, l = x.shape[0], x.shape[1]
    inner = m.to_q.out_features
    # QK^T: B*heads*L*L*d  and  AV: B*heads*L*L*d  ->  2 * B * L * L * inner
    return 2 * b * l * l * inner


class MacCounter:
    """Counts MACs of every Conv2d/Linear/Attention call inside ``model`` while active."""

    def __init__(self, model: nn.Module, per_module: bool = False) -> None:
        self.model = model
        self.total = 0
        self.per_module: dict[str, int] | None = {} if per_module else None
        self._handles: list[Any] = []

    def _add(self, name: str, n: int) -> None:
        self.total += int(n)
        if self.per_module is not None:
            self.per_module[name] = self.per_module.get(name, 0) + int(n)

    def __enter__(self) -> "MacCounter":
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Conv2d):
                self._handles.append(m.register_forward_hook(lambda mod, i, o, n=name: self._add(n, _conv_macs(mod, o))))
            elif isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(lambda mod, i, o, n=name: self._add(n, _linear_macs(mod, o))))
            elif Attention and isinstance(m, Attention):
                self._handles.append(m.register_forward_hook(lambda mod, i, o, n=name: self._add(n, _attn_macs(mod, i, o))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def unet_macs(model: nn.Module, sample_shape: tuple[int, ...], timestep: int = 1) -> int:
    """MACs of one call ``model(x, t)`` on a batch of ONE image of shape ``sample_shape`` (C, H, W)."""
    p = next(model.parameters())
    x = torch.zeros((1, *sample_shape), device=p.device, dtype=p.dtype)
    t = torch.full((1,), timestep, device=p.device, dtype=torch.long)
    with MacCounter(model) as c:
        model(x, t)
    return c.total


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def measure_latency(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``: median and min over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0]}
