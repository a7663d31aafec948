"""Diff-Pruning's size table on the real CIFAR-10 DDPM architecture (Fang et al., NeurIPS 2023, Table 1).

google/ddpm-cifar10-32's UNet is built from its published config.json (no download; random weights:
what is removed, and so the counts, depends on the ratio only). Ratio 0.3 must give the paper's
35.7M -> 19.8M parameters and 6.1G -> 3.4G MACs, each within 5%.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffprune.config import TaylorConfig
from diffprune.metrics.cost import num_parameters
from diffprune.models.unet import CIFAR10_DDPM
from diffprune.pruning.taylor import prune_unet


def _within(value: float, paper: float, rel: float = 0.05) -> bool:
    return abs(value - paper) <= rel * paper


def test_ratio_03_reproduces_the_paper_sizes() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        teacher = UNet2DModel(**CIFAR10_DDPM).eval()
        images = torch.zeros(1, 3, 32, 32)  # one image: traces the graph; magnitude needs no gradients
        cfg = TaylorConfig(importance="magnitude", ratio=0.3, batch_size=1, max_timesteps=1)
        pruned, rep = prune_unet(teacher, DDPMScheduler(), images, cfg)
    finally:
        torch.set_num_threads(before)
    sizes = {"params_before": (rep["params_before"], 35.7e6), "params_after": (rep["params_after"], 19.8e6),
             "macs_before": (rep["macs_before"], 6.1e9), "macs_after": (rep["macs_after"], 3.4e9)}
    assert all(_within(v, paper) for v, paper in sizes.values()), sizes
    assert rep["params_after"] == num_parameters(pruned)
    # every GroupNorm group lost floor(0.3 * g) channels: 1 of 4 (128 wide), 2 of 8 (256 wide)
    assert pruned.conv_in.out_channels == 96 and pruned.down_blocks[1].resnets[0].conv1.out_channels == 192
    assert pruned.mid_block.attentions[0].to_q.out_features == 256 - 76  # one head: width pruned freely

