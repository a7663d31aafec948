"""The SuperNet: a block graph whose blocks can reuse their output from an earlier sampling step.

Every block k keeps a *backup*: its outputs (all of them - a down block's residuals too) from the
last step at which it was needed. A gate per block and step chooses between computing the block and
reusing the backup. :class:`GatedRunner` holds the backups of one trajectory and runs one step
either with hard gates (inference: skipped and unneeded blocks are not executed) or with
straight-through soft gates (training: ``out = g * computed + (1 - g) * backup``).

Each step runs the model's own forward with block hooks that are installed for that one call and
removed after it (see :mod:`.graph`), so nothing stays on the model: :meth:`GatedRunner.reset` drops
the backups. :meth:`GatedRunner.denoiser` makes the runner a denoiser of
:func:`diffprune.sampling.trajectory`, the one trajectory loop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .graph import BlockGraph, BlockOutputs, ComputeFn, RunBlock, block_graph, needed_blocks
from .schedule import Schedule, check_block_names


class GatedRunner:
    """Runs ``graph`` one sampling step at a time, with per-block backups.

    Args:
        graph: the block graph of the (frozen) model.
    """

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self._consumers = graph.consumers
        self.backup: list[Optional[BlockOutputs]] = [None] * len(graph.block_names)

    def reset(self) -> None:
        """Forget every backup (call before each trajectory)."""
        self.backup = [None] * len(self.backup)

    def _reuse(self, k: int) -> BlockOutputs:
        out = self.backup[k]
        if out is None:
            raise RuntimeError(
                f"block {self.graph.block_names[k]!r} reuses its backup but was never computed: "
                "the first step of a trajectory must compute every block"
            )
        return out

    def step_hard(self, x: torch.Tensor, t: torch.Tensor, keep: Sequence[bool]) -> torch.Tensor:
        """One model call with hard gates ``keep: [N]``; only needed, kept blocks execute.

        ``x: (B, C, H, W)``, ``t: (B,)`` -> model output ``(B, C, H, W)``.
        """
        return self.graph.forward(x, t, self.hard_blocks(keep))

    def hard_blocks(self, keep: Sequence[bool]) -> RunBlock:
        """The block router of one hard-gated call: a needed, kept block computes (and becomes the
        backup), a needed skipped one hands on its backup, an unneeded one does not run."""
        needed = needed_blocks(self._consumers, keep)

        def run_block(k: int, compute: ComputeFn) -> Optional[BlockOutputs]:
            if not needed[k]:
                return None
            if keep[k]:
                self.backup[k] = compute()
                return self.backup[k]
            return self._reuse(k)

        return run_block

    def step_soft(self, x: torch.Tensor, t: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """One SuperNet call for training, differentiable in ``gates: (N,)`` (values 0/1 forward).

        Every block is evaluated and mixed as ``g * computed + (1 - g) * backup``, so a skipped gate
        still gets its straight-through gradient ``<dL/d out, computed - backup>``. Blocks whose
        gate is off or that are not needed carry no gradient through ``computed`` (it is scaled by
        a forward value of 0), so they run under ``no_grad``: backward costs only the kept path.
        A backup is refreshed only where the block is needed under the hard gates, so the forward
        values equal :meth:`step_hard`'s exactly.
        """
        hard = [bool(v) for v in (gates.detach() > 0.5).tolist()]
        needed = needed_blocks(self._consumers, hard)

        def run_block(k: int, compute: ComputeFn) -> BlockOutputs:
            prev = self.backup[k]
            if prev is None:  # first step of the trajectory: gates are forced on
                if not hard[k]:
                    self._reuse(k)  # raises: nothing to reuse yet
                self.backup[k] = compute()
                return self.backup[k]
            if hard[k] and needed[k]:
                out = compute()
            else:
                with torch.no_grad():
                    out = compute()
            g = gates[k]
            out = tuple(g * o + (1 - g) * b for o, b in zip(out, prev))
            if needed[k]:
                self.backup[k] = out
            return out

        return self.graph.forward(x, t, run_block)

    def denoiser(self, gates: torch.Tensor | Sequence[Sequence[bool]], *, soft: bool = False) -> "GatedDenoiser":
        """The runner as a trajectory denoiser with per-step gates ``[T][N]`` (hard) or ``(T, N)`` (soft)."""
        return GatedDenoiser(self, gates, soft=soft)


class GatedDenoiser:
    """One trajectory of a :class:`GatedRunner`: step i runs with ``gates[i]``.

    ``start`` (called by :func:`diffprune.sampling.trajectory`) drops the runner's backups. Soft
    gates ``(T, N)`` go through :meth:`GatedRunner.step_soft` (differentiable), hard gates ``[T][N]``
    through :meth:`GatedRunner.step_hard`.
    """

    def __init__(self, runner: GatedRunner, gates: torch.Tensor | Sequence[Sequence[bool]], *, soft: bool) -> None:
        self.runner, self.gates, self.soft = runner, gates, soft

    def start(self, num_steps: int) -> None:
        if num_steps != len(self.gates):
            raise ValueError(f"the trajectory has {num_steps} steps but the gates have {len(self.gates)} rows")
        self.runner.reset()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """``x: (B, C, H, W)``, ``t: (B,)`` -> model output ``(B, C, H, W)`` under ``gates[step]``."""
        if self.soft:
            return self.runner.step_soft(x, t, self.gates[step])
        return self.runner.step_hard(x, t, self.gates[step])


class SkipScheduleDenoiser:
    """A sampling denoiser that runs a :class:`Schedule` with real savings.

    At step t, block k executes only if ``schedule.keep[t][k]`` and some consumer needs it; a
    skipped block hands on its cached outputs. Pass it to :func:`diffprune.sampling.sample`.
    The block hooks live for one model call, so nothing is left on the model; :meth:`reset` drops
    the cache.

    Args:
        model: a model with a block-graph adapter (``UNet2DModel``) or a :class:`BlockGraph`.
        schedule: gates ``[T][N]`` whose block names match the model's.
    """

    def __init__(self, model: nn.Module | BlockGraph, schedule: Schedule) -> None:
        self.graph = block_graph(model)
        check_block_names(self.graph, schedule)
        self.schedule = schedule
        self.runner = GatedRunner(self.graph)

    def start(self, num_steps: int) -> None:
        """Called by the sampler before each trajectory: check the length, drop the cache."""
        if num_steps != self.schedule.num_steps:
            raise ValueError(
                f"the sampler runs {num_steps} steps but the schedule has {self.schedule.num_steps}; "
                "sample with steps equal to the schedule's"
            )
        self.reset()

    def reset(self) -> None:
        self.runner.reset()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """``x: (B, C, H, W)``, ``t: (B,)``, ``step`` in [0, T) -> model output ``(B, C, H, W)``."""
        if not 0 <= step < self.schedule.num_steps:
            raise IndexError(f"step = {step}: the schedule has {self.schedule.num_steps} steps")
        if step == 0:
            self.reset()
        return self.runner.step_hard(x, t, self.schedule.keep[step])


class ScheduledCall:
    """The model call of a guided conditional denoiser (``GuidedDiT``, ``GuidedSD``, ``GuidedUNet``)
    replaced by a skip :class:`Schedule`'s gated step over ``graph``, each row's condition (labels,
    text) passed through the cache. A subclass passes ``call=self._gated`` to its guided base and
    then calls :meth:`_schedule_over`."""

    def _schedule_over(self, graph: BlockGraph, schedule: Schedule) -> None:
        self.graph = graph
        self.skip = SkipScheduleDenoiser(graph, schedule)  # the schedule check, length check and cache
        self.schedule = schedule

    def start(self, num_steps: int) -> None:
        """Called by the trajectory loop: check the length, drop the backups."""
        self.skip.start(num_steps)

    @torch.no_grad()
    def _gated(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, step: int) -> torch.Tensor:
        with self.graph.conditioned(cond):
            return self.skip.runner.step_hard(x, t, self.schedule.keep[step])
