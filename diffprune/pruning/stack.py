"""Stacking the three methods: one MACs budget split between Diff-Pruning, timestep experts,
DiP-GO and fewer sampling steps, the split searched on validation noises of its own seed.

The trajectory MACs of a stacked model are the product of three factors::

    ratio = net_ratio x skip_ratio x steps / teacher_steps

* ``net_ratio``: per-step MACs of the base network over the teacher's: the teacher itself (1.0), one
  Diff-Pruning model, or a mixture of timestep experts pruned to the same widths, in one of two
  orders (:data:`ORDERS`):

  - ``prune-experts``: Diff-Pruning first (one channel selection, gradients over the informative
    early timesteps), then one copy per interval fine-tuned on its interval;
  - ``experts-prune``: one Diff-Pruning selection *per interval* (gradients accumulated from the
    interval's first timestep, :func:`~diffprune.pruning.taylor.prune_unet` ``timesteps=``), each
    expert fine-tuned on its interval. Every GroupNorm group loses ``floor(ratio * g)`` channels
    whatever the scores, so the experts of both orders have equal widths: one cost table, one skip
    schedule over the mixture (:class:`~diffprune.pruning.dipgo.routed.RoutedGraph`).

* ``skip_ratio``: the kept MACs fraction of a DiP-GO schedule learned over the base network's
  ``steps``-step trajectory (1.0 = no schedule). Over a mixture, each expert's first step computes
  every block (:func:`~diffprune.pruning.dipgo.routed.switch_steps`).
* ``steps``: the sampling steps (DDIM), at most the teacher's.

:func:`candidate_splits` lists, for a budget, every (base network, skip ratio) of a grid with the
steps that bring the product to the budget; the stage (or benchmark) trains each candidate's
schedule and :func:`choose` picks the candidate with the best score on a validation set of noises
(a seed the evaluation never uses): by default the mean paired PSNR against the teacher, or the paired
distance in the FID extractor's space, or the validation FID (:data:`FIDELITY`). The chosen split and
its runner-ups are reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import ConfigError
from ..metrics.fid import fid
from ..metrics.image import feature_distance, psnr
from ..sampling import Denoiser, ModelDenoiser, sample
from .dipgo import Schedule, SkipScheduleDenoiser
from .experts.prune import ExpertMixtureModel
from .experts.intervals import interval_ranges  # noqa: F401  (the mixtures' intervals; stages/stack.py imports it from here)

ORDERS = ("prune-experts", "experts-prune")
"""How a mixture's experts are made (see the module docstring); ``single`` is one Diff-Pruning model."""

MACS_TOLERANCE = 0.02
"""A split's trajectory MACs land within 2% (relative) of the budget: the benchmarks' equal cost."""

VALIDATION_SEED = 9_999
"""Seed of the validation noises the split is chosen on (the evaluation protocol's seeds are 0, 1, 2)."""


@dataclass(frozen=True)
class Split:
    """One way of spending a budget: base network ``net`` (its per-step MACs ratio ``net_ratio``),
    a DiP-GO schedule keeping ``skip_ratio`` of its trajectory MACs, ``steps`` sampling steps."""

    net: str
    net_ratio: float
    skip_ratio: float
    steps: int
    teacher_steps: int

    @property
    def predicted_ratio(self) -> float:
        """Trajectory MACs over the teacher's (full model, ``teacher_steps`` steps)."""
        return self.net_ratio * self.skip_ratio * self.steps / self.teacher_steps

    @property
    def name(self) -> str:
        skip = "" if self.skip_ratio >= 1.0 else f"-skip{self.skip_ratio:.2f}"
        return f"{self.net}{skip}-T{self.steps}"

    def to_json(self) -> dict:
        return {**asdict(self), "name": self.name, "predicted_ratio": self.predicted_ratio}


def candidate_splits(budget: float, nets: dict[str, float], skip_ratios: Sequence[float], teacher_steps: int, *,
                     min_steps: int = 4, tolerance: float = MACS_TOLERANCE, min_skip: float = 0.2) -> list[Split]:
    """Every split of ``budget`` (trajectory MACs over the teacher's) on the grid ``nets x skip_ratios``.

    For a base net and a nominal skip ratio ``s`` the steps are ``round(budget * T / (net * s))``
    (at least ``min_steps``, at most ``T``); the skip ratio is then the one that lands the product
    on the budget exactly. With ``s = 1`` no schedule is learned, so the split is kept only when the
    whole steps alone land within ``tolerance`` of the budget. A skip ratio outside
    ``[min_skip, 1]`` after the adjustment drops the split. Duplicates (same net and steps) are kept once.
    """
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"stack.budget = {budget!r}: expected in (0, 1]")
    out: dict[tuple[str, int, bool], Split] = {}
    for net, r in nets.items():
        for s in sorted(set(skip_ratios), reverse=True):
            steps = int(min(teacher_steps, max(min_steps, round(budget * teacher_steps / (r * s)))))
            exact = budget * teacher_steps / (r * steps)  # the skip ratio that lands on the budget
            if s >= 1.0:
                if abs(exact - 1.0) > tolerance:
                    continue
                split = Split(net, r, 1.0, steps, teacher_steps)
            elif min_skip <= exact < 1.0 - tolerance:
                split = Split(net, r, round(exact, 4), steps, teacher_steps)
            else:
                continue
            out.setdefault((net, steps, split.skip_ratio < 1.0), split)
    return sorted(out.values(), key=lambda c: (c.net, c.steps))


