"""Pieces every benchmark shares: the cached teacher evaluation and how results are compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from diffprune.config import Params, load_params
from diffprune.io import atomic_path, read_json, write_json

SEEDS = [0, 1, 2]  # sampling seeds: every benchmark reports FID as mean, spread and per seed

# The spine part of every benchmark's tiny `--quick` setting: checks that a benchmark runs end to
# end, says nothing about the method. Each benchmark adds its own method sections.
QUICK_SPINE: dict[str, dict[str, Any]] = {
    "data": {"max_images": 240, "ref_fraction": 0.25},
    "teacher": {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "steps": 6, "batch_size": 16,
                "checkpoint_every": 3, "warmup_steps": 1},
    "evaluate": {"steps": 4, "num_samples": 40, "batch_size": 40, "grid_size": 16, "latency_batch": 4,
                 "latency_repeats": 1, "feature_epochs": 2, "min_feature_accuracy": 0.0},
}


def bench_params(root: Path, quick: dict[str, dict[str, Any]] | None) -> Params:
    """``root/params.yaml`` with the benchmark protocol (3 sampling seeds) and, for a smoke run, the
    ``quick`` overrides on top."""
    overrides = {k: dict(v) for k, v in (quick or {}).items()}
    overrides["evaluate"] = {**overrides.get("evaluate", {}), "seeds": SEEDS}
    return load_params(root / "params.yaml", overrides)


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
