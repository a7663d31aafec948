"""The one training loop on conditional data: a tiny class-conditional DiT on latents with labels,
reproducible, resumed exactly, and really conditioned."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffprune.models.dit import build_dit_pipeline
from diffprune.training import TrainSpec, train_denoiser

SPEC = TrainSpec(steps=4, batch_size=4, lr=1e-3, ema_decay=0.9, checkpoint_every=2, seed=0)
LATENTS = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])


def dit_call(model, x, t, y):
    return model(x, timestep=t, class_labels=y).sample[:, : x.shape[1]]  # eps: learned sigma left out


def _train(tmp_path, name, labels=LABELS, **kw):
    model = build_dit_pipeline(seed=0).transformer
    sched = DDPMScheduler(num_train_timesteps=1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # DiT's label dropout draws from the global generator (saved with the state)
        trained, _ = train_denoiser(model, LATENTS, sched, SPEC, tmp_path / name, progress=False,
                                    conditions=labels, call=dit_call, **kw)
    return {k: v.detach().clone() for k, v in trained.state_dict().items()}


def _equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_conditional_training_is_reproducible_resumes_exactly_and_uses_the_labels(tmp_path):
    full = _train(tmp_path, "full")
    assert _equal(full, _train(tmp_path, "again"))
    _train(tmp_path, "split", stop_after=2)
    assert _equal(full, _train(tmp_path, "split"))  # resumed from step 2
    assert not _equal(full, _train(tmp_path, "other-labels", labels=LABELS.flip(0)))
    fresh = build_dit_pipeline(seed=0).transformer.state_dict()
    assert not _equal(full, fresh)


def test_conditions_and_call_come_together_one_per_image(tmp_path):
    model = build_dit_pipeline(seed=0).transformer
    sched = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match=r"conditions \(3\) for 8 images"):
        train_denoiser(model, LATENTS, sched, SPEC, tmp_path / "x", conditions=LABELS[:3], call=dit_call)
    with pytest.raises(ValueError, match="call \\(False\\)"):
        train_denoiser(model, LATENTS, sched, SPEC, tmp_path / "y", conditions=LABELS)