def mixture_of(experts: Sequence[nn.Module], boundaries: Sequence[int]) -> ExpertMixtureModel:
    """The experts as one module (pipeline-loadable through its checkpoint); the experts must share
    their widths (one skip schedule costs them alike)."""
    shapes = [[tuple(p.shape) for p in e.parameters()] for e in experts]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("the experts have different widths: stack them pruned at one ratio")
    return ExpertMixtureModel(list(experts), boundaries).eval()


def stacked_denoiser(net: nn.Module, schedule: Optional[Schedule]) -> Denoiser:
    """The stacked model's denoiser: ``net`` (a UNet or a mixture) with its skip schedule, if any."""
    if schedule is not None:
        return SkipScheduleDenoiser(net, schedule)
    return net.denoiser() if isinstance(net, ExpertMixtureModel) else ModelDenoiser(net)


FIDELITY = {"psnr": ("validation_psnr", True), "features": ("validation_feature_distance", False),
            "fid": ("validation_fid", False)}
"""The criteria a split may be chosen by: the row key of each candidate's validation score and whether
higher is better. Paired fidelity to the teacher on the validation noises: ``psnr`` (mean pixel PSNR)
and ``features`` (mean :func:`~diffprune.metrics.image.feature_distance` in the FID extractor's
space); not paired: ``fid`` (FID of the validation samples against the training images)."""


def validation_scores(denoiser: Denoiser, scheduler, reference: torch.Tensor, steps: int, *,
                      features: Optional[Callable[[torch.Tensor], Any]] = None, reference_features: Any = None,
                      train_features: Any = None, fid_samples: int = 0, batch_size: int = 64,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Scores of ``denoiser`` on the validation seed :data:`VALIDATION_SEED` (``steps`` steps).

    Against ``reference``, the teacher's samples from the first ``N = len(reference)`` noises:
    ``psnr`` ``(N,)`` and, given the extractor ``features`` (images -> ``(N, D)``) and the reference's
    features, ``feature_distance`` ``(N,)``. With ``fid_samples > 1`` and ``train_features`` also
    ``fid``: the FID of the seed's first ``fid_samples`` samples (the paired ones among them).
    """
    n = reference.shape[0]
    total = max(n, fid_samples) if train_features is not None else n
    x = sample(denoiser, scheduler, num_images=total, sample_shape=tuple(reference.shape[1:]),
               steps=steps, seed=VALIDATION_SEED, batch_size=batch_size, device=device)
    out: dict[str, Any] = {"psnr": psnr(x[:n], reference, reduce=False)}
    feats = features(x) if features is not None else None
    if feats is not None:
        out["feature_distance"] = feature_distance(feats[:n], reference_features)
        if train_features is not None and fid_samples > 1:
            out["fid"] = fid(feats[:fid_samples], train_features)
    return out


def rank_key(by: str) -> Callable[[dict], tuple[float, str]]:
    """Sort key of a candidate's row (its mean validation scores by :data:`FIDELITY` key, and its
    ``name``) for the criterion ``by``: best first, a missing or NaN score last, ties by name."""
    if by not in FIDELITY:
        raise ConfigError(f"stack.fidelity = {by!r}: expected one of {', '.join(FIDELITY)}")
    key, higher = FIDELITY[by]

    def rank(row: dict) -> tuple[float, str]:
        v = float(row.get(key, math.nan))
        return (-v if higher else v) if math.isfinite(v) else math.inf, row["name"]

    return rank


def choose(scored: Sequence[tuple[Split, float, dict[str, float]]], by: str = "psnr") -> tuple[Split, list[dict]]:
    """The split with the best mean validation score ``by`` (:data:`FIDELITY`) among ``(split, achieved
    MACs ratio, {row key: mean score})``, and every candidate's record, best first (the runner-ups)."""
    rank = rank_key(by)
    if not scored:
        raise ConfigError("stack.budget: no candidate split reaches it within 2% (widen stack.skip_ratios, add "
                          "stack.nets or lower stack.min_steps)")
    rows = sorted(({**s.to_json(), "macs_ratio": r, **v, "chosen_by": by} for s, r, v in scored), key=rank)
    best = next(s for s, _, _ in scored if s.name == rows[0]["name"])
    return best, rows
