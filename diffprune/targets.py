"""What a pipeline model *is* when it is sampled: a denoiser built from artifact folders.

A compressed model is not always one network: a DiP-GO model is the teacher plus a skip schedule,
a mixture is several experts plus interval boundaries. Each *kind* maps named artifact paths to a
:class:`Loaded` (denoiser, the networks it runs, the sampling scheduler config). The evaluation
stage, the registered MLflow model and the CLI all build models through :func:`load_target`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .models.checkpoint import load_model, load_scheduler_config
from .sampling import Denoiser, ModelDenoiser


@dataclass
class Loaded:
    denoiser: Denoiser
    modules: list[nn.Module]
    scheduler_config: dict
    sample_shape: tuple[int, int, int]


def _shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (cfg.in_channels, size, size)


def _unet(paths: dict[str, Path], device) -> Loaded:
    model = load_model(paths["model"], device)
    return Loaded(ModelDenoiser(model), [model], load_scheduler_config(paths["model"]), _shape(model))


def _dipgo(paths: dict[str, Path], device) -> Loaded:
    from .pruning.dipgo import Schedule, SkipScheduleDenoiser

    model = load_model(paths["model"], device)
    schedule = Schedule.load(paths["schedule"])
    return Loaded(SkipScheduleDenoiser(model, schedule), [model], load_scheduler_config(paths["model"]), _shape(model))


def _experts(paths: dict[str, Path], device) -> Loaded:
    from .pruning.experts import load_mixture

    mixture = load_mixture(paths["model"], device)
    experts = list(mixture.experts)
    return Loaded(mixture.denoiser(), experts, load_scheduler_config(paths["model"]), _shape(experts[0]))


KINDS: dict[str, Callable[[dict[str, Path], object], Loaded]] = {"unet": _unet, "dipgo": _dipgo, "experts": _experts}


def load_target(kind: str, paths: dict[str, str | Path], device="cpu") -> Loaded:
    """Build the model of ``kind`` from its artifact ``paths`` (e.g. ``{"model": dir}``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} (known: {sorted(KINDS)})")
    return KINDS[kind]({k: Path(v) for k, v in paths.items()}, device)
