"""The class-conditional DiT family's stages (``teacher.family: dit``): the teacher, Diff-Pruning and
DiP-GO on a ``DiTTransformer2DModel`` denoising the latents of the ``latents`` stage's VAE.

The common stages (data, features, latents, evaluate, register, report) run as they are: a DiT
model is sampled through :func:`diffprune.sampling.sample` as a :class:`~diffprune.models.dit.ClassCycle`
(image i of a set is class ``i % num_classes``; the VAE decodes the final latents), so FID, the
paired fidelity to the teacher, MACs (guidance doubling counted) and latency are the house's. Every
model's checkpoint records its ``conditioning`` (class count, guidance scale), and loads back into
diffusers' ``DiTPipeline`` (:func:`diffprune.models.dit.dit_pipeline`). The timestep-expert and stack stages
have no DiT version yet: a DiT workspace's ``dvc.yaml`` leaves them out (:data:`UNSUPPORTED`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from ..config import ConfigError, Params, resolve_device, to_dict
from ..distributed import follower_result, is_main_process
from ..models.checkpoint import load_model, load_scheduler_config, read_config, save_model
from ..models.dit import ClassCycle, GuidedDiT, build_dit, dit_call
from ..models.unet import sampling_scheduler
from ..metrics.evaluate import save_grid
from ..sampling import sample
from ..targets import conditioning, load_vae
from ..training import spec_json
from . import safe_subpath, stage
from .core import FAMILY_KINDS, FAMILY_PATHS, TEACHER, ProgressFn, teacher_spec, train_or_resume, work_dir
from .latent import AUTOENCODER, LATENTS, load_latents
from .taylor import FINETUNED, PRUNED

FAMILY = "dit"
FAMILY_KINDS[FAMILY] = {"unet": "dit", "dipgo": "dit-dipgo"}  # no expert mixture of DiTs yet
FAMILY_PATHS[FAMILY] = {"vae": AUTOENCODER}
# the stages a DiT workspace's dvc.yaml leaves out (and, with them, the outputs only they make)
UNSUPPORTED = ("intervals", "experts", "router", "prune-experts", "stack", "evaluate@experts", "register@experts",
               "evaluate@stack", "register@stack")


def train_scheduler(p: Params) -> DDPMScheduler:
    """The DDPM noise schedule of the teacher; latents are unbounded, so no clipping of x_0."""
    return DDPMScheduler(num_train_timesteps=p.teacher.num_train_timesteps, beta_schedule=p.teacher.beta_schedule,
                         clip_sample=False)


def _conditioning(p: Params, labels: torch.Tensor) -> dict:
    return {"num_classes": int(labels.max()) + 1, "guidance_scale": float(p.dit.guidance_scale)}


def _preview(model, cond: dict, root: Path, p: Params, device) -> None:
    """models/teacher-samples.png: 64 samples, classes cycling 0 .. n-1 along the rows."""
    den = ClassCycle(GuidedDiT(model, list(range(cond["num_classes"])), cond["guidance_scale"]),
                     cond["num_classes"], load_vae(safe_subpath(root, AUTOENCODER), device))
    sched = sampling_scheduler(dict(load_scheduler_config(safe_subpath(root, TEACHER))), p.evaluate.sampler)
    c = model.config
    x = sample(den, sched, num_images=64, sample_shape=(c.in_channels, c.sample_size, c.sample_size),
               steps=p.evaluate.steps, seed=p.project.seed, device=device)
    save_grid(x, safe_subpath(root, "models/teacher-samples.png"), nrow=max(8, cond["num_classes"]))


@stage("teacher", family=FAMILY)
def run_teacher(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                **_: Any) -> dict:
    """Train the DiT on the latents with their labels (EMA, resumable), or load ``teacher.pretrained``'s
    transformer (a ``DiTPipeline``; the latents stage then used its VAE)."""
    device = resolve_device(p.project.device)
    latents, labels = load_latents(root)
    cond = _conditioning(p, labels)
    t0 = time.time()
    if p.teacher.pretrained:
        from ..models.dit import load_dit

        pipe = load_dit(p.teacher.pretrained)
        model, scheduler_config = pipe.transformer, dict(pipe.scheduler.config)
        meta: dict[str, Any] = {"source": p.teacher.pretrained}
    else:
        d = p.dit
        model = build_dit(d.num_layers, d.num_heads, d.head_dim, d.patch_size, latents.shape[1:], seed=p.teacher.seed)
        scheduler = train_scheduler(p)
        spec = teacher_spec(p)
        work = work_dir(root, "teacher-dit", p.teacher, p.dit, _sha(root))
        model = train_or_resume(model, latents, scheduler, spec, work, device=device, progress=progress,
                                desc="teacher (DiT)", on_progress=on_progress, conditions=labels, call=dit_call,
                                mixed_precision=p.project.mixed_precision)
        if not is_main_process():
            return follower_result("teacher")
        scheduler_config = dict(scheduler.config)
        meta = {"source": "trained", "training_options": spec_json(spec), "params": to_dict(p.teacher),
                "dit": to_dict(p.dit)}
    meta |= {"train_seconds": time.time() - t0, "family": FAMILY, "conditioning": cond}
    out = save_model(model.cpu(), safe_subpath(root, TEACHER), scheduler_config=scheduler_config, meta=meta)
    _preview(model.to(device), cond, root, p, device)
    return {"teacher": str(out), "seconds": meta["train_seconds"]}


def _sha(root: Path) -> str:
    """The latents file's identity (a new VAE or dataset never resumes an old run)."""
    from ..io import sha256_file

    return sha256_file(safe_subpath(root, LATENTS) / "latents.safetensors")


