"""Cost of a model: multiply-accumulates (MACs) per call, parameters, wall-clock latency.

MACs are counted on what actually executes, by ``torch.utils.flop_counter.FlopCounterMode``: every
matrix product and convolution the dispatcher runs (``Conv2d``, ``Linear``, the QK^T and AV products
of attention, any model family), ``MACs = FLOPs / 2``. A module that is not executed (a skipped
block) is not counted, so a :class:`MacCounter` around a sampler measures real work.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                         out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU attention kernel: ``q, k, v`` of shape ``(B, heads, L, d)``, QK^T then AV."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# the CPU attention kernel torch's flop registry lacks (its CUDA kernels are registered there)
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _no_flops(*args: Any, **kwargs: Any) -> int:
    return 0


# "layers": the convention of the papers' tables (DiP-GO's 16.94T for SD-1.5, DiT's 118.6 G): the
# convolutions and linear layers, not the attention products QK^T and AV (of no weights)
_LAYERS_ONLY = {getattr(torch.ops.aten, name): _no_flops for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "bmm", "baddbmm") if hasattr(torch.ops.aten, name)}
COUNTS = ("all", "layers")


class MacCounter:
    """Counts the MACs executed inside ``model`` (any of its modules, called alone or nested) while active.

    A ``FlopCounterMode`` counts every operation; forward hooks on the modules of ``model`` read its
    running total when a module is entered and left, so only work done inside ``model`` is added to
    :attr:`total`, and :attr:`per_module` holds each module's own MACs (those of its children
    excluded): a ``Linear`` its product, an ``Attention`` its two attention products.

    Args:
        model: the network whose work is counted.
        per_module: also record MACs by module name (``model.named_modules()`` names; only modules
            with a non-zero count appear).
        count: ``"all"`` (every product: the house's cost, the one methods are compared by) or
            ``"layers"`` (convolutions and linear layers only, the papers' convention, to compare with
            their tables; attention's batched products are left out).
    """

    def __init__(self, model: nn.Module, per_module: bool = False, count: str = "all") -> None:
        if count not in COUNTS:
            raise ValueError(f"count = {count!r}: expected one of {list(COUNTS)}")
        self.count = count
        self.model = model
        self.total = 0
        self.per_module: dict[str, int] | None = {} if per_module else None
        self._handles: list[Any] = []
        self._frames: list[list[int]] = []  # per executing module: [flops at entry, flops of its children]
        self._flops: FlopCounterMode | None = None

    def _enter(self) -> None:
        self._frames.append([self._flops.get_total_flops(), 0])

    def _leave(self, name: str) -> None:  # a forward hook must return None, or it replaces the output
        start, children = self._frames.pop()
        inclusive = self._flops.get_total_flops() - start
        if self._frames:
            self._frames[-1][1] += inclusive
        else:  # a call from outside the model: its whole work counts
            self.total += inclusive // 2
        own = (inclusive - children) // 2
        if self.per_module is not None and own:
            self.per_module[name] = self.per_module.get(name, 0) + own

    def executed_macs(self) -> int:
        """MACs executed so far while active, by anything (for timing a window inside a model call)."""
        return self._flops.get_total_flops() // 2

    def __enter__(self) -> "MacCounter":
        self._flops = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS if self.count == "all"
                                      else {**_EXTRA_FORMULAS, **_LAYERS_ONLY})
        for name, m in self.model.named_modules():
            self._handles.append(m.register_forward_pre_hook(lambda mod, inp: self._enter()))
            self._handles.append(m.register_forward_hook(lambda mod, inp, out, n=name: self._leave(n),
                                                         always_call=True))
        self._flops.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._flops.__exit__(*exc)


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


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one ``fn()`` (CUDA work synchronised before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_latency(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``: median and min over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = sorted(timed(fn) for _ in range(repeats))
    return {"median_s": times[len(times) // 2], "min_s": times[0]}
