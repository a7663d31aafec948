"""The shared evaluation protocol: FID (with its floor and spread over seeds), MACs per call and per
trajectory (counted while sampling, so skipped work is not counted), parameters, latency, a sample
grid, and fidelity to the teacher (PSNR/SSIM of samples from the same seeds)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import EvaluateConfig
from ..io import atomic_path
from ..sampling import Denoiser, sample
from .cost import MacCounter, measure_latency, num_parameters, timed
from .fid import Extractor, fid
from .image import feature_distance, psnr, ssim
from .stats import kid, mean_ci


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Save ``(N, C, H, W)`` images in [-1, 1] as one PNG grid (upscaled, nearest, for tiny images)."""
    n, c, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    scale = scale or max(1, 64 // max(h, w))
    rows = (n + nrow - 1) // nrow
    pad = 1
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = u8[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def trajectory_macs(denoiser: Denoiser, scheduler, modules: Sequence[nn.Module], *, sample_shape, steps: int,
                    device="cpu") -> int:
    """MACs executed to sample ONE image over the whole trajectory (counted, not estimated)."""
    counters = [MacCounter(m) for m in modules]
    for c in counters:
        c.__enter__()
    try:
        sample(denoiser, scheduler, num_images=1, sample_shape=sample_shape, steps=steps, seed=0, device=device)
    finally:
        for c in counters:
            c.__exit__(None, None, None)
    return sum(c.total for c in counters)


def evaluate(
    denoiser: Denoiser,
    scheduler,
    modules: Sequence[nn.Module],
    protocol: EvaluateConfig,
    extractor: Extractor,
    train_feats: np.ndarray,
    *,
    sample_shape: Sequence[int],
    reference: torch.Tensor | None = None,
    device="cpu",
    progress: bool = True,
) -> tuple[dict, torch.Tensor]:
    """Run the protocol on one denoiser.

    Args:
        modules: the networks the denoiser runs (for parameter and MAC counts; experts: all of them).
        train_feats: ``(N, D)`` features of the training images (FID reference set).
        reference: the teacher's samples for ``protocol.seeds[0]`` ``(num_samples, C, H, W)``, for
            paired fidelity (PSNR, SSIM, and the feature distance in the extractor's space:
            :func:`~diffprune.metrics.image.feature_distance`); None for the teacher itself.

    Returns:
        (metrics, samples of the first seed ``(num_samples, C, H, W)``).
    """
    fids, kids, first, first_feats = [], [], None, None
    for seed in protocol.seeds:
        x = sample(denoiser, scheduler, num_images=protocol.num_samples, sample_shape=sample_shape,
                   steps=protocol.steps, seed=seed, batch_size=protocol.batch_size, device=device, progress=progress)
        feats = extractor.fn(x)
        fids.append(fid(feats, train_feats))
        kids.append(kid(feats, train_feats, seed=seed)[0])
        if first is None:
            first, first_feats = x, feats
    assert first is not None
    traj = trajectory_macs(denoiser, scheduler, modules, sample_shape=sample_shape, steps=protocol.steps, device=device)
    lat = measure_latency(latency_probe(denoiser, scheduler, protocol, sample_shape, device),
                          repeats=protocol.latency_repeats)
    metrics = {
        "fid": float(np.mean(fids)),
        "fid_std": float(np.std(fids)),
        "fid_per_seed": [float(f) for f in fids],
        "kid": float(np.mean(kids)),
        "kid_std": float(np.std(kids)),
        "feature_extractor": extractor.name,
        "trajectory_macs": int(traj),
        "macs_per_step": float(traj) / protocol.steps,
        "params": int(sum(num_parameters(m) for m in modules)),
        "latency_s": lat["median_s"],
        "latency_batch": protocol.latency_batch,
        "sampler": protocol.sampler,
        "steps": protocol.steps,
        "num_samples": protocol.num_samples,
    }
    if reference is not None:
        metrics |= fidelity(first, reference)
        per = feature_distance(first_feats, extractor.fn(reference)).numpy()
        ci = mean_ci(per)
        metrics |= {"feature_distance_vs_teacher": ci.mean, "feature_distance_vs_teacher_ci95": [ci.lo, ci.hi]}
    return metrics, first


def fidelity(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Paired fidelity of ``samples (N, C, H, W)`` to the teacher's ``reference`` from the same noises:
    mean PSNR / SSIM with their 95% confidence interval over images. (The per-image values that a
    paired test between two models needs come from the saved samples: ``psnr(..., reduce=False)``.)"""
    per_psnr = psnr(samples, reference, reduce=False).double().numpy()
    per_ssim = ssim(samples, reference, reduce=False).double().numpy()
    ci_p, ci_s = mean_ci(per_psnr), mean_ci(per_ssim)
    return {"psnr_vs_teacher": ci_p.mean, "psnr_vs_teacher_ci95": [ci_p.lo, ci_p.hi],
            "ssim_vs_teacher": ci_s.mean, "ssim_vs_teacher_ci95": [ci_s.lo, ci_s.hi]}


def latency_probe(denoiser: Denoiser, scheduler, protocol: EvaluateConfig, sample_shape: Sequence[int],
                  device="cpu") -> Callable[[], torch.Tensor]:
    """The timed unit of the protocol: one batch of ``protocol.latency_batch`` samples, all steps."""
    return lambda: sample(denoiser, scheduler, num_images=protocol.latency_batch, sample_shape=sample_shape,
                          steps=protocol.steps, seed=1234, batch_size=protocol.latency_batch, device=device)


def paired_latency(candidate: Callable[[], Any], reference: Callable[[], Any], *, repeats: int = 3,
                   warmup: int = 1) -> dict[str, float]:
    """Wall-clock of ``candidate`` and ``reference`` measured in this process, interleaved.

    Both are warmed up, then timed alternately (reference, candidate, reference, ...) so a change in
    machine load hits both alike; the speedup is the ratio of the medians. Timing the two in separate
    runs reported one pruned model at 1.25x, 0.27x and 3.17x on the same machine.
    """
    for _ in range(warmup):
        reference()
        candidate()
    times: dict[str, list[float]] = {"reference": [], "candidate": []}
    for _ in range(max(1, repeats)):
        for name, fn in (("reference", reference), ("candidate", candidate)):
            times[name].append(timed(fn))
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"latency_s": med["candidate"], "teacher_latency_s": med["reference"],
            "speedup_vs_teacher": med["reference"] / med["candidate"]}


def compare_to_teacher(metrics: dict, teacher: dict) -> dict:
    """The ratios every report shows against the teacher's metrics (MACs, FID)."""
    return {"macs_ratio_vs_teacher": metrics["trajectory_macs"] / teacher["trajectory_macs"],
            "fid_ratio_vs_teacher": metrics["fid"] / teacher["fid"]}


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where timings were taken: CPU model, threads, device (recorded beside every latency)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": str(device), "torch": torch.__version__}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def quality_verdict(metrics: dict, calibration: dict | None, samples: torch.Tensor,
                    reference: torch.Tensor | None) -> dict[str, Any]:
    """Is a model degenerate? Two measured floors, each shown with its reason.

    * FID on the noise side of the extractor's calibration (:func:`diffprune.metrics.calibration.judge_fid`:
      no better than a set that is half noise, blur, shuffled pixels or the mean image);
    * fidelity to the teacher no better than chance: the mean PSNR of ``samples (N, C, H, W)``
      against the teacher's ``reference`` from the same noises is at most the PSNR of the teacher's
      samples against *other* teacher samples (the pairs shifted by one), i.e. the model has lost
      the noise-to-image mapping it was compressed from.

    Returns ``{"degenerate": bool, "verdict": str}`` (the reasons of every failed floor, or "ok").
    """
    from .calibration import judge_fid

    reasons = []
    if calibration and calibration.get("half_bad"):
        ok, why = judge_fid(metrics["fid"], calibration)
        if not ok:
            reasons.append(why)
    if reference is not None and reference.shape[0] > 1:
        unpaired = float(psnr(reference, reference.roll(1, 0)))
        paired = float(psnr(samples, reference))
        if paired <= unpaired:
            reasons.append(f"PSNR vs the teacher {paired:.2f} dB is no better than unrelated teacher samples "
                           f"({unpaired:.2f} dB)")
    return {"degenerate": bool(reasons), "verdict": "; ".join(reasons) or "ok"}
