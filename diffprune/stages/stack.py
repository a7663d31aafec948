"""The ``stack`` stage: the three methods and fewer steps under one MACs budget (:mod:`diffprune.pruning.stack`).

Reuses the single methods' artifacts: the teacher, Diff-Pruning's pruned (``models/taylor``) and
fine-tuned (``models/finetune``) nets, the intervals (``models/intervals``). It makes the two
mixtures (``prune-experts``: the pruned net copied per interval; ``experts-prune``: the teacher
pruned per interval), each expert fine-tuned on its interval for ``1 / K`` of Diff-Pruning's
fine-tuning steps (equal training), then for ``stack.budget`` trains a DiP-GO schedule for every
candidate split that needs one and keeps the split with the best score on
``stack.validation_samples`` noises (``stack.fidelity``: paired PSNR to the teacher, or the paired
distance in the FID extractor's space; or, not paired, the validation FID). Writes
``models/stack/`` (``model/``, ``schedule.json`` when the split skips blocks, ``stack.json``: the
chosen split and every candidate). Every training run
is resumable and keyed by its inputs, so a rerun retrains nothing that did not change.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..config import ConfigError, Params, resolve_device, to_dict
from ..data import load_split
from ..io import atomic_path, write_json
from ..metrics.cost import unet_macs
from ..models.checkpoint import load_model, load_scheduler_config, read_config, save_model
from ..models.unet import sampling_scheduler
from ..pruning.dipgo import Schedule, save_heatmap, train_pruner
from ..pruning.dipgo.routed import switch_steps
from ..metrics.fid import get_extractor
from ..pruning.stack import (MACS_TOLERANCE, ORDERS, VALIDATION_SEED, Split, candidate_splits, choose,
                             interval_ranges, mixture_of, rank_key, stacked_denoiser, validation_scores)
from ..pruning.taylor import finetune_spec, prune_unet
from ..sampling import ModelDenoiser, sample
from . import safe_subpath, stage
from .experts import _read_intervals as read_intervals  # one reader of models/intervals
from .core import DATASET, FEATURES, TEACHER, ProgressFn, data_shape, train_or_resume, work_dir

log = logging.getLogger(__name__)

STACK = "models/stack"
PRUNED, FINETUNED = "models/taylor", "models/finetune"



def _load(root: Path, rel: str, what: str, device) -> nn.Module:
    path = safe_subpath(root, rel)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: missing (run the {what} stage first)")
    return load_model(path, device).eval()


def _train_experts(p: Params, root: Path, name: str, experts: list[nn.Module], boundaries: list[int],
                   images: torch.Tensor, scheduler, device, progress: bool, teacher: nn.Module) -> nn.Module:
    """Each expert fine-tuned on its interval for ``1 / K`` of the fine-tuning steps (distilled from
    ``teacher`` by ``finetune.distill``); the mixture."""
    spec = finetune_spec(p.finetune, p.teacher.steps)
    ranges = interval_ranges(boundaries, scheduler.config.num_train_timesteps)
    per = dataclasses.replace(spec, steps=max(1, math.ceil(spec.steps / len(ranges))))
    tuned = []
    for k, (expert, (lo, hi)) in enumerate(zip(experts, ranges)):
        ks = dataclasses.replace(per, t_min=lo, t_max=hi)
        work = work_dir(root, f"stack-{name}-{k}", p.finetune, ks, weights_key(expert))  # keyed by its start
        tuned.append(train_or_resume(expert.train(), images, scheduler, ks, work, device=device, progress=progress,
                                     desc=f"stack {name} expert {k} [{lo}, {hi})",
                                     teacher=teacher if ks.distill else None))
    return mixture_of(tuned, boundaries)


def make_mixture(p: Params, root: Path, order: str, teacher: nn.Module, pruned: nn.Module, boundaries: list[int],
                 images: torch.Tensor, scheduler, device, progress: bool = True, passes: Optional[int] = None) -> nn.Module:
    """The mixture of ``order`` (:data:`~diffprune.pruning.stack.ORDERS`), its experts fine-tuned:
    ``prune-experts`` copies ``pruned`` (one Diff-Pruning selection) per interval; ``experts-prune``
    prunes ``teacher`` per interval at ``p.taylor``'s ratio, the gradients accumulated from the
    interval's first timestep over at most ``passes`` timesteps (Diff-Pruning's own count: its
    ``timesteps_used``; the threshold rarely stops inside a noisy interval, whose every timestep
    would otherwise cost a gradient pass)."""
    if order == "prune-experts":
        experts = [copy.deepcopy(pruned) for _ in range(len(boundaries) + 1)]
    elif order == "experts-prune":
        g = torch.Generator().manual_seed(p.taylor.seed)
        batch = images[torch.randperm(len(images), generator=g)[: p.taylor.batch_size]]
        cfg = p.taylor if not passes else dataclasses.replace(p.taylor, max_timesteps=min(p.taylor.max_timesteps, passes))
        experts = [prune_unet(teacher, scheduler, batch, cfg, device=device, timesteps=r)[0]
                   for r in interval_ranges(boundaries, scheduler.config.num_train_timesteps)]
    else:
        raise ConfigError(f"stack order {order!r}: expected one of {', '.join(ORDERS)}")
    return _train_experts(p, root, order, experts, boundaries, images, scheduler, device, progress, teacher)


def build_nets(p: Params, root: Path, device, progress: bool = True) -> dict[str, nn.Module]:
    """The base networks of ``stack.nets``: the teacher, Diff-Pruning's fine-tuned net, the two mixtures."""
    teacher = _load(root, TEACHER, "teacher", device)
    scheduler = DDPMScheduler.from_config(load_scheduler_config(safe_subpath(root, TEACHER)))
    images, _ = load_split(safe_subpath(root, DATASET), "train")
    nets: dict[str, nn.Module] = {}
    for name in p.stack.nets:
        if name == "teacher":
            nets[name] = teacher
        elif name == "diff-pruning":
            nets[name] = _load(root, FINETUNED, "finetune", device)
        else:  # a mixture, pruned at the taylor stage's ratio (the one it found for a MACs target)
            pruned, meta = _load(root, PRUNED, "taylor", device), read_config(safe_subpath(root, PRUNED))["meta"]
            pt = dataclasses.replace(p, taylor=dataclasses.replace(p.taylor, ratio=meta.get("ratio_found", p.taylor.ratio)))
            bounds = [int(b) for b in read_intervals(root)["boundaries"]]
            nets[name] = make_mixture(pt, root, name, teacher, pruned, bounds, images, scheduler, device, progress,
                                      passes=meta.get("timesteps_used"))
    return nets


