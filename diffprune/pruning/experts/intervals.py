"""Interval selection: which timesteps should share an expert.

On a grid of ``G`` timesteps the gradient of the denoising loss w.r.t. the teacher's parameters is
computed at each timestep (same images and noise at every ``t``, averaged over a few fixed-seed
batches). The *alignment score* of two timesteps is the cosine similarity of their gradients, a
``G x G`` matrix ``A``. Timesteps whose gradients point the same way can be served by one expert.

The grid is cut into ``K`` contiguous intervals ``S_1, ..., S_K`` maximising

    J = sum_k (|S_k| / G) * mean_{i, j in S_k} A[i, j]

(the cluster-size-weighted average of the mean within-cluster alignment). For ``K = 2`` this is the
paper's cutoff ``t_1 = argmax J(t_1)``; for any ``K`` the exact optimum over all contiguous
segmentations is found by dynamic programming in ``O(K G^2)``.

``J`` never falls as ``K`` grows (``K = G`` scores 1: smaller intervals hold more of the unit
diagonal), so ``K`` is the user's, or chosen by the objective with :func:`auto_k`: the ``K`` that
maximises ``J(K) - penalty (K - 1)``, i.e. an extra interval (one more expert to train) must raise
``J`` by more than ``penalty``. :func:`seed_boundaries` repeats the search with other seeds of the
gradient batches, to show whether the chosen cut is stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...io import atomic_path
from ...training import Conditions, conditioned, denoising_loss


# ----------------------------------------------------------------------------- grid

def grid_edges(num_train_timesteps: int, grid: int) -> list[int]:
    """The ``G + 1`` integer edges of ``G`` equal timestep cells: cell ``i`` is ``[e_i, e_{i+1})``."""
    if not 2 <= grid <= num_train_timesteps:
        raise ValueError(f"intervals.grid = {grid!r}: must be in [2, num_train_timesteps={num_train_timesteps}]")
    return [i * num_train_timesteps // grid for i in range(grid + 1)]


def timestep_grid(num_train_timesteps: int, grid: int) -> list[int]:
    """The ``G`` grid timesteps: the middle of each cell of :func:`grid_edges` (ascending)."""
    e = grid_edges(num_train_timesteps, grid)
    return [(e[i] + e[i + 1] - 1) // 2 for i in range(grid)]


def cuts_to_boundaries(cuts: Sequence[int], num_train_timesteps: int, grid: int) -> list[int]:
    """Grid cut indices ``c_1 < ... < c_{K-1}`` -> timestep boundaries for :class:`ExpertMixture`.

    Cut ``c`` separates grid cells ``c-1`` and ``c``, so its boundary is the edge ``e_c``: expert ``k``
    then serves ``e_{c_k} <= t < e_{c_{k+1}}`` (expert 0 the lowest timesteps).
    """
    e = grid_edges(num_train_timesteps, grid)
    return [e[c] for c in cuts]


def uniform_cuts(grid: int, k: int) -> list[int]:
    """The cuts of ``k`` (nearly) equal intervals of a ``grid``-point grid."""
    if not 1 <= k <= grid:
        raise ValueError(f"k = {k!r}: must be in [1, grid={grid}]")
    return [round(i * grid / k) for i in range(1, k)]


def uniform_boundaries(num_train_timesteps: int, k: int) -> list[int]:
    """Boundaries of ``k`` equal timestep intervals (the usual hand-made split)."""
    return [i * num_train_timesteps // k for i in range(1, k)]


# ----------------------------------------------------------------------------- gradients

def timestep_gradients(
    model: nn.Module,
    scheduler,
    images: torch.Tensor,
    timesteps: Sequence[int],
    *,
    batches: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    conditions: Optional[Conditions] = None,
) -> torch.Tensor:
    """Gradient of the denoising loss at each timestep, w.r.t. all trainable parameters.

    The same ``batches`` fixed-seed batches of images and noise are used at every timestep, so two
    rows differ only by ``t``. ``model`` is left unchanged (its ``.grad`` is cleared).

    Args:
        model: the teacher; every parameter with ``requires_grad`` contributes ``P`` entries.
        images: ``(N, C, H, W)`` training images in [-1, 1].
        timesteps: the ``G`` grid timesteps.
        conditions: one per image (a conditional model's labels or text): each batch row is
            denoised with its own.

    Returns:
        ``(G, P)`` float32: row ``i`` is the batch-averaged gradient at ``timesteps[i]``.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches = {batches}, batch_size = {batch_size}: both must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    data = []
    for _ in range(batches):  # 1. the fixed batches: (B, C, H, W) images and noise each
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x0 = images[idx]
        data.append((x0.to(device), torch.randn(x0.shape, generator=gen).to(device), idx))
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    rows = []
    for t in timesteps:
        model.zero_grad(set_to_none=True)
        for x0, noise, idx in data:  # 2. accumulate the mean loss gradient at this t
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
            (denoising_loss(conditioned(model, conditions, idx), x0, tt, noise, scheduler) / batches).backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float().cpu()
                               for p in params]))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return torch.stack(rows)


