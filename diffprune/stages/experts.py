"""Stages of the mixture of efficient experts: intervals -> experts -> router -> prune-experts.

- ``intervals``: gradient-alignment matrix of the teacher over a timestep grid, the exact best
  contiguous K-segmentation, boundaries in timesteps (``models/intervals/``).
- ``experts``: one elastic (depth + width) fine-tune of the teacher per interval
  (``models/experts/elastic/expert-K/``); ``expert=k`` trains only expert ``k`` (one task per expert).
- ``router`` (in :mod:`.router`): the Expert Routing Agent picks every expert's sub-network under
  the MACs budget (``models/experts/router/``).
- ``prune-experts``: each expert cut physically to its sub-network and fine-tuned briefly
  (``models/experts/pruned/expert-K/``); with ``expert=None`` also the mixture checkpoint
  (``models/experts/mixture/``) and ``models/experts/summary.json``.

A per-expert output records a key of everything it was made from; a rerun skips an expert whose
output is up to date, and training resumes from its last checkpoint otherwise.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from diffusers import DDPMScheduler

from ..config import ConfigError, Params, fingerprint, resolve_device, to_dict
from ..distributed import follower_result, is_main_process
from ..io import ArtifactError, atomic_path, read_json, write_json
from ..metrics.cost import unet_macs
from ..models.checkpoint import load_model, load_scheduler_config, read_config, save_model, verify
from ..pruning.experts.elastic import ElasticController, ElasticSpace, SubnetConfig, elastic_hook, elastic_space
from ..pruning.experts.importance import importance_orders, reorder_units, unit_importance
from ..models.unet import sampling_scheduler
from ..pruning.experts.intervals import (alignment_matrix, auto_k, candidates, cutoff_curve, cuts_to_boundaries,
                                         objective, outlier_row, save_alignment_heatmap, seed_boundaries, timestep_gradients,
                                         timestep_grid, uniform_boundaries, uniform_cuts)
from ..pruning.experts.prune import ExpertMixtureModel, prune_to_config, save_mixture
from ..pruning.experts.selection import mixture_macs, split_steps, steps_per_expert
from ..pruning.surgery import check_pruned
from ..training import TrainSpec, spec_json
from . import core, safe_subpath, stage
from .expert_data import train_conditions, expert_family

log = logging.getLogger(__name__)

INTERVALS = "models/intervals"
ELASTIC = "models/experts/elastic"
ROUTER = "models/experts/router"
PRUNED = "models/experts/pruned"
MIXTURE = "models/experts/mixture"
SUMMARY = "models/experts/summary.json"

# ----------------------------------------------------------------------------- helpers

def _teacher(root: Path, device: torch.device) -> tuple[torch.nn.Module, DDPMScheduler, dict]:
    path = safe_subpath(root, core.TEACHER)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: no teacher checkpoint (run the teacher stage first)")
    cfg = load_scheduler_config(path)
    return load_model(path, device), DDPMScheduler.from_config(cfg), cfg


def _shape(model: torch.nn.Module) -> tuple[int, int, int]:
    c = model.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    return (c.in_channels, size, size)


def _steps(fraction: float, teacher_steps: int) -> int:
    """``ceil(fraction * teacher_steps)`` training steps, at least 1."""
    return max(1, math.ceil(round(fraction * teacher_steps, 6)))


def expert_steps(section: str, cfg: Any, teacher_steps: int, served: Sequence[int], k: int) -> int:
    """Training steps of expert ``k``: ``fraction`` of the teacher's each (``split: equal``), or
    ``K`` times that shared by the sampling steps each expert serves (``split: served``)."""
    per = _steps(cfg.fraction, teacher_steps)
    if cfg.split == "equal":
        return per
    total = per * len(served)
    least = max(1, math.floor(cfg.min_share * total))
    if least * len(served) > total:
        raise ConfigError(f"{section}.min_share = {cfg.min_share!r}: {len(served)} experts x {least} steps "
                          f"exceed the total {total}")
    return split_steps(total, served, least)[k]


def _read_intervals(root: Path) -> dict:
    path = safe_subpath(root, INTERVALS) / "intervals.json"
    if not path.exists():
        raise ConfigError(f"{path}: missing (run the intervals stage first)")
    return read_json(path)


def _interval_ranges(doc: dict) -> list[tuple[int, int]]:
    from ..pruning.experts.intervals import interval_ranges

    return interval_ranges(doc["boundaries"], doc["num_train_timesteps"])


def _which(expert: Optional[int], k: int) -> list[int]:
    if expert is None:
        return list(range(k))
    if not isinstance(expert, int) or not 0 <= expert < k:
        raise ConfigError(f"expert = {expert!r}: expected an index in [0, {k})")
    return [expert]


def _up_to_date(path: Path, key: str) -> bool:
    """Whether ``path`` is an intact checkpoint made from inputs with this ``key``."""
    if not (path / "config.json").exists():
        return False
    try:
        return verify(path).get("meta", {}).get("key") == key
    except ArtifactError:
        return False


def _expert_dir(root: Path, base: str, k: int) -> Path:
    return safe_subpath(root, f"{base}/expert-{k}")


# ----------------------------------------------------------------------------- intervals

@stage("intervals")
def run_intervals(p: Params, root: Path, progress: bool = True, **_: Any) -> dict:
    """Gradient alignment of the teacher's timesteps and the best contiguous K intervals."""
    cfg = p.intervals
    device = resolve_device(p.project.device)
    teacher, sched, sched_cfg = _teacher(root, device)
    T = int(sched.config.num_train_timesteps)
    if cfg.grid > T:
        raise ConfigError(f"intervals.grid = {cfg.grid!r}: more grid points than the {T} training timesteps")
    images, cond = expert_family(p).load(p, root)
    ts = timestep_grid(T, cfg.grid)
    # 1. per-timestep gradients (G, P) and their cosine alignment (G, G)
    grads = timestep_gradients(teacher, sched, images, ts, batches=cfg.batches, batch_size=cfg.batch_size,
                               seed=cfg.seed, device=device, conditions=cond)
    a = alignment_matrix(grads).numpy()  # (G, G) float64
    # 2. the exact best contiguous segmentation of every K, the chosen K, and the uniform one
    sampling = sampling_timesteps(sched_cfg, p)
    doc = _intervals_doc(a, cfg, T, sampling)
    # 3. optionally, the same search with other gradient seeds: is the cut stable?
    if cfg.stability_seeds:
        seeds = _seed_boundaries(teacher, sched, images, T, cfg, doc["k"], range(cfg.stability_seeds), device=device,
                                 conditions=cond)
        doc |= {"seed_boundaries": {str(s): r["boundaries"] for s, r in seeds.items()},
                "seed_outlier_rows": {str(s): r["outlier_row"] for s, r in seeds.items()},
                "stable": len({tuple(r["boundaries"]) for r in seeds.values()}) == 1}
    out = safe_subpath(root, INTERVALS)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "intervals.json", doc)
        save_alignment_heatmap(a, ts, tmp / "alignment.png", cuts=doc["cuts"], uniform=doc["uniform_cuts"],
                               curve=doc["cutoff_curve"], served=doc["steps_served"], k_curve=doc["candidates"],
                               cut_timesteps=cuts_to_boundaries(range(1, cfg.grid), T, cfg.grid),
                               title=f"gradient alignment, K={doc['k']}: J={doc['objective']:.4f} "
                                     f"(uniform {doc['uniform_objective']:.4f})")
    log.info("intervals: K = %d, boundaries %s, J = %.4f (uniform %.4f), sampling steps per interval %s",
             doc["k"], doc["boundaries"], doc["objective"], doc["uniform_objective"], doc["steps_served"])
    return {"intervals": str(out), "boundaries": doc["boundaries"], "objective": doc["objective"], "k": doc["k"]}


