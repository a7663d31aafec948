"""Pieces every benchmark shares: the cached teacher evaluation and how results are compared."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from diffprune.io import atomic_path, read_json, write_json


def cached_teacher_eval(cache: Path, compute: Callable[[], tuple[dict, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
    """The teacher's (metrics, samples) from ``cache``, or ``compute()`` them and cache them.

    ``metrics.json`` is written last, so its presence marks a complete cache.
    """
    if (cache / "metrics.json").exists():
        return read_json(cache / "metrics.json"), load_file(str(cache / "samples.safetensors"))["samples"]
    metrics, samples = compute()
    with atomic_path(cache / "samples.safetensors") as tmp:
        save_file({"samples": samples.contiguous()}, str(tmp))
    write_json(cache / "metrics.json", metrics)
    return metrics, samples


def fmt_fid(m: dict) -> str:
    """``mean ± std`` of a metrics dict's FID over the sampling seeds."""
    return f"{m['fid']:.2f} ± {m['fid_std']:.2f}"
