"""Diff-Pruning stages: ``taylor`` (prune the teacher) then ``finetune`` (recover quality)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import Params, resolve_device, to_dict
from ..data import load_split
from ..distributed import follower_result, is_main_process
from ..io import write_json
from ..models.checkpoint import load_model, load_scheduler_config, read_config, save_model
from ..pruning.taylor import finetune_spec, prune_unet, search_ratio
from ..training import spec_json
from . import safe_subpath, stage
from .core import DATASET, TEACHER, ProgressFn, train_or_resume, work_dir

PRUNED = "models/taylor"
FINETUNED = "models/finetune"

def _scheduler(ckpt: Path):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(load_scheduler_config(ckpt))


@stage("taylor")
def run_taylor(p: Params, root: Path, **_: Any) -> dict:
    """Prune the teacher with the configured importance and ratio (or the ratio whose MACs meet
    ``taylor.target_macs_ratio``, recorded as ``ratio_found``); writes models/taylor."""
    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, TEACHER)
    teacher = load_model(teacher_dir, device)
    scheduler = _scheduler(teacher_dir)
    images, _ = load_split(safe_subpath(root, DATASET), "train")
    g = torch.Generator().manual_seed(p.taylor.seed)
    batch = images[torch.randperm(len(images), generator=g)[: p.taylor.batch_size]]
    cfg, search = p.taylor, {}
    if cfg.target_macs_ratio is not None:  # bisect the channel ratio to the MACs target (2% relative)
        found = search_ratio(teacher, batch, cfg, cfg.target_macs_ratio, device=device)
        cfg = dataclasses.replace(cfg, ratio=found.ratio)
        search = {"target_macs_ratio": found.target, "ratio_found": found.ratio, "target_met": found.within}
    pruned, report = prune_unet(teacher, scheduler, batch, cfg, device=device)
    report = ({k: v for k, v in report.items() if k != "losses"} | search
              | {"macs_ratio": report["macs_after"] / report["macs_before"], "config": to_dict(p.taylor)})
    out = save_model(pruned.cpu(), safe_subpath(root, PRUNED), scheduler_config=dict(scheduler.config), meta=report)
    write_json(safe_subpath(root, "models/taylor-report.json"), report)
    return {"pruned": str(out), "params_after": report["params_after"], "macs_after": report["macs_after"]}


@stage("finetune")
def run_finetune(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                 **_: Any) -> dict:
    """Fine-tune the pruned net (EMA, resumable) for ``finetune.fraction`` of the teacher's steps."""
    device = resolve_device(p.project.device)
    pruned_dir = safe_subpath(root, PRUNED)
    model = load_model(pruned_dir, device).train()
    scheduler = _scheduler(pruned_dir)
    images, _ = load_split(safe_subpath(root, DATASET), "train")
    spec = finetune_spec(p.finetune, p.teacher.steps)
    # the working folder is keyed by the pruned weights too: a new pruning never resumes an old run
    work = work_dir(root, "finetune", p.finetune, read_config(pruned_dir)["sha256"])
    teacher = load_model(safe_subpath(root, TEACHER), device) if spec.distill else None
    model = train_or_resume(model, images, scheduler, spec, work, device=device, progress=progress,
                            desc="finetune", on_progress=on_progress, teacher=teacher,
                            mixed_precision=p.project.mixed_precision)
    if not is_main_process():  # under `accelerate launch`: the main process writes the outputs
        return follower_result("finetune")
    meta = read_config(pruned_dir)["meta"] | {"finetune": spec_json(spec)}
    out = save_model(model.cpu(), safe_subpath(root, FINETUNED), scheduler_config=dict(scheduler.config), meta=meta)
    return {"finetuned": str(out), "steps": spec.steps}
