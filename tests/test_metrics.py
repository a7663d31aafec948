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


def test_counter_matches_a_hand_count_with_nested_counters_and_per_module_split():
    conv, lin = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Linear(3 * 4 * 4, 5)
    m = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin)
    conv_macs = 1 * (3 * 4 * 4) * (2 * 3 * 3)  # outputs x inputs per output
    lin_macs = 1 * 5 * 48
    with MacCounter(m, per_module=True) as outer, MacCounter(lin) as inner:
        m(torch.zeros(1, 2, 4, 4))
    assert outer.total == conv_macs + lin_macs and inner.total == lin_macs
    assert outer.per_module == {"0": conv_macs, "3": lin_macs}


def test_attention_products_are_counted(tiny_unet):
    from diffusers.models.attention_processor import Attention

    with MacCounter(tiny_unet, per_module=True) as c:
        tiny_unet(torch.zeros(1, 1, 8, 8), torch.ones(1, dtype=torch.long))
    attns = [(n, m) for n, m in tiny_unet.named_modules() if isinstance(m, Attention)]
    assert attns
    for name, m in attns:
        size = 2 if name.startswith("mid_block") else 4  # the second level runs at 4 x 4, the middle at 2 x 2
        assert c.per_module[name] == 2 * (size * size) ** 2 * m.to_q.out_features  # QK^T and AV
    assert c.total == sum(c.per_module.values())


def test_unet_macs_within_a_percent_of_torch_pruning(tiny_unet):
    import torch_pruning as tp

    static, _ = tp.utils.count_ops_and_params(tiny_unet, example_inputs=(torch.zeros(1, 1, 8, 8),
                                                                        torch.ones(1, dtype=torch.long)))
    assert unet_macs(tiny_unet, (1, 8, 8)) == pytest.approx(static, rel=0.01)


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


def _old_ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """The hand-written SSIM the torchmetrics one replaced: valid positions only, per image ``(B,)``."""
    a, b = (a + 1) / 2, (b + 1) / 2
    x = torch.arange(window, dtype=a.dtype) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).contiguous()
    conv = lambda x: torch.nn.functional.conv2d(x, k, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = conv(a), conv(b)
    saa, sbb, sab = conv(a * a) - mu_a**2, conv(b * b) - mu_b**2, conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    c1 = 0.01**2  # a, b are 0.5 and 0.75 in [0, 1]
    expected = (2 * 0.5 * 0.75 + c1) / (0.5**2 + 0.75**2 + c1)  # structure and contrast terms are 1
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-9)
    assert ssim(a.float(), b.float()).item() == pytest.approx(expected, abs=1e-3)  # float32: E[x^2] - mu^2 cancels


def test_ssim_agrees_with_the_old_formula_on_similar_images_and_stays_differentiable():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    previous = 1.0
    for noise in (0.02, 0.05, 0.3):
        b = (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1)
        new = ssim(a, b).item()
        assert new == pytest.approx(_old_ssim(a, b).mean().item(), abs=0.003 if noise < 0.1 else 0.01)
        assert new < previous  # more noise, less similar
        previous = new
    x = a.clone().requires_grad_()
    (1 - ssim(x, b)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert ssim(a, b, reduce=False).shape == (16,)
    tiny = torch.rand(2, 3, 4, 4, generator=g)
    assert ssim(tiny, tiny).item() == pytest.approx(1.0, abs=1e-5)  # the window shrinks to a 4 x 4 image
    with pytest.raises(ValueError, match="window = 8"):
        ssim(a, b, window=8)


def test_psnr_equals_the_formula_and_caps_identical_images():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    mse = ((a - b) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(a, b, reduce=False), 10 * torch.log10(4.0 / mse), atol=1e-4)
    assert psnr(a, a).item() == pytest.approx(10 * np.log10(4.0 / 1e-12), abs=1e-3)


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