def net_ratio(net: nn.Module, teacher_macs: int, shape) -> float:
    """Per-step MACs of ``net`` (a mixture: one expert's; they are pruned alike) over the teacher's."""
    return unet_macs(getattr(net, "experts", [net])[0], shape) / teacher_macs


def weights_key(net: nn.Module) -> str:
    """SHA-256 of ``net``'s parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, v in sorted(net.state_dict().items()):
        h.update(f"{name}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_schedule(p: Params, root: Path, net: nn.Module, split: Split, scheduler_config: dict, device,
                   progress: bool = True) -> Schedule:
    """The DiP-GO schedule of ``split`` over ``net`` (its switch steps forced whole for a mixture)."""
    sched = sampling_scheduler(scheduler_config, p.evaluate.sampler)
    sched.set_timesteps(split.steps)
    forced = switch_steps(net.boundaries, sched.timesteps.tolist()) if hasattr(net, "boundaries") else []
    # the post-processing lands within 2% of the skip ratio (or raises): the split's MACs within 2% of the budget
    cfg = dataclasses.replace(p.dipgo, target_ratio=split.skip_ratio,
                              tolerance=min(p.dipgo.tolerance, MACS_TOLERANCE * split.skip_ratio))
    weights = weights_key(net)  # the net's own weights: a retrained net never resumes an old schedule
    schedule, _ = train_pruner(net, scheduler_config, cfg, steps=split.steps, sample_shape=data_shape(p), device=device,
                               progress=progress, sampler=p.evaluate.sampler, forced_steps=forced,
                               work_dir=work_dir(root, "stack-dipgo", cfg, split.to_json(), weights))
    return schedule


@dataclasses.dataclass
class Searched:
    """What :func:`search` found: the best split and its schedule, every candidate's record (best
    first), each split and schedule by name, the nets' per-step MACs ratios."""

    best: Split
    schedule: Optional[Schedule]
    rows: list[dict]
    splits: dict[str, Split]
    schedules: dict[str, Optional[Schedule]]
    net_ratios: dict[str, float]

    def best_of(self, prefix: str) -> tuple[Split, Optional[Schedule], list[dict]]:
        """The best split whose net's name starts with ``prefix``, its schedule, and those rows."""
        rows = [r for r in self.rows if r["net"].startswith(prefix)]
        if not rows:
            raise ValueError(f"no candidate split uses a net named {prefix}*")
        return self.splits[rows[0]["name"]], self.schedules[rows[0]["name"]], rows

    def best_by(self, fidelity: str) -> tuple[Split, Optional[Schedule], list[dict]]:
        """The best split by another criterion of ``stack.fidelity``, its schedule, the rows re-ranked."""
        rows = [{**r, "chosen_by": fidelity} for r in sorted(self.rows, key=rank_key(fidelity))]
        return self.splits[rows[0]["name"]], self.schedules[rows[0]["name"]], rows