def alignment_matrix(grads: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of gradient rows: ``(G, P) -> (G, G)`` float64.

    Computed once per unordered pair in float64 and mirrored, so the matrix is exactly symmetric;
    the diagonal is 1 up to rounding (a zero gradient row gets alignment 0 with everything).
    """
    if grads.ndim != 2:
        raise ValueError(f"grads: expected (G, P), got {tuple(grads.shape)}")
    g = grads.double()
    norms = g.norm(dim=1).clamp_min(1e-300)  # (G,)
    unit = g / norms[:, None]
    a = unit @ unit.T
    upper = torch.triu(a)
    return upper + torch.triu(a, diagonal=1).T


# ----------------------------------------------------------------------------- segmentation

@dataclass(frozen=True)
class Segmentation:
    """``K`` contiguous intervals of a ``G``-point grid and their objective.

    Attributes:
        cuts: ``K - 1`` ascending cut indices; interval ``k`` is grid ``[cuts[k-1], cuts[k])``.
        objective: ``J`` of this segmentation.
    """

    cuts: tuple[int, ...]
    objective: float

    def segments(self, grid: int) -> list[tuple[int, int]]:
        e = [0, *self.cuts, grid]
        return [(e[i], e[i + 1]) for i in range(len(e) - 1)]


def objective(a: np.ndarray | torch.Tensor, cuts: Sequence[int]) -> float:
    """``J = sum_k (|S_k| / G) * mean(A[S_k, S_k])`` for the segmentation given by ``cuts``."""
    a = np.asarray(a, dtype=np.float64)
    g = a.shape[0]
    e = [0, *cuts, g]
    total = 0.0
    for lo, hi in zip(e[:-1], e[1:]):
        if hi <= lo:
            raise ValueError(f"cuts = {list(cuts)}: empty interval [{lo}, {hi})")
        total += (hi - lo) / g * float(a[lo:hi, lo:hi].mean())
    return total


def _block_sums(a: np.ndarray) -> np.ndarray:
    """2-D prefix sums ``P (G+1, G+1)`` with ``P[r, c] = sum(A[:r, :c])``."""
    p = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    p[1:, 1:] = a.cumsum(0).cumsum(1)
    return p


def segment(a: np.ndarray | torch.Tensor, k: int, min_size: int = 1) -> Segmentation:
    """The contiguous ``k``-segmentation of the alignment matrix maximising ``J``, exactly (DP).

    ``best[m][j]`` is the best sum of segment scores ``sum(A[S,S]) / (G |S|)`` over ``m`` segments
    covering grid points ``[0, j)``; ``best[m][j] = max_i best[m-1][i] + score(i, j)``. Ties go to the
    earliest cut, so the result is deterministic.

    Args:
        a: ``(G, G)`` alignment matrix.
        k: number of intervals.
        min_size: fewest grid points per interval.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"alignment matrix must be square, got shape {a.shape}")
    g = a.shape[0]
    if k < 1 or min_size < 1 or k * min_size > g:
        raise ValueError(f"k = {k}, min_size = {min_size}: need 1 <= k * min_size <= G = {g}")
    p = _block_sums(a)

    def score(i: int, j: int) -> float:  # sum(A[i:j, i:j]) / (G * (j - i))
        s = p[j, j] - p[i, j] - p[j, i] + p[i, i]
        return s / (g * (j - i))

    neg = -np.inf
    best = np.full((k + 1, g + 1), neg)
    arg = np.zeros((k + 1, g + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for j in range(m * min_size, g + 1):
            for i in range((m - 1) * min_size, j - min_size + 1):
                if best[m - 1, i] == neg:
                    continue
                v = best[m - 1, i] + score(i, j)
                if v > best[m, j]:
                    best[m, j], arg[m, j] = v, i
    cuts = []
    j = g
    for m in range(k, 1, -1):
        j = int(arg[m, j])
        cuts.append(j)
    cuts = tuple(sorted(cuts))
    return Segmentation(cuts=cuts, objective=objective(a, cuts))


def candidates(a: np.ndarray | torch.Tensor, k_max: int, min_size: int = 1) -> list[Segmentation]:
    """The best segmentation for every ``K = 1 .. k_max`` (fewer where ``K * min_size`` exceeds ``G``)."""
    g = np.asarray(a).shape[0]
    if k_max < 1:
        raise ValueError(f"intervals.k_max = {k_max!r}: must be >= 1")
    return [segment(a, k, min_size) for k in range(1, min(k_max, g // min_size) + 1)]


def auto_k(segs: Sequence[Segmentation], penalty: float) -> int:
    """The ``K`` of ``segs`` (``K = 1, 2, ...``) maximising ``J(K) - penalty (K - 1)``; ties to the smaller."""
    if not segs:
        raise ValueError("auto_k: no candidate segmentations")
    if not penalty >= 0.0:
        raise ValueError(f"intervals.k_penalty = {penalty!r}: must be >= 0")
    score = [s.objective - penalty * k for k, s in enumerate(segs)]
    return 1 + next(k for k, v in enumerate(score) if v >= max(score) - 1e-12)


def seed_boundaries(model: nn.Module, scheduler, images: torch.Tensor, num_train_timesteps: int, grid: int, *,
                    k: int, min_size: int, batches: int, batch_size: int, seeds: Sequence[int],
                    device: torch.device | str = "cpu", conditions: Optional[Conditions] = None) -> dict[int, dict]:
    """Per seed, the alignment estimated anew with that seed's batches: the boundaries of its best ``k``
    intervals and its :func:`outlier_row`."""
    ts = timestep_grid(num_train_timesteps, grid)
    out = {}
    for seed in seeds:
        grads = timestep_gradients(model, scheduler, images, ts, batches=batches, batch_size=batch_size, seed=seed,
                                   device=device, conditions=conditions)
        a = alignment_matrix(grads).numpy()
        out[int(seed)] = {"boundaries": cuts_to_boundaries(segment(a, k, min_size).cuts, num_train_timesteps, grid),
                          "outlier_row": outlier_row(a, ts)}
    return out


def outlier_row(a: np.ndarray | torch.Tensor, timesteps: Sequence[int]) -> dict:
    """The grid point least aligned with all the others: its timestep, its mean alignment with the other
    points, and the same mean of its grid neighbours. A row far below its neighbours that moves or
    vanishes with the seed is an estimation artefact, and a cut that isolates it is not to be trusted."""
    a = np.asarray(a, dtype=np.float64)
    g = a.shape[0]
    means = (a.sum(axis=1) - np.diag(a)) / max(g - 1, 1)
    i = int(np.argmin(means))
    nbrs = [j for j in (i - 1, i + 1) if 0 <= j < g]
    return {"timestep": int(timesteps[i]), "mean_alignment": float(means[i]),
            "neighbours_mean_alignment": float(np.mean(means[nbrs])) if nbrs else None}


def cutoff_curve(a: np.ndarray | torch.Tensor) -> list[float]:
    """``J(t_1)`` for every two-interval cut ``t_1 = 1 .. G-1`` (the paper's Fig. 2 curve)."""
    a = np.asarray(a, dtype=np.float64)
    return [objective(a, [c]) for c in range(1, a.shape[0])]


# ----------------------------------------------------------------------------- plot

def save_alignment_heatmap(
    a: np.ndarray | torch.Tensor,
    timesteps: Sequence[int],
    png_path: str | Path,
    *,
    cuts: Sequence[int] = (),
    uniform: Sequence[int] = (),
    curve: Optional[Sequence[float]] = None,
    cut_timesteps: Optional[Sequence[int]] = None,
    served: Sequence[int] = (),
    k_curve: Optional[Sequence[dict]] = None,
    title: str = "gradient alignment",
) -> Path:
    """Draw ``A (G, G)`` as a heatmap with the chosen cuts (dashed) and uniform cuts (dotted), each
    chosen interval labelled with ``served`` (the sampling steps it serves); with ``curve`` also the
    two-interval objective ``J(t_1)``, plotted at ``cut_timesteps`` (the boundary of each cut
    ``1 .. G-1``; default: the first grid timestep above the cut); with ``k_curve`` (dicts with
    ``k``, ``objective``, ``steps_served``) also ``J(K)``, each point labelled with its steps per
    interval. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(a, dtype=np.float64)
    g = a.shape[0]
    ncols = 1 + (curve is not None) + (k_curve is not None)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 4.0), squeeze=False)
    _draw_heatmap(fig, axes[0, 0], a, timesteps, cuts, uniform, served, title)
    col = 1
    if curve is not None:
        ax2 = axes[0, col]
        xs = list(cut_timesteps) if cut_timesteps is not None else [timesteps[c] for c in range(1, g)]
        ax2.plot(xs, list(curve), marker=".")
        ax2.set_xlabel("cutoff timestep $t_1$")
        ax2.set_ylabel("$J(t_1)$")
        ax2.set_title("two-interval objective", fontsize=9)
        col += 1
    if k_curve is not None:
        _draw_k_curve(axes[0, col], k_curve)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(png_path)


def _draw_heatmap(fig, ax, a: np.ndarray, timesteps: Sequence[int], cuts: Sequence[int], uniform: Sequence[int],
                  served: Sequence[int], title: str) -> None:
    g = a.shape[0]
    im = ax.imshow(a, cmap="viridis", vmin=min(0.0, float(a.min())), vmax=1.0, origin="lower", interpolation="nearest")
    step = max(1, g // 6)
    ticks = list(range(0, g, step))
    ax.set_xticks(ticks, [str(timesteps[i]) for i in ticks])
    ax.set_yticks(ticks, [str(timesteps[i]) for i in ticks])
    ax.set_xlabel("timestep")
    ax.set_ylabel("timestep")
    for c in cuts:
        ax.axvline(c - 0.5, color="white", ls="--", lw=1.2)
        ax.axhline(c - 0.5, color="white", ls="--", lw=1.2)
    for c in uniform:
        ax.axvline(c - 0.5, color="red", ls=":", lw=1.0)
        ax.axhline(c - 0.5, color="red", ls=":", lw=1.0)
    edges = [0, *cuts, g]
    for (lo, hi), n in zip(zip(edges[:-1], edges[1:]), served):
        mid = 0.5 * (lo + hi) - 0.5
        ax.text(mid, mid, f"{n} steps", color="white", ha="center", va="center", fontsize=7,
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "lw": 0})
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _draw_k_curve(ax, k_curve: Sequence[dict]) -> None:
    ks = [c["k"] for c in k_curve]
    ax.plot(ks, [c["objective"] for c in k_curve], marker="o")
    for c in k_curve:
        ax.annotate("/".join(str(n) for n in c["steps_served"]), (c["k"], c["objective"]), fontsize=6,
                    textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xticks(ks)
    ax.set_xlabel("number of intervals K")
    ax.set_ylabel("best J(K)")
    ax.set_title("objective per K (labels: sampling steps per interval)", fontsize=8)


def interval_ranges(boundaries: Sequence[int], num_train_timesteps: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` timestep interval of each expert from the ``K - 1`` boundaries."""
    edges = [0, *[int(b) for b in boundaries], int(num_train_timesteps)]
    return [(edges[k], edges[k + 1]) for k in range(len(edges) - 1)]
