"""Differentiable image-similarity measures on tensors ``(B, C, H, W)`` in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gauss(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5, reduce: bool = True) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window; 1 = identical.

    Images are mapped to [0, 1] first. The window shrinks to the image size for tiny images.
    Returns a scalar (``reduce``) or one value per image ``(B,)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    a = (a + 1) / 2
    b = (b + 1) / 2
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    g = _gauss(window, sigma, a.device, a.dtype)
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    conv = lambda x: F.conv2d(x, k, groups=c)  # noqa: E731  (valid padding, as in the reference)
    mu_a, mu_b = conv(a), conv(b)
    saa = conv(a * a) - mu_a**2
    sbb = conv(b * b) - mu_b**2
    sab = conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    per = s.flatten(1).mean(1)
    return per.mean() if reduce else per


def psnr(a: torch.Tensor, b: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    per = 10 * torch.log10(4.0 / mse)
    return per.mean() if reduce else per