def search(p: Params, root: Path, nets: dict[str, nn.Module], device, progress: bool = True,
           on_progress: Optional[ProgressFn] = None) -> Searched:
    """Every candidate split of ``stack.budget``, scored on the validation noises by PSNR and by the
    paired distance in the FID extractor's space, and by FID when ``stack.validation_fid_samples > 1``
    (``on_progress``: called ``(done, total)`` after each); the best one by ``stack.fidelity``."""
    teacher = nets.get("teacher") or _load(root, TEACHER, "teacher", device)
    scheduler_config = load_scheduler_config(safe_subpath(root, TEACHER))
    shape, T = data_shape(p), p.evaluate.steps
    teacher_macs = unet_macs(teacher, shape)
    ratios = {name: net_ratio(net, teacher_macs, shape) for name, net in nets.items()}
    sched = sampling_scheduler(scheduler_config, p.evaluate.sampler)
    reference = sample(ModelDenoiser(teacher), sched, num_images=p.stack.validation_samples, sample_shape=shape,
                       steps=T, seed=VALIDATION_SEED, batch_size=p.evaluate.batch_size, device=device)
    extractor = get_extractor(safe_subpath(root, FEATURES), p.evaluate.inception_weights, device)
    ref_feats = extractor.fn(reference)
    fid_n = p.stack.validation_fid_samples
    train_feats = extractor.fn(load_split(safe_subpath(root, DATASET), "train")[0]) if fid_n > 1 else None
    scored, schedules = [], {}
    splits = candidate_splits(p.stack.budget, ratios, p.stack.skip_ratios, T, min_steps=p.stack.min_steps,
                              tolerance=MACS_TOLERANCE)
    for done, split in enumerate(splits, 1):
        if on_progress is not None:
            on_progress(done - 1, len(splits))
        schedule = None
        if split.skip_ratio < 1.0:
            try:
                schedule = split_schedule(p, root, nets[split.net], split, scheduler_config, device, progress)
            except ValueError as e:  # the schedule cannot reach this skip ratio (coarse blocks, forced steps)
                log.warning("stack: %s dropped: %s", split.name, e)
                continue
        achieved = split.net_ratio * (schedule.macs_ratio if schedule is not None else 1.0) * split.steps / T
        v = validation_scores(stacked_denoiser(nets[split.net], schedule), sched, reference, split.steps,
                              features=extractor.fn, reference_features=ref_feats, train_features=train_feats,
                              fid_samples=fid_n, batch_size=p.evaluate.batch_size, device=device)
        means = {"validation_psnr": float(v["psnr"].mean()),
                 "validation_feature_distance": float(v["feature_distance"].mean()),
                 **({"validation_fid": float(v["fid"])} if "fid" in v else {})}
        scored.append((split, achieved, means))
        schedules[split.name] = schedule
        log.info("stack: %s at %.3f of the teacher's MACs: validation %s", split.name, achieved,
                 ", ".join(f"{k.removeprefix('validation_')} {v:.4g}" for k, v in means.items()))
    best, rows = choose(scored, by=p.stack.fidelity)
    return Searched(best, schedules[best.name], rows, {c.name: c for c, _, _ in scored}, schedules, ratios)


@stage("stack")
def run_stack(p: Params, root: Path, progress: bool = True, on_progress: Optional[ProgressFn] = None,
              **_: Any) -> dict:
    """Build the base networks, search the split of ``stack.budget``, write ``models/stack``."""
    device = resolve_device(p.project.device)
    t0 = time.time()
    nets = build_nets(p, root, device, progress)
    found = search(p, root, nets, device, progress, on_progress)
    best, schedule, rows, ratios = found.best, found.schedule, found.rows, found.net_ratios
    scheduler_config = load_scheduler_config(safe_subpath(root, TEACHER))
    # stack.json is part of the registered model (its content hash): no timings in it
    doc = {"budget": p.stack.budget, "chosen": rows[0], "schedule": None if schedule is None else schedule.to_json(),
           "candidates": rows, "net_ratios": ratios, "teacher_steps": p.evaluate.steps, "config": to_dict(p.stack)}
    out = safe_subpath(root, STACK)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        save_model(nets[best.net].cpu(), tmp / "model", scheduler_config=scheduler_config,
                   meta={"source": "stack", "net": best.net, "seconds": time.time() - t0})
        if schedule is not None:
            save_heatmap(schedule, tmp / "heatmap.png", title=f"stack: {best.name}")
        write_json(tmp / "stack.json", doc)
    return {"stack": str(out), "chosen": best.name, "macs_ratio": rows[0]["macs_ratio"],
            "chosen_by": p.stack.fidelity,
            **{k: v for k, v in rows[0].items() if k.startswith("validation_")}}

