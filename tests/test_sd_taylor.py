"""Diff-Pruning on the text-to-image UNet: channels, heads and GEGLU pairs, inside StableDiffusionPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from diffprune.config import TaylorConfig
from diffprune.models.checkpoint import load_model, save_model
from diffprune.models.dit import build_dit_pipeline, encode
from diffprune.models.sd import (SD_SCHEDULER, GuidedSD, build_sd_pipeline, decode, encode_prompts, sample_latents,
                                 to_unit)
from diffprune.pruning.sd_taylor import prune_sd_unet, sd_unet_macs

CFG = TaylorConfig(importance="diff-pruning", ratio=0.5, threshold=0.05, batch_size=4, max_timesteps=6, seed=0)
PROMPTS = ["a handwritten 3", "a handwritten 7"]


@pytest.fixture(scope="module")
def pipe():
    return build_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def data(pipe):
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [f"a handwritten {d}" for d in range(6)]
    return encode(pipe.vae, images), encode_prompts(pipe, captions, False)


@pytest.fixture(scope="module")
def train_sched():
    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})


@pytest.fixture(scope="module")
def pruned(pipe, data, train_sched):
    return prune_sd_unet(pipe.unet, train_sched, *data, CFG)


def _block(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0]


def test_channels_heads_macs_and_params_drop(pipe, data, pruned):
    from diffprune.pruning.surgery import attention_layers, head_dim

    student, report = pruned
    tokens = data[1].shape[1]
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"] == sd_unet_macs(pipe.unet, tokens)
    assert report["macs_after"] == sd_unet_macs(student, tokens)
    assert student.conv_in.out_channels < pipe.unet.conv_in.out_channels  # the residual stream is thinned
    assert student.conv_in.in_channels == 4 and student.conv_out.out_channels == 4  # latent width kept
    heads = report["heads"]
    assert heads and all(h == 1 for h in heads.values())  # 2 heads at ratio 0.5: one goes, whole
    teacher = attention_layers(pipe.unet)
    assert heads.keys() == teacher.keys() and all(a.heads == 2 for a in teacher.values())
    for name, attn in attention_layers(student).items():
        assert attn.heads * head_dim(teacher[name]) == attn.to_q.out_features  # head width kept (softmax scale right)
        if name.endswith("attn2"):
            assert attn.to_k.in_features == attn.to_v.in_features == 16  # the text width is the encoder's


def test_geglu_value_and_gate_rows_stay_paired(pipe, pruned):
    student, _ = pruned
    W, w = _block(pipe.unet).ff.net[0].proj.weight, _block(student).ff.net[0].proj.weight
    inner = W.shape[0] // 2

    def source(row):  # the teacher row a pruned row came from (its kept input columns are a subset)
        return next(i for i in range(W.shape[0]) if set(row.tolist()) <= set(W[i].tolist()))

    kept = [source(r) for r in w]
    values, gates = kept[: len(kept) // 2], kept[len(kept) // 2:]
    assert 0 < len(values) < inner and all(v < inner for v in values)
    assert [g - inner for g in gates] == values  # hidden channel i keeps its own gate
    assert _block(student).ff.net[2].in_features == len(values)


def test_pruned_unet_runs_inside_stable_diffusion_pipeline_as_our_sampler_does(pipe, pruned):
    student, _ = pruned
    small = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                    unet=student, scheduler=pipe.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    small.set_progress_bar_config(disable=True)
    theirs = small(PROMPTS, guidance_scale=7.5, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                   output_type="pt", height=16, width=16).images
    den = GuidedSD(student, encode_prompts(pipe, PROMPTS, True), 7.5)
    ours = to_unit(decode(pipe.vae, sample_latents(den, pipe.scheduler, steps=3)))
    assert torch.isfinite(theirs).all() and torch.equal(ours, theirs)


def test_teacher_text_encoder_and_vae_untouched(pipe, pruned):
    fresh = build_sd_pipeline(seed=0)  # the same seeded weights the fixture's teacher started from
    for name in ("unet", "vae", "text_encoder"):
        now, before = getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now), name
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_pruned_checkpoint_round_trips_bit_for_bit(pruned, data, tmp_path):
    student, _ = pruned
    save_model(student, tmp_path / "pruned")
    assert not list((tmp_path / "pruned").rglob("*.bin"))
    loaded = load_model(tmp_path / "pruned")
    assert type(loaded).__name__ == "UNet2DConditionModel"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, text = torch.tensor([5, 700]), data[1][:2]
    with torch.no_grad():
        assert torch.equal(loaded(x, t, encoder_hidden_states=text).sample,
                           student(x, t, encoder_hidden_states=text).sample)


def test_bad_shapes_are_refused(pipe, data, train_sched):
    with pytest.raises(ValueError, match=r"\(6, 4, 8, 8\) and text embeddings \(2, "):
        prune_sd_unet(pipe.unet, train_sched, data[0], data[1][:2], CFG)
    with pytest.raises(ValueError, match="width 5"):
        prune_sd_unet(pipe.unet, train_sched, data[0], torch.zeros(6, 3, 5), CFG)
    with pytest.raises(TypeError, match="got DiTTransformer2DModel"):
        prune_sd_unet(build_dit_pipeline().transformer, train_sched, *data, CFG)
