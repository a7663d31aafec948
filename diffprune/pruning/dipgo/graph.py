"""Block graphs: which blocks of a denoiser can be gated, who consumes their outputs, how to run them.

A :class:`BlockGraph` is the small adapter between DiP-GO and one model family. It names the
gateable blocks in execution order, lists for every block the blocks that consume its outputs
(:data:`OUTPUT` = the always-computed head of the network), and re-implements the model's forward
pass over those blocks, handing every block call to a ``run_block`` callback that decides whether the
block is computed, reused from its backup, mixed, or not needed at all. The model itself is never
modified: no hooks, no patched ``forward``.

:class:`UNet2DGraph` implements it for diffusers' ``UNet2DModel`` (every down block, the mid block,
every up block). An SD ``UNet2DConditionModel`` or a ``DiTTransformer2DModel`` adapter would list
its blocks and consumers the same way (transformer blocks form a chain: block i feeds block i+1).
"""

from __future__ import annotations

import abc
from typing import Callable, Optional, Sequence

import torch
from torch import nn

OUTPUT = "<output>"
"""Consumer name of the network's head (norm/conv_out), which is always computed."""

BlockOutputs = tuple[torch.Tensor, ...]
ComputeFn = Callable[[], BlockOutputs]
RunBlock = Callable[[int, ComputeFn], Optional[BlockOutputs]]
"""``run_block(index, compute) -> outputs | None``: the graph's forward calls it once per block in
execution order. ``compute()`` evaluates the block on the current inputs; returning ``None`` says the
block is not needed at this step (its consumers never read it)."""


