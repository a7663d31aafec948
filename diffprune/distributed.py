"""Training on one device or on several processes, through Hugging Face ``accelerate``.

``accelerate launch --multi_gpu --num_processes N -m diffprune.cli stage teacher`` starts N copies
of a training stage. Every copy draws the same global batch from the run's seeded generator and
trains on its own shard of it (its rank's slice); DDP averages the gradients, so the result does not
depend on N beyond the order of float reductions. Only the main process (rank 0) writes checkpoints
and stage outputs; the others return once training is done. A plain ``diffprune stage`` is one
process: the same code, with no process group.

``accelerate`` is imported inside the functions that need it (importing it costs ~1 s per command).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

MIXED_PRECISION = ("no", "bf16", "fp16")  # project.mixed_precision: autocast dtype of the forward
# the stages that train through diffprune.training and so may run under `accelerate launch`
MULTI_PROCESS_STAGES = ("teacher", "finetune", "experts", "prune-experts")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: set by ``accelerate launch`` / torchrun, else ``(0, 1)``."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process that writes checkpoints and outputs (rank 0, or the only process)."""
    return world()[0] == 0


def make_accelerator(device: torch.device | str, mixed_precision: str = "no", *,
                     find_unused_parameters: bool = False) -> "Accelerator":
    """An ``Accelerator`` for a run on ``device`` (``cpu=True`` on a CPU) with ``mixed_precision``.

    Devices are placed by the caller (:func:`run_device`), so a one-process run keeps the exact
    device it asked for (``cuda:1``). A one-process run resets accelerate's process-wide state first:
    a process may train several runs with different settings (the tests do). Under several
    processes the settings must agree between runs (accelerate refuses a change).

    Args:
        find_unused_parameters: passed to DDP; needed when some steps leave parameters unused
            (elastic experts run a random sub-network every step).
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision = {mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if world()[1] == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision=mixed_precision,
                       device_placement=False, kwargs_handlers=[ddp])


def run_device(accelerator: "Accelerator", device: torch.device | str) -> torch.device:
    """Where this process trains: ``device`` in a one-process run, else the accelerator's (``cuda:LOCAL_RANK``)."""
    return accelerator.device if accelerator.num_processes > 1 else torch.device(device)


def shard(batch_size: int, rank: int, size: int) -> slice:
    """The contiguous part of a global batch of ``batch_size`` items that process ``rank`` of ``size`` trains on."""
    if batch_size < size:
        raise ValueError(f"batch_size = {batch_size!r}: must be >= the number of processes ({size})")
    bounds = torch.linspace(0, batch_size, size + 1).round().long().tolist()
    return slice(bounds[rank], bounds[rank + 1])


def local_batch(accelerator: "Accelerator", *batch: torch.Tensor) -> tuple:
    """This process's shard of each global-batch tensor, then the loss weight that makes DDP's average
    of the shards' gradients the gradient of the global batch's mean loss (1 in a one-process run)."""
    n, size = batch[0].shape[0], accelerator.num_processes
    if size == 1:
        return (*batch, 1)
    part = shard(n, accelerator.process_index, size)
    return (*(b[part] for b in batch), (part.stop - part.start) * size / n)


def unwrap(accelerator: "Accelerator", model: nn.Module) -> nn.Module:
    """The plain module under a prepared ``model``, with its own ``forward`` back (mixed precision
    patches an autocast wrapper onto the instance)."""
    raw = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    raw.__dict__.pop("forward", None)
    raw.__dict__.pop("_original_forward", None)
    return raw


def follower_result(stage: str) -> dict:
    """What a training stage returns in a process other than the main one: it trained its shards,
    and the main process writes the outputs."""
    rank, size = world()
    return {"stage": stage, "rank": rank, "world_size": size, "outputs": "written by the main process (rank 0)"}
