"""The real architectures of the Hub presets, built on the meta device (no memory, no weights): their MACs
against the papers' tables, and DiP-GO's nine SD blocks."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel

from diffprune.metrics.cost import MacCounter
from diffprune.models.dit import DIT_XL_2_256
from diffprune.models.sd import SD15_UNET


def _sd15_call(count: str) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        x, t, text = torch.zeros(1, 4, 64, 64), torch.ones(1, dtype=torch.long), torch.zeros(1, 77, 768)
    with MacCounter(unet, count=count) as c, torch.no_grad():
        unet(x, t, encoder_hidden_states=text)
    return c.total


def test_sd15_unet_costs_the_dipgo_papers_16_94t_over_50_steps():
    # DiP-GO's table: SD-1.5, 50 PLMS steps, 16.94T MACs (one latent, the UNet's layers)
    layers = _sd15_call("layers")
    assert 50 * layers == pytest.approx(16.94e12, rel=0.005)
    everything = _sd15_call("all")  # the attention products on top: ~63 G per call at 64 x 64
    assert 55e9 < everything - layers < 70e9


def test_dit_xl_2_costs_the_dit_papers_118_6_gflops():
    with torch.device("meta"):
        dit = DiTTransformer2DModel(**DIT_XL_2_256)
        x, t, y = torch.zeros(1, 4, 32, 32), torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with MacCounter(dit) as c, torch.no_grad():
        dit(x, timestep=t, class_labels=y)
    assert c.total == pytest.approx(118.6e9, rel=0.005)  # DiT's "Gflops" are multiply-accumulates


def test_unknown_count_is_refused():
    with pytest.raises(ValueError, match="count = 'flops'"):
        MacCounter(torch.nn.Linear(2, 2), count="flops")