def _intervals_doc(a, cfg, T: int, sampling: list[int]) -> dict:
    """``intervals.json`` but the stability report: the chosen K and its intervals, every candidate
    K's J and sampling steps per interval, the uniform split and the two-interval curve."""
    segs = candidates(a, max(cfg.k_max, 1 if cfg.k == "auto" else cfg.k), cfg.min_size)
    k = auto_k(segs, cfg.k_penalty) if cfg.k == "auto" else cfg.k
    seg = segs[k - 1]
    ucuts = uniform_cuts(cfg.grid, k)

    def bounds(cuts) -> list[int]:
        return cuts_to_boundaries(cuts, T, cfg.grid)

    return {
        "num_train_timesteps": T,
        "grid": timestep_grid(T, cfg.grid),
        "alignment": a.tolist(),
        "k": k,
        "k_rule": f"auto: argmax J(K) - {cfg.k_penalty} (K - 1)" if cfg.k == "auto" else "intervals.k",
        "cuts": list(seg.cuts),
        "boundaries": bounds(seg.cuts),
        "objective": seg.objective,
        "sampling_timesteps": sampling,
        "steps_served": steps_per_expert(sampling, bounds(seg.cuts)),
        "candidates": [{"k": len(c.cuts) + 1, "objective": c.objective, "boundaries": bounds(c.cuts),
                        "steps_served": steps_per_expert(sampling, bounds(c.cuts))} for c in segs],
        "uniform_cuts": ucuts,
        "uniform_boundaries": uniform_boundaries(T, k),
        "uniform_objective": objective(a, ucuts),
        "cutoff_curve": cutoff_curve(a),
        "outlier_row": outlier_row(a, timestep_grid(T, cfg.grid)),
        "params": to_dict(cfg),
    }


