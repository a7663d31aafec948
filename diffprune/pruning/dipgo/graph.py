"""Block graphs: which blocks of a denoiser can be gated, who consumes their outputs, how to run them.

A :class:`BlockGraph` is the small adapter between DiP-GO and one model family. It names the
gateable blocks in execution order, lists for every block the blocks that consume its outputs
(:data:`OUTPUT` = the always-computed head of the network), and runs the model's own forward pass
with every block call handed to a ``run_block`` callback that decides whether the block is
computed, reused from its backup, mixed, or not needed at all.

The calls reach ``run_block`` through hooks on the block modules (diffusers' ``HookRegistry``, a
:class:`~diffusers.hooks.ModelHook` whose ``new_forward`` replaces the block's forward, as
diffusers' own FirstBlockCache and LayerSkip do). A plain torch forward hook cannot stand in: it
runs after the block has been computed, so a skipped block would still cost its MACs. The hooks
live only for one model call (:meth:`BlockGraph.hooks` is a context manager) and are always taken
off again, leaving nothing on the model; the model's ``forward`` itself is never copied, so the
graph keeps working when diffusers changes it.

:class:`UNet2DGraph` implements it for diffusers' ``UNet2DModel`` (every down block, the mid block,
every up block); :class:`~.sd.SDUNetGraph` extends it to Stable Diffusion's ``UNet2DConditionModel``
(the same cascade, text embeddings passed through), and :class:`~.dit.DiTGraph` does it for
``DiTTransformer2DModel`` (a chain of transformer blocks whose residual updates are reused).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

OUTPUT = "<output>"
"""Consumer name of the network's head (norm/conv_out), which is always computed."""

BlockOutputs = tuple[torch.Tensor, ...]
ComputeFn = Callable[[], BlockOutputs]
RunBlock = Callable[[int, ComputeFn], Optional[BlockOutputs]]
"""``run_block(index, compute) -> outputs | None``: called once per block call, in execution order.
``compute()`` evaluates the block on the inputs the model passed it; returning ``None`` says the
block is not needed at this step (its consumers never read it) and it is not computed."""

HOOK_NAME = "diffprune.dipgo.block"
"""Name of the block hooks in diffusers' hook registry."""


class BlockGraph(abc.ABC):
    """The gateable blocks of one model, their consumers, and a forward pass routed through them.

    Subclasses name the blocks and their consumers and translate between a block's native return
    value and its :data:`BlockOutputs` tuple; :meth:`forward` runs the model's own ``forward``
    with block hooks installed.
    """

    model: nn.Module

    @property
    @abc.abstractmethod
    def block_names(self) -> list[str]:
        """Names of the N gateable blocks, in execution order (producers before consumers)."""

    @property
    @abc.abstractmethod
    def block_modules(self) -> list[nn.Module]:
        """The N block modules, aligned with :attr:`block_names` (hooked; used to attribute MACs)."""

    @property
    @abc.abstractmethod
    def consumers(self) -> list[list[int | str]]:
        """For block k, the indices of the blocks reading its outputs, or :data:`OUTPUT`."""

    @abc.abstractmethod
    def pack_outputs(self, k: int, native: Any) -> BlockOutputs:
        """Block k's native return value as the tuple of tensors its backup holds."""

    @abc.abstractmethod
    def native_outputs(self, k: int, outputs: Optional[BlockOutputs]) -> Any:
        """Block k's native return value from ``outputs``; from ``None`` (block not needed) a
        placeholder of the same structure, which its consumers never read."""

    @abc.abstractmethod
    def call_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's own forward: ``x: (B, C, H, W)``, ``t: (B,)`` -> output ``(B, C, H, W)``."""

    @contextlib.contextmanager
    def hooks(self, run_block: RunBlock) -> Iterator["BlockGraph"]:
        """Route every block call to ``run_block`` while active; all hooks are removed on exit."""
        installed: list[_Installed] = []
        try:
            for k, module in enumerate(self.block_modules):
                installed.append(_Installed.register(module, self.block_hook(k, run_block)))
            yield self
        finally:
            for hook in reversed(installed):
                hook.remove()

    condition: Optional[torch.Tensor] = None
    """The conditioning of the calls inside :meth:`conditioned` (labels, text embeddings); ``None`` outside."""

    @contextlib.contextmanager
    def conditioned(self, condition: torch.Tensor) -> Iterator["BlockGraph"]:
        """Model calls inside use ``condition`` (per row of the call: class labels ``(B',)`` or text
        embeddings ``(B', L, D)``); each family's :meth:`call_model` passes it on."""
        self.condition = condition
        try:
            yield self
        finally:
            self.condition = None

    def block_hook(self, k: int, run_block: RunBlock) -> ModelHook:
        """The hook that routes block k's calls to ``run_block`` (a family whose reuse is not a plain
        output backup, such as DiT's residual updates, returns its own)."""
        return _BlockHook(self, k, run_block)

    def forward(self, x: torch.Tensor, t: torch.Tensor, run_block: RunBlock) -> torch.Tensor:
        """The model's output for ``x: (B, C, H, W)``, ``t: (B,)``, with every block call routed
        through ``run_block``. With ``run_block = lambda k, f: f()`` it equals ``model(x, t)``."""
        with self.hooks(run_block):
            return self.call_model(x, t)


