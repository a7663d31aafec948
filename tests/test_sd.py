"""The text-to-image latent UNet family: tiny StableDiffusionPipeline folders, the guided house denoiser,
MACs, loading."""

from __future__ import annotations

import json

import pytest
import torch

from diffprune.config import ConfigError
from diffprune.metrics.cost import MacCounter
from diffprune.models.sd import (HUB_SD, GuidedSD, build_sd_pipeline, decode, encode_prompts, load_sd,
                                 sample_latents, save_sd, to_unit)

STEPS = 3
PROMPTS = ["a handwritten 3", "a handwritten 7"]


@pytest.fixture(scope="module")
def pipe():
    return build_sd_pipeline(seed=0)


def _ours(pipe, prompts, g, seed=0) -> torch.Tensor:
    den = GuidedSD(pipe.unet, encode_prompts(pipe, prompts, g > 1), g)
    return to_unit(decode(pipe.vae, sample_latents(den, pipe.scheduler, steps=STEPS, seed=seed)))


def _theirs(pipe, prompts, g, seed=0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, guidance_scale=g, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                output_type="pt", height=16, width=16).images


@pytest.mark.parametrize("g", [1.0, 7.5])
def test_our_sampler_equals_the_stable_diffusion_pipeline_bit_for_bit(pipe, g):
    ours, theirs = _ours(pipe, PROMPTS, g), _theirs(pipe, PROMPTS, g)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs)


def test_prompts_and_guidance_change_samples(pipe):
    base = _ours(pipe, PROMPTS, 7.5)
    other = _ours(pipe, ["a handwritten 3", "a handwritten 8"], 7.5)
    assert not torch.equal(base, other)  # the second image's prompt matters ...
    assert torch.equal(base[0], other[0])  # ... and only for the second image
    assert not torch.equal(base, _ours(pipe, PROMPTS, 1.0))


def test_guided_step_costs_twice_the_unguided_and_the_text_encoder_is_not_counted(pipe):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 500, dtype=torch.long)
    macs = {}
    for g in (1.0, 7.5):
        den = GuidedSD(pipe.unet, encode_prompts(pipe, PROMPTS, g > 1), g)
        with MacCounter(pipe.unet) as c:
            den(x, t, 0)
        macs[g] = c.total
    assert macs[1.0] > 0 and macs[7.5] == 2 * macs[1.0]


def test_round_trip_through_from_pretrained_reproduces_samples(pipe, tmp_path):
    save_sd(pipe, tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"][1] == "UNet2DConditionModel"
    assert not list((tmp_path / "sd").rglob("*.bin")) and list((tmp_path / "sd").rglob("*.safetensors"))
    back = load_sd(tmp_path / "sd")
    assert torch.equal(_ours(back, PROMPTS, 7.5), _ours(pipe, PROMPTS, 7.5))


def test_bad_inputs_are_refused_with_the_bad_value(pipe, tmp_path):
    with pytest.raises(ConfigError, match="sd.pretrained"):
        load_sd(tmp_path / "missing")
    (tmp_path / "not-sd").mkdir()
    with pytest.raises(ConfigError, match="cannot load a StableDiffusionPipeline"):
        load_sd(tmp_path / "not-sd")
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(pipe, [], True)
    text = encode_prompts(pipe, PROMPTS, True)
    with pytest.raises(ValueError, match="2 prompts"):
        GuidedSD(pipe.unet, text, 7.5)(torch.randn(3, 4, 8, 8), torch.full((3,), 10), 0)
    with pytest.raises(ValueError, match="width"):
        GuidedSD(pipe.unet, torch.randn(2, 5, 7), 1.0)


def test_pickled_weights_are_refused_not_loaded(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert list((tmp_path / "pickled").rglob("*.bin"))
    with pytest.raises(ConfigError, match="cannot load a StableDiffusionPipeline"):
        load_sd(tmp_path / "pickled")


def test_hub_id_offline_fails_at_once_naming_it(monkeypatch):
    assert HUB_SD == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="stable-diffusion-v1-5.*not reachable"):
        load_sd(HUB_SD)
    with pytest.raises(ConfigError, match="no such folder"):
        load_sd("./no/such/sd")