def _seed_boundaries(teacher, sched, images, T: int, cfg, k: int, seeds, device, conditions) -> dict[int, dict]:
    return seed_boundaries(teacher, sched, images, T, cfg.grid, k=k, min_size=cfg.min_size, batches=cfg.batches,
                           batch_size=cfg.batch_size, seeds=list(seeds), device=device, conditions=conditions)


def sampling_timesteps(scheduler_config: dict, p: Params) -> list[int]:
    """The timesteps of the evaluation protocol's sampler (``evaluate.sampler``, ``evaluate.steps``)."""
    sched = sampling_scheduler(scheduler_config, p.evaluate.sampler)
    sched.set_timesteps(p.evaluate.steps)
    return [int(t) for t in sched.timesteps]


# ----------------------------------------------------------------------------- experts

def train_expert(p: Params, root: Path, k: int, *, progress: bool = True,
                 on_progress: core.ProgressFn | None = None) -> Path:
    """Fine-tune the teacher on interval ``k`` with elastic depth and width; returns its folder."""
    doc = _read_intervals(root)
    lo, hi = _interval_ranges(doc)[k]
    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, core.TEACHER)
    served = (steps_per_expert(sampling_timesteps(load_scheduler_config(teacher_dir), p), doc["boundaries"])
              if p.experts.split == "served" else [])
    train_steps = expert_steps("experts", p.experts, p.teacher.steps, served, k)
    fam = expert_family(p)
    key = fingerprint(read_config(teacher_dir)["sha256"], [lo, hi], p.data, p.experts, {"expert": k},
                      *([{"steps": train_steps}] if p.experts.split == "served" else []),
                      *([fam.key(p)] if fam.key(p) is not None else []))
    out = _expert_dir(root, ELASTIC, k)
    if _up_to_date(out, key):
        log.info("expert %d is up to date", k)
        return out
    model, sched, sched_cfg = _teacher(root, device)
    teacher = copy.deepcopy(model) if p.experts.distill else None  # frozen, before any reordering
    images, cond = fam.load(p, root)
    cfg = p.experts
    # 1. the elastic space, and the channels of every unit put in importance order on this interval
    with fam.bare_calls(root, model):
        space = elastic_space(model, _shape(model), cfg.min_width)
    orders = importance_orders(unit_importance(model, space, sched, images, t_min=lo, t_max=hi,
                                               batch_size=cfg.batch_size, seed=cfg.seed + k, conditions=cond))
    reorder_units(model, space, orders)
    # 2. fine-tune on [lo, hi), a random sub-network every step (drawn from the training generator)
    spec = TrainSpec(steps=train_steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema_decay,
                     checkpoint_every=cfg.checkpoint_every, seed=cfg.seed + k,
                     t_min=lo, t_max=hi, distill=cfg.distill)
    with ElasticController(model, space) as ctrl:
        model = core.train_or_resume(model, images, sched, spec, core.work_dir(root, f"experts-{k}", key),
                                     device=device, progress=progress, desc=f"expert {k} [{lo}, {hi})",
                                     before_step=elastic_hook(ctrl, cfg.depth_drop_prob), on_progress=on_progress,
                                     teacher=teacher, mixed_precision=p.project.mixed_precision,
                                     **train_conditions(cond))
    if not is_main_process():  # under `accelerate launch`: the main process writes the outputs
        return out
    meta = {"key": key, "expert": k, "interval": [lo, hi], "space": space.to_json(),
            "importance_order": [o.tolist() for o in orders], "training_options": spec_json(spec),
            "params": to_dict(cfg)}
    save_model(model.cpu(), out, scheduler_config=sched_cfg, meta=meta)
    return out