class _BlockHook(ModelHook):
    """Replaces block k's forward by ``run_block(k, compute)`` (diffusers' ``new_forward``)."""

    def __init__(self, graph: BlockGraph, k: int, run_block: RunBlock) -> None:
        super().__init__()
        self.graph, self.k, self.run_block = graph, k, run_block

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        def compute() -> BlockOutputs:
            return self.graph.pack_outputs(self.k, self.fn_ref.original_forward(*args, **kwargs))

        return self.graph.native_outputs(self.k, self.run_block(self.k, compute))


class _Installed:
    """One block hook in a module's diffusers ``HookRegistry``, and how to leave no trace of it.

    Removing a hook from a registry leaves the registry (``module._diffusers_hook``) and the
    restored bound ``forward`` as instance attributes; both are deleted again when this hook put
    them there and no other hook is left.
    """

    def __init__(self, module: nn.Module, had_registry: bool, had_forward: bool) -> None:
        self.module, self.had_registry, self.had_forward = module, had_registry, had_forward

    @classmethod
    def register(cls, module: nn.Module, hook: ModelHook) -> "_Installed":
        """Register ``hook`` on ``module`` under :data:`HOOK_NAME`."""
        installed = cls(module, hasattr(module, "_diffusers_hook"), "forward" in vars(module))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
        return installed

    def remove(self) -> None:
        """Take the hook off; the module is as it was before :meth:`register`."""
        registry = self.module._diffusers_hook
        registry.remove_hook(HOOK_NAME, recurse=False)
        if registry.hooks:
            return
        if not self.had_forward:
            vars(self.module).pop("forward", None)
        if not self.had_registry:
            del self.module._diffusers_hook


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

    Down block i's outputs are its residual tuple ``(r_1, ..., r_m)``, whose last entry is also the
    hidden state passed on; up block j reads the previous hidden state and pops its residuals from
    the stack (``UNet2DModel.forward`` does both; :meth:`consumers` simulates it). A class-conditional
    UNet (``num_class_embeds``) takes its labels from :meth:`conditioned` (class 0 outside it: the
    same cost). Skip-connection blocks raise ``NotImplementedError`` at construction.
    """

    def __init__(self, model: nn.Module) -> None:
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

    # -- block outputs -----------------------------------------------------------------------
    def _is_down(self, k: int) -> bool:
        return k < len(self._n_res)

    def pack_outputs(self, k: int, native: Any) -> BlockOutputs:
        """A down block's ``(hidden, residuals)`` -> ``residuals``; mid/up ``hidden`` -> ``(hidden,)``."""
        if not self._is_down(k):
            return (native,)
        hidden, res = native
        if hidden is not res[-1]:
            raise NotImplementedError(
                f"UNet2DGraph: block {self._names[k]!r} passes on a hidden state that is not its last residual"
            )
        return tuple(res)

    def native_outputs(self, k: int, outputs: Optional[BlockOutputs]) -> Any:
        """The inverse of :meth:`pack_outputs`; ``None`` -> the same structure filled with ``None``.

        A down block's hidden state is its last residual. The placeholder costs nothing:
        ``UNet2DModel.forward`` only hands block outputs on to other blocks, and the consumers of
        a block that is not needed reuse their backups without reading their inputs.
        """
        if self._is_down(k):
            res = outputs if outputs is not None else (None,) * self._n_res[k]
            return res[-1], res
        return outputs[0] if outputs is not None else None

    def call_model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``UNet2DModel.forward(x, t)``'s sample ``(B, C, H, W)`` (with the class labels of :meth:`conditioned`)."""
        if getattr(self.model, "class_embedding", None) is None:
            return self.model(x, t, return_dict=False)[0]
        y = self.condition if self.condition is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.model(x, t, class_labels=y, return_dict=False)[0]


def block_graph(model: nn.Module) -> BlockGraph:
    """The :class:`BlockGraph` adapter for ``model``; fails loudly on unsupported model types."""
    if isinstance(model, BlockGraph):
        return model
    if hasattr(model, "experts") and hasattr(model, "boundaries"):  # a mixture of timestep experts
        from .routed import RoutedGraph

        return RoutedGraph(model)
    from diffusers import UNet2DModel

    if isinstance(model, UNet2DModel):
        return UNet2DGraph(model)
    from diffusers import UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        from .sd import SDUNetGraph

        return SDUNetGraph(model)
    from diffusers import DiTTransformer2DModel

    if isinstance(model, DiTTransformer2DModel):
        from .dit import DiTGraph

        return DiTGraph(model)
    raise NotImplementedError(f"DiP-GO: no block graph adapter for {type(model).__name__}")
