"""Differentiable image-similarity measures on tensors ``(B, C, H, W)`` in [-1, 1], by ``torchmetrics``."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

_MIN_MSE = 1e-12  # identical images score 10 * log10(4 / 1e-12) ~ 126 dB, not infinity


def _gauss_taps(sigma: float) -> int:
    """Width of the Gaussian window torchmetrics builds for ``sigma``: ``2 * int(3.5 sigma + 0.5) + 1``."""
    return 2 * int(3.5 * sigma + 0.5) + 1


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5, reduce: bool = True) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window; 1 = identical.

    Images are mapped to [0, 1] (``data_range = 1``, ``k1 = 0.01``, ``k2 = 0.03``); every pixel is
    scored, the borders through reflection padding. The Gaussian of std ``sigma`` spans
    ``2 * int(3.5 sigma + 0.5) + 1`` pixels (11 for the standard 1.5); when that exceeds ``window``
    or the image (reflection needs a half-width below its height and width), ``sigma`` shrinks to
    the largest whose window fits, so tiny images (8 x 8) work.

    Args:
        a, b: ``(B, C, H, W)`` in [-1, 1].
        window: the widest Gaussian window allowed, odd, >= 1.
        sigma: std of the Gaussian, > 0.
        reduce: mean over the batch, else one value per image.

    Returns:
        A scalar (``reduce``) or ``(B,)``; differentiable in ``a`` and ``b``.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"ssim: window = {window!r} must be odd and >= 1")
    if sigma <= 0:
        raise ValueError(f"ssim: sigma = {sigma!r} must be > 0")
    half = min((window - 1) // 2, a.shape[-1] - 1, a.shape[-2] - 1)  # half-width of the widest window that fits
    if _gauss_taps(sigma) > 2 * half + 1:
        sigma = (half + 0.49) / 3.5  # the largest sigma torchmetrics spreads over 2 * half + 1 pixels
    per = structural_similarity_index_measure(
        (a + 1) / 2, (b + 1) / 2, gaussian_kernel=True, sigma=sigma, kernel_size=_gauss_taps(sigma),
        data_range=1.0, reduction="none",
    )  # (B,)
    return per.mean() if reduce else per


def psnr(a: torch.Tensor, b: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images ``(B, C, H, W)`` in [-1, 1] (peak-to-peak range 2).

    Returns:
        A scalar (``reduce``) or ``(B,)``, at most ``10 * log10(4 / 1e-12)`` (identical images).
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr: expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    per = peak_signal_noise_ratio(a, b, data_range=2.0, reduction="none", dim=(1, 2, 3))  # (B,)
    per = per.clamp_max(10 * math.log10(4.0 / _MIN_MSE))
    return per.mean() if reduce else per


def feature_distance(a, b) -> torch.Tensor:
    """Paired perceptual distance: ``(N,)`` squared distance between the features ``a[i]`` and ``b[i]``
    (``(N, D)``, tensors or arrays: e.g. the FID extractor's features of a sample and of the teacher's
    sample from the same noise), over twice the total variance of ``b``. 0: identical features; about
    1: as far apart as two unrelated draws of ``b``'s distribution."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"feature_distance: expected two (N >= 2, D) arrays of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    spread = 2 * b.var(dim=0, unbiased=True).sum().clamp_min(1e-12)
    return ((a - b) ** 2).sum(dim=1) / spread