@stage("experts")
def run_experts(p: Params, root: Path, progress: bool = True, on_progress: core.ProgressFn | None = None,
                expert: Optional[int] = None, **_: Any) -> dict:
    """Train the elastic expert of every interval (``expert=k``: only expert ``k``)."""
    k_count = len(_read_intervals(root)["boundaries"]) + 1
    outs = [train_expert(p, root, k, progress=progress, on_progress=on_progress) for k in _which(expert, k_count)]
    return {"experts": [str(o) for o in outs]} if is_main_process() else follower_result("experts")


# ----------------------------------------------------------------------------- prune-experts

def prune_expert(p: Params, root: Path, k: int, *, progress: bool = True,
                 on_progress: core.ProgressFn | None = None) -> Path:
    """Cut elastic expert ``k`` to its selected sub-network and fine-tune it on its interval."""
    rdoc_path = safe_subpath(root, ROUTER) / "router.json"
    if not rdoc_path.exists():
        raise ConfigError(f"{rdoc_path}: missing (run the router stage first)")
    rdoc = read_json(rdoc_path)
    lo, hi = rdoc["intervals"][k]
    cfg = SubnetConfig.from_json(rdoc["configs"][k])
    src = _expert_dir(root, ELASTIC, k)
    c = p.prune_experts
    train_steps = expert_steps("prune_experts", c, p.teacher.steps, rdoc["steps_per_expert"], k)
    fam = expert_family(p)
    key = fingerprint(read_config(src)["sha256"], cfg.to_json(), [lo, hi], p.data, c, {"expert": k},
                      *([{"steps": train_steps}] if c.split == "served" else []),
                      *([fam.key(p)] if fam.key(p) is not None else []))
    out = _expert_dir(root, PRUNED, k)
    if _up_to_date(out, key):
        log.info("pruned expert %d is up to date", k)
        return out
    device = resolve_device(p.project.device)
    model = load_model(src, device)
    space = ElasticSpace.from_json(read_config(src)["meta"]["space"])
    shape = _shape(model)
    # 1. physical pruning; its real MACs must be what the router budgeted
    pruned = prune_to_config(model, space, cfg)
    with fam.bare_calls(root, pruned):
        check_pruned(pruned, shape, what="pruned expert")
        macs = unet_macs(pruned, shape)
    if macs != space.macs(cfg):
        raise RuntimeError(f"expert {k}: pruned network runs {macs} MACs, the router budgeted {space.macs(cfg)}")
    # 2. a short fine-tune on the expert's interval (split: equal by default: the few-step
    # high-noise expert needs its full share; a split by steps served, 860 / 140 of 1000, raised
    # the benchmark's FID at budget 0.3 from 4.10 to 5.17)
    spec = TrainSpec(steps=train_steps, batch_size=c.batch_size, lr=c.lr,
                     ema_decay=c.ema_decay, checkpoint_every=c.checkpoint_every, seed=c.seed + k, t_min=lo, t_max=hi,
                     distill=c.distill)
    images, cond = fam.load(p, root)
    sched_cfg = load_scheduler_config(src)
    pruned = core.train_or_resume(pruned, images, DDPMScheduler.from_config(sched_cfg), spec,
                                  core.work_dir(root, f"prune-experts-{k}", key), device=device, progress=progress,
                                  desc=f"pruned expert {k} [{lo}, {hi})", on_progress=on_progress,
                                  teacher=_teacher(root, device)[0] if c.distill else None,
                                  mixed_precision=p.project.mixed_precision, **train_conditions(cond))
    if not is_main_process():  # under `accelerate launch`: the main process writes the outputs
        return out
    meta = {"key": key, "expert": k, "interval": [lo, hi], "config": cfg.to_json(), "macs": macs,
            "macs_teacher": space.full_macs(), "training_options": spec_json(spec), "params": to_dict(c)}
    save_model(pruned.cpu(), out, scheduler_config=sched_cfg, meta=meta)
    return out


