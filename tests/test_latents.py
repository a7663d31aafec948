"""Latent datasets: encoded once by the VAE, read back from the cache, keyed by VAE and images."""

from __future__ import annotations

import pytest
import torch

from diffprune.data import latents as lat
from diffprune.models.dit import build_dit_pipeline, encode

IMAGES = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def vae():
    return build_dit_pipeline(seed=0).vae


def test_cached_latents_equal_the_encoding_and_are_read_back(vae, tmp_path, monkeypatch):
    first = lat.cached_latents(vae, IMAGES, tmp_path, batch_size=2)
    assert torch.equal(first, lat.encode_images(vae, IMAGES, batch_size=2)) and first.shape == (5, 4, 8, 8)
    assert torch.allclose(first, encode(vae, IMAGES), atol=1e-5)  # one batch of 5 rounds differently
    [f] = list(tmp_path.glob("latents-*.safetensors"))
    monkeypatch.setattr(lat, "encode_images", lambda *a, **k: pytest.fail("encoded again"))
    assert torch.equal(lat.cached_latents(vae, IMAGES, tmp_path), first)  # from the file
    monkeypatch.undo()
    other = build_dit_pipeline(seed=1).vae
    lat.cached_latents(other, IMAGES, tmp_path)
    lat.cached_latents(vae, IMAGES[:4], tmp_path)
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 3  # another VAE, other images: own files
    f.write_bytes(b"damaged")
    assert torch.equal(lat.cached_latents(vae, IMAGES, tmp_path, batch_size=2), first)  # encoded again, rewritten
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_grayscale_is_repeated_to_the_vae_channels_and_bad_shapes_refused(vae):
    gray = IMAGES[:, :1]
    assert torch.allclose(lat.encode_images(vae, gray), encode(vae, gray.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="2 channels"):
        lat.encode_images(vae, IMAGES[:, :2])
    with pytest.raises(ValueError, match="non-empty"):
        lat.encode_images(vae, IMAGES[:0])