@stage("taylor", family=FAMILY)
def run_taylor(p: Params, root: Path, **_: Any) -> dict:
    """Diff-Pruning of the DiT (:func:`diffprune.pruning.dit_taylor.prune_dit`): ``taylor.ratio`` of every
    block's attention heads and MLP hidden channels; writes models/taylor."""
    from ..io import write_json
    from ..pruning.dit_taylor import prune_dit

    if p.taylor.target_macs_ratio is not None:
        raise ConfigError(f"taylor.target_macs_ratio = {p.taylor.target_macs_ratio!r}: the ratio search is not "
                          f"implemented for teacher.family = 'dit' yet; set taylor.ratio instead")
    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, TEACHER)
    teacher = load_model(teacher_dir, device)
    latents, labels = load_latents(root)
    scheduler = DDPMScheduler.from_config(load_scheduler_config(teacher_dir))
    pruned, report = prune_dit(teacher, scheduler, latents.to(device), labels.to(device), p.taylor)
    report = ({k: v for k, v in report.items() if k != "losses"}
              | {"macs_ratio": report["macs_after"] / report["macs_before"], "config": to_dict(p.taylor)})
    meta = report | {"family": FAMILY, "conditioning": conditioning(teacher_dir)}
    out = save_model(pruned.cpu(), safe_subpath(root, PRUNED), scheduler_config=dict(scheduler.config), meta=meta)
    write_json(safe_subpath(root, "models/taylor-report.json"), report)
    return {"pruned": str(out), "params_after": report["params_after"], "macs_after": report["macs_after"]}


@stage("finetune", family=FAMILY)
def run_finetune(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None,
                 **_: Any) -> dict:
    """Fine-tune the pruned DiT on the latents with their labels for ``finetune.fraction`` of the
    teacher's steps (EMA, resumable; distillation from the teacher with ``finetune.distill``)."""
    from ..pruning.taylor import finetune_spec

    device = resolve_device(p.project.device)
    pruned_dir = safe_subpath(root, PRUNED)
    model = load_model(pruned_dir, device).train()
    scheduler = DDPMScheduler.from_config(load_scheduler_config(pruned_dir))
    latents, labels = load_latents(root)
    spec = finetune_spec(p.finetune, p.teacher.steps)
    work = work_dir(root, "finetune-dit", p.finetune, read_config(pruned_dir)["sha256"])
    teacher = load_model(safe_subpath(root, TEACHER), device) if spec.distill else None
    model = train_or_resume(model, latents, scheduler, spec, work, device=device, progress=progress,
                            desc="finetune (DiT)", on_progress=on_progress, teacher=teacher, conditions=labels,
                            call=dit_call, mixed_precision=p.project.mixed_precision)
    if not is_main_process():
        return follower_result("finetune")
    meta = read_config(pruned_dir)["meta"] | {"finetune": spec_json(spec)}
    out = save_model(model.cpu(), safe_subpath(root, FINETUNED), scheduler_config=dict(scheduler.config), meta=meta)
    return {"finetuned": str(out), "steps": spec.steps}


@stage("dipgo", family=FAMILY)
def run_dipgo(p: Params, root: Path, progress: bool = True, on_progress: Any = None, **_: Any) -> dict:
    """DiP-GO on the DiT: the pruner learns which transformer blocks reuse their previous step's
    residual update, on guided, class-conditioned trajectories (row i of the noise pool is class
    ``i % num_classes``, as the evaluation draws them) with the SSIM of the decoded images as the loss."""
    from ..pruning.dipgo import train_pruner
    from ..pruning.dipgo.conditioned import dit_conditioned
    from .dipgo import write_schedule

    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, TEACHER)
    teacher = load_model(teacher_dir, device)
    cond = conditioning(teacher_dir)
    vae = load_vae(safe_subpath(root, AUTOENCODER), device)
    graph = dit_conditioned(teacher, torch.arange(cond["num_classes"]), cond["guidance_scale"], vae)
    c = teacher.config
    t0 = time.time()
    schedule, info = train_pruner(graph, load_scheduler_config(teacher_dir), p.dipgo, steps=p.evaluate.steps,
                                  sample_shape=(c.in_channels, c.sample_size, c.sample_size), device=device,
                                  progress=progress, sampler=p.evaluate.sampler, on_progress=on_progress,
                                  work_dir=work_dir(root, "dipgo-dit", p.dipgo, p.evaluate.steps, p.evaluate.sampler,
                                                    read_config(teacher_dir)["sha256"]))
    return write_schedule(p, root, schedule, info, time.time() - t0)


def _unsupported(name: str):
    def run(p: Params, root: Path, **_: Any) -> dict:
        raise ConfigError(f"stage {name}: not available for teacher.family = {FAMILY!r} yet (a DiT workspace "
                          f"runs data, latents, features, teacher, taylor, finetune, dipgo, evaluate, register, report)")

    return run


for _name in ("intervals", "experts", "router", "prune-experts", "stack"):
    stage(_name, family=FAMILY)(_unsupported(_name))
