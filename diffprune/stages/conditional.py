"""The stage bodies every conditional latent family shares (``stages/dit.py``, ``sd.py``, ``ldm.py``).

A family module supplies what differs (its model, its training call, its pruning function, its
DiP-GO graph and its denoiser); these functions do the rest the same way for every family: the
teacher checkpoint and its preview, Diff-Pruning and the fine-tune, DiP-GO on guided, conditioned
trajectories (row i of the noise pool is condition ``i % n``, as the evaluation draws them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, Params, resolve_device, to_dict
from ..distributed import follower_result, is_main_process
from ..io import write_json
from ..metrics.evaluate import save_grid
from ..models.checkpoint import load_model, load_scheduler_config, read_config, save_model
from ..models.unet import sampling_scheduler
from ..sampling import sample
from ..targets import conditioning
from ..training import ConditionalCall, spec_json
from . import safe_subpath
from .core import TEACHER, ProgressFn, train_or_resume, work_dir
from .latent import load_latents
from .taylor import FINETUNED, PRUNED

MACS_TOLERANCE = 0.02  # taylor.target_macs_ratio is met within 2% (relative), as search_ratio's default

PruneFn = Callable[[Any, Any, torch.Tensor, torch.Tensor, Any], tuple[Any, dict]]
"""``prune(teacher, train_scheduler, latents, labels, taylor_cfg) -> (pruned, report)`` (a family's Diff-Pruning)."""
MacsAt = Callable[[Any, torch.Tensor, torch.Tensor, float], float]
"""``macs_at(teacher, latents (1, ...), labels (1,), ratio) -> pruned / teacher MACs`` of a magnitude
probe at ``ratio``: what the search for ``taylor.target_macs_ratio`` bisects (a family's own pruning)."""


def unet_macs_at(bind: Callable[[Any, torch.Tensor], Any]) -> MacsAt:
    """:data:`MacsAt` of a UNet family pruned by :func:`~diffprune.pruning.taylor.prune_unet` on
    ``bind(teacher, labels)`` (the teacher with its conditions bound: captions, labels)."""
    def macs_at(teacher, latents: torch.Tensor, labels: torch.Tensor, ratio: float) -> float:
        from ..config import TaylorConfig
        from ..pruning.taylor import prune_unet

        cfg = TaylorConfig(importance="magnitude", batch_size=1, ratio=ratio)
        rep = prune_unet(bind(teacher, labels), None, latents, cfg, device=latents.device)[1]
        return rep["macs_after"] / rep["macs_before"]

    return macs_at


def latent_shape(model) -> tuple[int, int, int]:
    c = model.config
    return (int(c.in_channels), int(c.sample_size), int(c.sample_size))


def save_teacher(p: Params, root: Path, family: str, model, scheduler_config: dict, meta: dict,
                 make_denoiser: Callable[[Any], Any], device) -> dict:
    """models/teacher (with the family and its conditioning in the meta) and models/teacher-samples.png
    (64 samples of ``make_denoiser(model)``: conditions cycling along the rows)."""
    out = save_model(model.cpu(), safe_subpath(root, TEACHER), scheduler_config=scheduler_config,
                     meta=meta | {"family": family})
    model = model.to(device)
    den = make_denoiser(model)
    sched = sampling_scheduler(dict(load_scheduler_config(out)), p.evaluate.sampler)
    x = sample(den, sched, num_images=64, sample_shape=latent_shape(model), steps=p.evaluate.steps,
               seed=p.project.seed, device=device)
    save_grid(x, safe_subpath(root, "models/teacher-samples.png"), nrow=max(8, den.num_classes))
    return {"teacher": str(out), "seconds": meta.get("train_seconds")}


def prune(p: Params, root: Path, family: str, fn: PruneFn, macs_at: MacsAt | None = None) -> dict:
    """Diff-Pruning of the family's teacher on its latents (``fn``), at ``taylor.ratio`` or at the
    ratio whose MACs meet ``taylor.target_macs_ratio`` (bisected on ``macs_at``, recorded as
    ``ratio_found``); writes models/taylor and models/taylor-report.json."""
    import dataclasses

    from diffusers import DDPMScheduler

    from ..pruning.taylor import bisect_ratio

    cfg, search = p.taylor, {}
    if cfg.target_macs_ratio is not None and macs_at is None:
        raise ConfigError(f"taylor.target_macs_ratio = {cfg.target_macs_ratio!r}: the ratio search is not "
                          f"implemented for teacher.family = {family!r} yet; set taylor.ratio instead")
    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, TEACHER)
    teacher = load_model(teacher_dir, device)
    latents, labels = (v.to(device) for v in load_latents(root))
    scheduler = DDPMScheduler.from_config(load_scheduler_config(teacher_dir))
    if macs_at is not None and cfg.target_macs_ratio is not None:  # bisect the ratio to the MACs target (2%)
        found = bisect_ratio(lambda r: macs_at(teacher, latents[:1], labels[:1], r), cfg.target_macs_ratio)
        cfg = dataclasses.replace(cfg, ratio=found.ratio)
        search = {"target_macs_ratio": found.target, "ratio_found": found.ratio, "target_met": found.within}
    pruned, report = fn(teacher, scheduler, latents, labels, cfg)
    if search:  # met or not by the pruned model's own MACs: a family's scores may move them off the probe's
        # (the text-to-image UNet: 0.709 by the magnitude probe, 0.716 after Diff-Pruning, at target 0.7)
        final = report["macs_after"] / report["macs_before"]
        search |= {"probe_macs_ratio": found.macs_ratio,
                   "target_met": abs(final - found.target) <= MACS_TOLERANCE * found.target}
    report = ({k: v for k, v in report.items() if k != "losses"} | search
              | {"macs_ratio": report["macs_after"] / report["macs_before"], "config": to_dict(p.taylor)})
    meta = report | {"family": family, "conditioning": conditioning(teacher_dir)}
    out = save_model(pruned.cpu(), safe_subpath(root, PRUNED), scheduler_config=dict(scheduler.config), meta=meta)
    write_json(safe_subpath(root, "models/taylor-report.json"), report)
    return {"pruned": str(out), "params_after": report["params_after"], "macs_after": report["macs_after"]}


