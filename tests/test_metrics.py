import numpy as np
import pytest
import torch
from torch import nn

from diffprune.metrics.cost import MacCounter, num_parameters, unet_macs
from diffprune.metrics.fid import fid, quantize, train_feature_net
from diffprune.metrics.image import psnr, ssim


def test_conv_and_linear_macs_are_exact():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    with MacCounter(m) as c:
        m(torch.zeros(2, 3, 5, 5))
    assert c.total == 2 * (4 * 5 * 5 * 3 * 3 * 3) + 2 * (7 * 100)


def test_unet_macs_count_attention_and_drop_with_width(tiny_unet):
    from diffprune.config import DataConfig, TeacherConfig
    from diffprune.models.unet import build_unet

    small = build_unet(TeacherConfig(block_out_channels=[4, 8, 8], attention=[False, True, False], norm_num_groups=4),
                       DataConfig())
    assert 0 < unet_macs(small, (1, 8, 8)) < unet_macs(tiny_unet, (1, 8, 8))
    assert num_parameters(small) < num_parameters(tiny_unet)


def test_skipped_modules_are_not_counted():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    m = nn.ModuleList([a, b])
    with MacCounter(m) as c:
        a(torch.zeros(1, 4))
    assert c.total == 16


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8))
    assert fid(f, f) == pytest.approx(0, abs=1e-6)
    assert fid(f, f + 0.5) > fid(f, f + 0.1) > 0.01


def test_ssim_psnr_basic_properties():
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, -x).item() < 0.5
    assert psnr(x, x + 0.01).item() > psnr(x, x + 0.1).item()


def test_quantize_is_uint8_grid():
    x = torch.linspace(-1, 1, 1000)
    q = (quantize(x) + 1) * 127.5
    assert torch.allclose(q, q.round(), atol=1e-4)


def test_feature_net_learns_separable_classes():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(60, 1, 8, 8, generator=g) * 0.5 - 1
    x1 = torch.rand(60, 1, 8, 8, generator=g) * 0.5 + 0.5
    x, y = torch.cat([x0, x1]), torch.cat([torch.zeros(60), torch.ones(60)]).long()
    net, acc, task = train_feature_net(x[::2], y[::2], x[1::2], y[1::2], epochs=3, progress=False)
    assert task == "classes" and acc >= 0.95
    _, _, task = train_feature_net(x[::2], -torch.ones(60).long(), x[1::2], -torch.ones(60).long(), epochs=1,
                                   progress=False)
    assert task == "rotation"
