"""Calibrate an FID extractor against known-bad image sets made from the dataset itself.

An FID only means something beside its scale: the *floor* (held-out real images vs the training
images) and the FID of sets that are plainly not images of the dataset. :func:`bad_sets` builds
five, each the size of the held-out ``ref`` split:

- ``gauss``:   Gaussian noise with the dataset's per-channel mean and std, clamped to [-1, 1];
- ``uniform``: uniform noise on [-1, 1];
- ``blur``:    the ref images under a heavy Gaussian blur (sigma = image_size / 5 pixels);
- ``shuffle``: the ref images with their pixel positions randomly permuted (one permutation per
  image, shared by the channels, so colours and the histogram are exact);
- ``mean``:    the training split's mean image, repeated.

:func:`calibrate` scores them (each vs the training features, like the floor) and also scores a
*half-bad* set per kind: half the ref images, half that bad set. The rule an extractor must pass
(:func:`check_calibration`) and the rule that judges a model (:func:`judge_fid`) are stated there.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch

from .fid import fid, gaussian_blur, shuffle_pixels

BAD_SETS = ("gauss", "uniform", "blur", "shuffle", "mean")
FLOOR_FACTOR = 10.0   # a bad set must score at least this many times the floor ...
SPREAD_FRACTION = 1.0  # ... and the floor plus this much of tr(Cov) of the train features (see check_calibration)
BLUR_SIGMA = 0.2       # of the image side, in pixels: 1.6 px at 8x8, 3.2 px at 16x16


def bad_sets(ref_x: torch.Tensor, train_x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The known-bad sets, each ``(len(ref_x), C, H, W)`` in [-1, 1] (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(ref_x.shape)
    mu = train_x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    sd = train_x.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    return {
        "gauss": (mu + sd * torch.randn(shape, generator=g)).clamp(-1, 1),
        "uniform": torch.rand(shape, generator=g) * 2 - 1,
        "blur": gaussian_blur(ref_x, BLUR_SIGMA * ref_x.shape[-1]),
        "shuffle": shuffle_pixels(ref_x, g),
        "mean": train_x.mean(dim=0, keepdim=True).expand(shape).clone(),
    }


def calibrate(features: Callable[[torch.Tensor], np.ndarray], ref_x: torch.Tensor, train_x: torch.Tensor,
              seed: int = 0) -> dict:
    """Score the floor, every bad set and every half-bad set against the training features.

    Args:
        features: the extractor, ``(B, C, H, W)`` in [-1, 1] -> ``(B, D)``.
        ref_x: ``(N_ref, C, H, W)`` held-out real images; train_x: ``(N_train, C, H, W)``.

    Returns:
        ``{"floor", "bad": {kind: fid}, "half_bad": {kind: fid}, "spread", "rule", "num_ref"}``;
        ``spread`` is the trace of the training features' covariance (the FID's own unit, below).
    """
    train_f = features(train_x)
    ref_f = features(ref_x)
    half = len(ref_x) // 2
    out = {"floor": fid(ref_f, train_f), "bad": {}, "half_bad": {}}
    for kind, x in bad_sets(ref_x, train_x, seed).items():
        bad_f = features(x)
        with warnings.catch_warnings():  # one repeated image has a singular covariance, by design
            if kind == "mean":
                warnings.simplefilter("ignore")
            out["bad"][kind] = fid(bad_f, train_f)
        out["half_bad"][kind] = fid(np.concatenate([ref_f[:half], bad_f[half:]]), train_f)
    out["spread"] = float(np.trace(np.cov(train_f.astype(np.float64), rowvar=False)))
    out["rule"] = (f"every bad set >= max({FLOOR_FACTOR:g} x floor, floor + {SPREAD_FRACTION:g} x spread); "
                   "a model is degenerate at FID >= the lowest half-bad FID")
    out["num_ref"] = len(ref_x)
    return out


def required_fid(cal: dict) -> tuple[float, str]:
    """The lowest FID a bad set may score, and which term of the rule sets it."""
    by_floor = FLOOR_FACTOR * cal["floor"]
    by_spread = cal["floor"] + SPREAD_FRACTION * cal["spread"]
    if by_floor >= by_spread:
        return by_floor, f"{FLOOR_FACTOR:g}x the floor {cal['floor']:.3g}"
    return by_spread, f"the floor {cal['floor']:.3g} + {SPREAD_FRACTION:g} x the feature spread {cal['spread']:.3g}"


def calibration_failures(cal: dict) -> list[str]:
    """One line per bad set that came too close to the floor (empty when the extractor passes)."""
    need, why = required_fid(cal)
    return [f"{kind} scored {v:.3g}, needs >= {need:.3g} ({why})" for kind, v in cal["bad"].items() if not v >= need]


def check_calibration(cal: dict, extractor: str) -> None:
    """Refuse an extractor that cannot tell the known-bad sets from real images.

    The rule: every bad set scores ``>= max(10 x floor, floor + 1 x spread)``, where ``spread`` is
    ``tr(Cov)`` of the training features. The floor term asks for a clear ratio over the FID's
    sampling noise. It is not enough alone: a class-only net maps noise to "an average image" and
    still clears 10x a small floor (issue 19: floor 0.39, noise 20.9, while the teacher scored 17.6).
    ``tr(Cov)`` is the FID's own unit: a set collapsed onto the training features' mean scores
    exactly ``tr(Cov)``, whatever the extractor's feature scale. So the margin says "noise, blur,
    shuffled pixels must look at least as unlike the data as a single repeated average image
    does", i.e. the extractor must place them off the data, not inside its spread. Both terms
    scale with the features, so the rule holds for any extractor (Inception included).

    Raises:
        RuntimeError: ``FID extractor <name> failed calibration: blur scored 0.9, needs >= 3.4 (...)``.
    """
    fails = calibration_failures(cal)
    if fails:
        raise RuntimeError(f"FID extractor {extractor} failed calibration: " + "; ".join(fails))


def judge_fid(value: float, cal: dict) -> tuple[bool, str]:
    """Is a model's FID on the image side of its extractor's scale? Returns ``(ok, reason)``.

    The rule: a model is degenerate when its FID reaches the lowest *half-bad* FID of the
    calibration, i.e. it scores no better than a set in which half the images are pure noise (or
    blur, shuffled pixels, the mean image). The threshold is measured, not a guessed fraction.
    """
    if not cal.get("half_bad"):
        raise ValueError("calibration has no half_bad FIDs (rerun the features stage)")
    kind = min(cal["half_bad"], key=cal["half_bad"].get)
    limit = cal["half_bad"][kind]
    scale = f"floor {cal['floor']:.3g}, half-{kind} {limit:.3g}, {kind} {cal['bad'][kind]:.3g}"
    if not math.isfinite(value) or value >= limit:
        return False, f"FID {value:.3g} is on the noise side: >= half-{kind} {limit:.3g} ({scale})"
    return True, f"FID {value:.3g} is below half-{kind} {limit:.3g} ({scale})"


def calibration_table(cal: dict) -> str:
    """One line: the floor, then each bad set and its half-bad score."""
    bad = ", ".join(f"{k} {v:.3g} (half {cal['half_bad'][k]:.3g})" for k, v in cal["bad"].items())
    return f"floor {cal['floor']:.3g}; spread {cal['spread']:.3g}; {bad}"
