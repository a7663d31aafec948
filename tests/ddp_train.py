"""A tiny seeded ``train_denoiser`` run, shared by tests/test_accelerate.py's one-process reference
and its ``accelerate launch --num_processes 2`` run of this file: ``python ddp_train.py WORK OUT``
trains in ``WORK``; the main process saves the final weights to ``OUT``; every process that writes
a checkpoint leaves ``WORK/../saved-by-rank-R``, and each appends the size of every batch it trains
on to ``WORK/../batches-rank-R``. The global batch (7) splits unevenly: shards of 4 and 3."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SPEC = {"steps": 4, "batch_size": 7, "lr": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2, "seed": 3,
        "warmup_steps": 1}


def tiny_run(work: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Train the tests' tiny UNet (seed 0) on 32 seeded images; the final raw weights, by name."""
    from diffprune.config import DataConfig, TeacherConfig
    from diffprune.models.unet import build_scheduler, build_unet
    from diffprune.training import TrainSpec, train_denoiser
    from tests.conftest import TINY_TEACHER

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_TEACHER.items() if k in ("block_out_channels", "attention", "layers_per_block",
                                                           "norm_num_groups")}
    model = build_unet(TeacherConfig(**arch), DataConfig())
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model, _ = train_denoiser(model, images, build_scheduler(TeacherConfig()), TrainSpec(**SPEC), work,
                              progress=False, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(work: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from diffprune import training
    from diffprune.distributed import is_main_process, world

    save, loss, rank = training.TrainState.save, training.denoising_loss, world()[0]

    def recorded_save(self, step, **kw):
        (work.parent / f"saved-by-rank-{rank}").touch()
        return save(self, step, **kw)

    def recorded_loss(model, x0, *args, **kw):
        with open(work.parent / f"batches-rank-{rank}", "a") as f:
            f.write(f"{x0.shape[0]}\n")
        return loss(model, x0, *args, **kw)

    work.parent.mkdir(parents=True, exist_ok=True)
    training.TrainState.save, training.denoising_loss = recorded_save, recorded_loss
    weights = tiny_run(work)
    if is_main_process():
        save_file(weights, str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