class BlockGraph(abc.ABC):
    """The gateable blocks of one model, their consumers, and a forward pass over them."""

    model: nn.Module

    @property
    @abc.abstractmethod
    def block_names(self) -> list[str]:
        """Names of the N gateable blocks, in execution order (producers before consumers)."""

    @property
    @abc.abstractmethod
    def block_modules(self) -> list[nn.Module]:
        """The N block modules, aligned with :attr:`block_names` (used to attribute MACs)."""

    @property
    @abc.abstractmethod
    def consumers(self) -> list[list[int | str]]:
        """For block k, the indices of the blocks reading its outputs, or :data:`OUTPUT`."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, run_block: RunBlock) -> torch.Tensor:
        """The model's output for ``x: (B, C, H, W)``, ``t: (B,)``, with every block call routed
        through ``run_block``. With ``run_block = lambda k, f: f()`` it equals ``model(x, t)``."""


def needed_blocks(consumers: Sequence[Sequence[int | str]], keep: Sequence[bool]) -> list[bool]:
    """Which blocks are needed at one step, given the gates ``keep: [N]`` of that step.

    A block is needed when the head reads it, or when some needed consumer is computed
    (``keep``). A block whose every consumer reuses its backup (or is itself not needed) is not.
    Blocks are listed in execution order, so one pass from the last block back decides all.
    """
    n = len(consumers)
    if len(keep) != n:
        raise ValueError(f"keep has {len(keep)} gates, the graph has {n} blocks")
    needed = [False] * n
    for k in range(n - 1, -1, -1):
        needed[k] = any(c == OUTPUT or (needed[c] and keep[c]) for c in consumers[k])
    return needed


def executed_blocks(consumers: Sequence[Sequence[int | str]], keep: Sequence[bool]) -> list[bool]:
    """Blocks actually computed at one step: needed and gated to compute. ``keep: [N] -> [N]``."""
    needed = needed_blocks(consumers, keep)
    return [bool(n and k) for n, k in zip(needed, keep)]


class UNet2DGraph(BlockGraph):
    """Adapter for diffusers' ``UNet2DModel``: blocks ``down_0..down_{L-1}, mid, up_0..up_{L-1}``.

    Down block i returns its residual tuple ``(r_1, ..., r_m)`` whose last entry is also the hidden
    state passed on; up block j reads the previous hidden state and pops its residuals from the
    stack, exactly as ``UNet2DModel.forward`` does. Unsupported variants (skip-connection blocks,
    class conditioning) raise ``NotImplementedError`` at construction.
    """

    def __init__(self, model: nn.Module) -> None:
        if model.class_embedding is not None:
            raise NotImplementedError("UNet2DGraph: class-conditional UNet2DModel is not supported")
        for blk in [*model.down_blocks, *model.up_blocks]:
            if hasattr(blk, "skip_conv"):
                raise NotImplementedError(f"UNet2DGraph: {type(blk).__name__} (skip_conv blocks) is not supported")
        self.model = model
        L = len(model.down_blocks)
        names = [f"down_{i}" for i in range(L)]
        modules: list[nn.Module] = list(model.down_blocks)
        self._mid = model.mid_block is not None
        if self._mid:
            names.append("mid")
            modules.append(model.mid_block)
        names += [f"up_{j}" for j in range(len(model.up_blocks))]
        modules += list(model.up_blocks)
        self._names, self._modules = names, modules
        # Number of residual outputs of each down block (resnets + optional downsampler).
        self._n_res = [len(b.resnets) + (1 if getattr(b, "downsamplers", None) else 0) for b in model.down_blocks]
        self._consumers = self._derive_consumers()

    # -- structure ---------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        return list(self._names)

    @property
    def block_modules(self) -> list[nn.Module]:
        return list(self._modules)

    @property
    def consumers(self) -> list[list[int | str]]:
        return [list(c) for c in self._consumers]

    def _derive_consumers(self) -> list[list[int | str]]:
        """Simulate the residual stack of ``UNet2DModel.forward`` with producer indices."""
        L = len(self.model.down_blocks)
        cons: list[set] = [set() for _ in self._names]
        stack: list[int | None] = [None]  # conv_in output: the stem, always computed
        prev: int | None = None
        for i in range(L):
            if prev is not None:
                cons[prev].add(i)
            stack += [i] * self._n_res[i]
            prev = i
        if self._mid:
            mid = L
            cons[prev].add(mid)
            prev = mid
        first_up = L + int(self._mid)
        for j, blk in enumerate(self.model.up_blocks):
            k = first_up + j
            cons[prev].add(k)
            n = len(blk.resnets)
            for producer in stack[-n:]:
                if producer is not None:
                    cons[producer].add(k)
            stack = stack[:-n]
            prev = k
        cons[prev].add(OUTPUT)
        return [sorted(c, key=lambda v: (isinstance(v, str), v)) for c in cons]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, run_block: RunBlock) -> torch.Tensor:
        m = self.model
        # 0. center input if necessary
        if m.config.center_input_sample:
            x = 2 * x - 1.0
        # 1. time embedding (always computed): t (B,) -> emb (B, 4 * C0)
        timesteps = t
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=x.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(x.device)
        timesteps = timesteps * torch.ones(x.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = m.time_embedding(m.time_proj(timesteps).to(dtype=m.dtype))
        # 2. stem: (B, C, H, W) -> (B, C0, H, W)
        h = m.conv_in(x)
        stack: list[Optional[torch.Tensor]] = [h]
        k = 0
        # 3. down blocks: each returns its residuals, the last of which is the next hidden state
        for i, blk in enumerate(m.down_blocks):
            out = run_block(k, lambda blk=blk, h=h: tuple(blk(hidden_states=h, temb=emb)[1]))
            stack += list(out) if out is not None else [None] * self._n_res[i]
            h = stack[-1]
            k += 1
        # 4. mid block
        if self._mid:
            out = run_block(k, lambda h=h: (m.mid_block(h, emb),))
            h = out[0] if out is not None else None
            k += 1
        # 5. up blocks: pop their residuals from the stack
        for blk in m.up_blocks:
            n = len(blk.resnets)
            res, stack = tuple(stack[-n:]), stack[:-n]
            out = run_block(k, lambda blk=blk, h=h, res=res: (blk(h, res, emb),))
            h = out[0] if out is not None else None
            k += 1
        if h is None:  # pragma: no cover - the last block feeds OUTPUT, so it is always needed
            raise RuntimeError("UNet2DGraph: the last up block returned no output")
        # 6. head (always computed)
        h = m.conv_out(m.conv_act(m.conv_norm_out(h)))
        if m.config.time_embedding_type == "fourier":
            h = h / timesteps.reshape((h.shape[0], *([1] * len(h.shape[1:]))))
        return h


def block_graph(model: nn.Module) -> BlockGraph:
    """The :class:`BlockGraph` adapter for ``model``; fails loudly on unsupported model types."""
    if isinstance(model, BlockGraph):
        return model
    from diffusers import UNet2DModel

    if isinstance(model, UNet2DModel):
        return UNet2DGraph(model)
    raise NotImplementedError(f"DiP-GO: no block graph adapter for {type(model).__name__}")
