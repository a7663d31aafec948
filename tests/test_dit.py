"""The class-conditional DiT family: tiny DiTPipeline folders, the guided house denoiser, MACs, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffprune.config import ConfigError
from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import HUB_DIT, GuidedDiT, build_dit_pipeline, decode, load_dit, sample_latents, save_dit
from diffprune.models.dit import to_unit

STEPS = 3
LABELS = [3, 7]


@pytest.fixture(scope="module")
def pipe():
    return build_dit_pipeline(seed=0)


def _ours(pipe, labels, g, seed=0) -> torch.Tensor:
    den = GuidedDiT(pipe.transformer, labels, g)
    return to_unit(decode(pipe.vae, sample_latents(den, pipe.scheduler, steps=STEPS, seed=seed)))


def _theirs(pipe, labels, g, seed=0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(labels, guidance_scale=g, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                output_type="pt").images


@pytest.mark.parametrize("g", [1.0, 2.5])
def test_our_sampler_equals_dit_pipeline_bit_for_bit(pipe, g):
    # bit for bit: the same noise draw, the same transformer call on the same (doubled) batch, the
    # same guidance formula, the same elementwise DDIM step on B rows instead of 2 identical halves
    ours, theirs = _ours(pipe, LABELS, g), _theirs(pipe, LABELS, g)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs)


def test_labels_and_guidance_change_samples(pipe):
    base = _ours(pipe, LABELS, 2.5)
    assert not torch.equal(base, _ours(pipe, [3, 8], 2.5))  # the second image's label matters ...
    assert torch.equal(base[0], _ours(pipe, [3, 8], 2.5)[0])  # ... and only for the second image
    assert not torch.equal(base, _ours(pipe, LABELS, 1.0))


def test_guided_step_costs_twice_the_unguided(pipe):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 500, dtype=torch.long)
    macs = {}
    for g in (1.0, 3.0):
        with MacCounter(pipe.transformer) as c:
            GuidedDiT(pipe.transformer, LABELS, g)(x, t, 0)
        macs[g] = c.total
    assert macs[1.0] > 0 and macs[3.0] == 2 * macs[1.0]


def test_save_and_load_round_trip_reproduces_samples(pipe, tmp_path):
    folder = save_dit(pipe, tmp_path / "dit")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DiTPipeline"
    assert {p.name for p in folder.iterdir()} >= {"transformer", "vae", "scheduler", "model_index.json"}
    assert not list(folder.rglob("*.bin"))  # safetensors only
    loaded = load_dit(folder)
    assert torch.equal(_ours(loaded, LABELS, 2.5), _ours(pipe, LABELS, 2.5))
    assert torch.equal(_theirs(loaded, LABELS, 2.5), _ours(pipe, LABELS, 2.5))


def test_hub_layout_naming_transformer2dmodel_loads_as_dit(pipe, tmp_path):
    # facebook/DiT-XL-2-256 names its transformer Transformer2DModel (model_index and config)
    folder = save_dit(pipe, tmp_path / "hub-like")
    for f, key in ((folder / "model_index.json", "transformer"), (folder / "transformer" / "config.json", None)):
        doc = json.loads(f.read_text())
        if key:
            doc[key] = ["diffusers", "Transformer2DModel"]
        else:
            doc["_class_name"] = "Transformer2DModel"
        f.write_text(json.dumps(doc))
    loaded = load_dit(str(folder))
    assert type(loaded.transformer).__name__ == "DiTTransformer2DModel"
    assert torch.equal(_ours(loaded, LABELS, 2.5), _ours(pipe, LABELS, 2.5))


def test_hub_id_offline_fails_at_once_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="DiT-XL-2-256.*not reachable"):
        load_dit(HUB_DIT)
    with pytest.raises(ConfigError, match="no such folder"):
        load_dit("./no/such/dit")


def test_denoiser_rejects_bad_labels_training_mode_and_batch(pipe):
    with pytest.raises(ValueError, match=r"class_labels = \[1000\]"):
        GuidedDiT(pipe.transformer, [1000], 2.0)
    pipe.transformer.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            GuidedDiT(pipe.transformer, [1], 2.0)
    finally:
        pipe.transformer.eval()
    den = GuidedDiT(pipe.transformer, LABELS, 2.0)
    with pytest.raises(ValueError, match="batch of 3 latents, but 2 class labels"):
        den(torch.zeros(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), 0)