def finetune(p: Params, root: Path, family: str, call: ConditionalCall, progress: bool = True,
             on_progress: ProgressFn | None = None, key: Any = None) -> dict:
    """Fine-tune the pruned model on the latents with their conditions (``call``) for
    ``finetune.fraction`` of the teacher's steps (EMA, resumable; distillation with ``finetune.distill``).
    ``key``: what else defines the run (the caption dropout): a change never resumes an old run."""
    from diffusers import DDPMScheduler

    from ..pruning.taylor import finetune_spec

    device = resolve_device(p.project.device)
    pruned_dir = safe_subpath(root, PRUNED)
    model = load_model(pruned_dir, device).train()
    scheduler = DDPMScheduler.from_config(load_scheduler_config(pruned_dir))
    latents, labels = load_latents(root)
    spec = finetune_spec(p.finetune, p.teacher.steps)
    work = work_dir(root, f"finetune-{family}", p.finetune, read_config(pruned_dir)["sha256"],
                    *(() if key is None else (key,)))
    teacher = load_model(safe_subpath(root, TEACHER), device) if spec.distill else None
    model = train_or_resume(model, latents, scheduler, spec, work, device=device, progress=progress,
                            desc=f"finetune ({family})", on_progress=on_progress, teacher=teacher, conditions=labels,
                            call=call, mixed_precision=p.project.mixed_precision)
    if not is_main_process():
        return follower_result("finetune")
    meta = read_config(pruned_dir)["meta"] | {"finetune": spec_json(spec)}
    out = save_model(model.cpu(), safe_subpath(root, FINETUNED), scheduler_config=dict(scheduler.config), meta=meta)
    return {"finetuned": str(out), "steps": spec.steps}


def dipgo(p: Params, root: Path, family: str, make_graph: Callable[[Any, dict, Any], Any], progress: bool = True,
          on_progress: Any = None) -> dict:
    """DiP-GO on the family's teacher: ``make_graph(teacher, conditioning, device)`` is its conditioned
    block graph (guidance, conditions and the VAE's decoding inside); writes models/dipgo."""
    from ..pruning.dipgo import train_pruner
    from .dipgo import write_schedule

    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, TEACHER)
    teacher = load_model(teacher_dir, device)
    graph = make_graph(teacher, conditioning(teacher_dir), device)
    t0 = time.time()
    schedule, info = train_pruner(graph, load_scheduler_config(teacher_dir), p.dipgo, steps=p.evaluate.steps,
                                  sample_shape=latent_shape(teacher), device=device, progress=progress,
                                  sampler=p.evaluate.sampler, on_progress=on_progress,
                                  work_dir=work_dir(root, f"dipgo-{family}", p.dipgo, p.evaluate.steps,
                                                    p.evaluate.sampler, read_config(teacher_dir)["sha256"]))
    return write_schedule(p, root, schedule, info, time.time() - t0)


def train_teacher(p: Params, root: Path, family: str, model, call: ConditionalCall, latents: torch.Tensor,
                  labels: torch.Tensor, progress: bool = True, on_progress: ProgressFn | None = None,
                  steps_offset: int = 0):
    """Train the family's fresh ``model`` on the ``latents`` with their ``labels`` (EMA, resumable:
    keyed by the teacher's and the family's params and the latents file); ``(model, scheduler
    config, meta)``, or ``None`` on a follower process. ``steps_offset``: of the noise schedule."""
    from .core import teacher_spec
    from .latent import latents_sha, train_scheduler

    device = resolve_device(p.project.device)
    sha = latents_sha(root)
    scheduler, spec = train_scheduler(p, steps_offset), teacher_spec(p)
    work = work_dir(root, f"teacher-{family}", p.teacher, p.section(family), sha)
    model = train_or_resume(model, latents, scheduler, spec, work, device=device, progress=progress,
                            desc=f"teacher ({family})", on_progress=on_progress, conditions=labels, call=call,
                            mixed_precision=p.project.mixed_precision)
    if not is_main_process():
        return None
    meta = {"source": "trained", "training_options": spec_json(spec), "params": to_dict(p.teacher),
            family: to_dict(p.section(family))}
    return model, dict(scheduler.config), meta


def refuse_unsupported(family: str, names: tuple[str, ...]) -> None:
    """Register, as ``family``'s version of each stage in ``names``, one that refuses by name."""
    from . import stage

    def refuse(name: str):
        def run(p: Params, root: Path, **_: Any) -> dict:
            raise ConfigError(f"stage {name}: not available for teacher.family = {family!r} yet (its workspace "
                              f"runs data, latents, features, teacher, taylor, finetune, dipgo, evaluate, "
                              f"register, report)")

        return run

    for name in names:
        stage(name, family=family)(refuse(name))


__all__ = ["dipgo", "refuse_unsupported", "finetune", "latent_shape", "prune", "save_teacher", "train_teacher"]
