"""Diff-Pruning on the class-conditional DiT: heads whole, MLP hidden width, inside DiTPipeline (tiny, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline

from diffprune.config import ConfigError, TaylorConfig
from diffprune.models.checkpoint import load_model, save_model
from diffprune.models.dit import DIT_SCHEDULER, GuidedDiT, build_dit_pipeline, decode, encode, sample_latents, to_unit
from diffprune.pruning.dit_taylor import dit_macs, prune_dit

CFG = TaylorConfig(importance="diff-pruning", ratio=0.5, threshold=0.05, batch_size=4, max_timesteps=6, seed=0)
LABELS = [3, 7]


@pytest.fixture(scope="module")
def pipe():
    return build_dit_pipeline(seed=0)


@pytest.fixture(scope="module")
def data(pipe):
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return encode(pipe.vae, images), torch.tensor([0, 1, 2, 3, 4, 5])


@pytest.fixture(scope="module")
def train_sched():
    return DDPMScheduler(**{k: v for k, v in DIT_SCHEDULER.items() if k != "set_alpha_to_one"})


@pytest.fixture(scope="module")
def pruned(pipe, data, train_sched):
    return prune_dit(pipe.transformer, train_sched, *data, CFG)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_heads_and_mlp_width_drop_with_macs_and_params(pipe, pruned):
    student, report = pruned
    assert report["heads"] == [1, 1, 1] and report["mlp_hidden"] == [32, 32, 32]
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"] == dit_macs(pipe.transformer)
    assert report["macs_after"] == dit_macs(student)
    assert 1 <= report["timesteps_used"] <= CFG.max_timesteps
    teacher0 = pipe.transformer.transformer_blocks[0].attn1
    assert torch.equal(student.transformer_blocks[0].attn1.to_q.weight, teacher0.to_q.weight[8:])  # head 0 scored lowest
    for b in student.transformer_blocks:  # diffusers' stored sizes agree with the cut weights
        assert b.attn1.heads * 8 == b.attn1.to_q.out_features == b.attn1.inner_dim


def test_pruned_model_runs_inside_dit_pipeline_as_our_sampler_does(pipe, pruned):
    student, _ = pruned
    small = DiTPipeline(transformer=student, vae=pipe.vae, scheduler=pipe.scheduler)
    small.set_progress_bar_config(disable=True)
    theirs = small(LABELS, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                   output_type="pt").images
    ours = to_unit(decode(pipe.vae, sample_latents(GuidedDiT(student, LABELS, 2.0), pipe.scheduler, steps=3)))
    assert torch.isfinite(theirs).all() and torch.equal(ours, theirs)


def test_teacher_and_vae_untouched(pipe, data, train_sched):
    before_t, before_v = _state(pipe.transformer), _state(pipe.vae)
    prune_dit(pipe.transformer, train_sched, *data, CFG)
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before_t.items())
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in before_v.items())
    assert all(p.grad is None for p in pipe.transformer.parameters())


def test_a_dead_head_is_the_one_removed(pipe, data, train_sched):
    """Head 1 of block 0 cannot reach the output (zero output columns): its Taylor score is 0, it goes
    (left alone, the scores remove head 0 of that block)."""
    teacher = build_dit_pipeline(seed=0).transformer
    attn = teacher.transformer_blocks[0].attn1
    with torch.no_grad():
        attn.to_out[0].weight[:, 8:] = 0
    student, _ = prune_dit(teacher, train_sched, *data, CFG)
    kept = student.transformer_blocks[0].attn1
    assert torch.equal(kept.to_q.weight, attn.to_q.weight[:8])
    assert torch.equal(kept.to_out[0].weight, attn.to_out[0].weight[:, :8])


def test_pruned_dit_checkpoint_round_trips_bit_for_bit(pruned, tmp_path):
    student, _ = pruned
    save_model(student, tmp_path / "pruned")
    loaded = load_model(tmp_path / "pruned")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([5, 700]), torch.tensor([3, 1000])
    with torch.no_grad():
        assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, student(x, timestep=t, class_labels=y).sample)
    assert [b.attn1.heads for b in loaded.transformer_blocks] == [1, 1, 1]


def test_bad_importance_and_shapes_are_refused(pipe, data, train_sched):
    with pytest.raises(ConfigError, match="'random'"):
        prune_dit(pipe.transformer, train_sched, *data, dataclasses.replace(CFG, importance="random"))
    with pytest.raises(ValueError, match=r"\(6, 4, 8, 8\) and 2 class labels"):
        prune_dit(pipe.transformer, train_sched, data[0], data[1][:2], CFG)