def assemble_mixture(p: Params, root: Path) -> dict:
    """Put the pruned experts and the boundaries into one checkpoint; write the summary."""
    rdoc = read_json(safe_subpath(root, ROUTER) / "router.json")
    k_count = len(rdoc["intervals"])
    experts, macs, fam = [], [], expert_family(p)
    for k in range(k_count):
        path = _expert_dir(root, PRUNED, k)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path}: missing (run prune-experts for every expert first)")
        experts.append(load_model(path))
        with fam.bare_calls(root, experts[-1]):
            macs.append(unet_macs(experts[-1], _shape(experts[-1])))
    steps = rdoc["steps_per_expert"]
    teacher_traj = rdoc["macs_teacher"] * sum(steps)
    traj = mixture_macs(macs, steps)
    summary = {
        "boundaries": rdoc["boundaries"],
        "steps_per_expert": steps,
        "macs_per_expert": macs,
        "macs_teacher": rdoc["macs_teacher"],
        "trajectory_macs": traj,
        "trajectory_macs_ratio": traj / teacher_traj,
        "macs_share": [m * n / traj if traj else 0.0 for m, n in zip(macs, steps)],
        "params_per_expert": [sum(q.numel() for q in e.parameters()) for e in experts],
        "budget": rdoc["budget"],
    }
    mixture = ExpertMixtureModel(experts, rdoc["boundaries"])
    out = safe_subpath(root, MIXTURE)
    teacher_meta = read_config(safe_subpath(root, core.TEACHER))["meta"]
    save_mixture(mixture, out, scheduler_config=load_scheduler_config(_expert_dir(root, PRUNED, 0)),
                 meta=summary | {"params": {s: to_dict(p.section(s)) for s in ("intervals", "experts", "router",
                                                                                 "prune_experts")}}
                 # a conditional family's model records its conditioning (the loader's classes, guidance)
                 | {k: teacher_meta[k] for k in ("family", "conditioning") if k in teacher_meta})
    write_json(safe_subpath(root, SUMMARY), summary)
    return summary


@stage("prune-experts")
def run_prune_experts(p: Params, root: Path, progress: bool = True, on_progress: core.ProgressFn | None = None,
                      expert: Optional[int] = None, **_: Any) -> dict:
    """Prune and fine-tune every expert (``expert=k``: only expert ``k``, no mixture); then, with
    ``expert=None``, assemble the mixture (experts already up to date are not redone)."""
    rdoc_path = safe_subpath(root, ROUTER) / "router.json"
    if not rdoc_path.exists():
        raise ConfigError(f"{rdoc_path}: missing (run the router stage first)")
    k_count = len(read_json(rdoc_path)["intervals"])
    outs = [prune_expert(p, root, k, progress=progress, on_progress=on_progress) for k in _which(expert, k_count)]
    if not is_main_process():
        return follower_result("prune-experts")
    result: dict[str, Any] = {"experts": [str(o) for o in outs]}
    if expert is None:
        summary = assemble_mixture(p, root)
        result |= {"mixture": str(safe_subpath(root, MIXTURE)),
                   "trajectory_macs_ratio": summary["trajectory_macs_ratio"]}
    return result
