"""The one trajectory loop: ``trajectory`` is what ``sample`` runs per batch, with or without gradients."""

from __future__ import annotations

import pytest
import torch

from diffprune.config import DataConfig, TeacherConfig
from diffprune.models.unet import build_scheduler, build_unet, sampling_scheduler
from diffprune.sampling import ModelDenoiser, initial_noise, sample, trajectory

SHAPE = (1, 8, 8)
STEPS = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = TeacherConfig(block_out_channels=[8, 16], attention=[False, False], norm_num_groups=4)
    return build_unet(cfg, DataConfig(image_size=8)).eval()


@pytest.fixture(scope="module")
def sched_config():
    return dict(build_scheduler(TeacherConfig()).config)


class _Counting:
    """A denoiser that records ``start`` calls and the step indices it is called with."""

    def __init__(self, model) -> None:
        self.inner, self.started, self.steps = ModelDenoiser(model), [], []

    def start(self, num_steps: int) -> None:
        self.started.append(num_steps)

    def __call__(self, x, t, step):
        self.steps.append(step)
        return self.inner(x, t, step)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm"])
def test_trajectory_equals_sample_for_the_same_noise(model, sched_config, sampler):
    sched = sampling_scheduler(sched_config, sampler)
    seed = 3
    drawn = sample(ModelDenoiser(model), sched, num_images=2, sample_shape=SHAPE, steps=STEPS, seed=seed)
    gen = torch.Generator().manual_seed(seed * 100_003)  # the generator sample() gives its first batch
    x0 = trajectory(ModelDenoiser(model), sched, initial_noise(2, SHAPE, seed), STEPS, generator=gen)
    assert torch.equal(x0, drawn)
    assert x0.shape == (2, *SHAPE) and not x0.requires_grad and x0.abs().max() <= 1.0


def test_trajectory_starts_fresh_and_leaves_the_scheduler_unchanged(model, sched_config):
    sched = sampling_scheduler(sched_config, "dpm")  # a stateful multistep solver
    before = sched.timesteps.clone()
    noise = initial_noise(2, SHAPE, 0)
    den = _Counting(model)
    first = trajectory(den, sched, noise, STEPS)
    assert torch.equal(trajectory(den, sched, noise, STEPS), first)
    assert den.started == [STEPS, STEPS] and den.steps == [*range(STEPS)] * 2
    assert torch.equal(sched.timesteps, before) and sched.num_inference_steps is None and sched.step_index is None
    with pytest.raises(ValueError, match="steps = 0"):
        trajectory(den, sched, noise, 0)


def test_gradients_flow_through_the_trajectory_with_grad(model, sched_config):
    sched = sampling_scheduler(sched_config, "ddim")
    x_T = initial_noise(2, SHAPE, 1).requires_grad_(True)
    with torch.no_grad():  # grad=True records even inside a no_grad caller
        x0 = trajectory(ModelDenoiser(model), sched, x_T, STEPS, grad=True)
    assert x0.requires_grad
    x0.square().sum().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    assert not trajectory(ModelDenoiser(model), sched, x_T, STEPS).requires_grad  # grad=False: no graph
