"""The spine's stages: data -> features -> teacher -> evaluate -> register."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, Params, fingerprint, resolve_device, to_dict
from ..data import cache_dataset, load_split
from ..distributed import follower_result, is_main_process
from ..io import atomic_path, read_json, write_json
from ..metrics.evaluate import (compare_to_teacher, evaluate, latency_probe, machine_info, paired_latency,
                                quality_verdict, save_grid)
from ..metrics.clip import clip_score
from ..metrics.calibration import calibrate, calibration_failures, calibration_table, check_calibration
from ..metrics.fid import CORRUPTIONS, get_extractor, objective_name, save_feature_net, train_feature_net
from ..models.checkpoint import save_model
from ..models.unet import build_scheduler, build_unet, load_pretrained, sampling_scheduler
from ..sampling import ModelDenoiser, sample
from ..targets import load_target
from ..training import TrainSpec, spec_json, train_denoiser
from . import safe_subpath, stage

log = logging.getLogger(__name__)

DATASET = "data/dataset"
FEATURES = "models/features"
TEACHER = "models/teacher"
WORK = ".work"

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Target:
    """A model the pipeline evaluates and registers."""

    kind: str                        # a diffprune.targets kind
    paths: dict[str, str]            # artifact name -> path relative to the root
    sections: tuple[str, ...]        # params sections that define it (logged as MLflow params)
    model_name: Callable[[Params], str]


# Every model the pipeline can evaluate and register, declared here and nowhere else. The paths are
# outputs of the stage modules (stages/taylor.py FINETUNED, stages/dipgo.py SCHEDULE_DIR,
# stages/experts.py MIXTURE, stages/stack.py STACK; tests/test_registries.py checks they agree).
TARGETS: dict[str, Target] = {
    "teacher": Target("unet", {"model": TEACHER}, ("data", "teacher"), lambda p: p.register.model_name),
    "finetune": Target("unet", {"model": "models/finetune"}, ("taylor", "finetune"), lambda p: p.finetune.model_name),
    "dipgo": Target("dipgo", {"model": TEACHER, "schedule": "models/dipgo/schedule.json"}, ("dipgo",),
                    lambda p: p.dipgo.model_name),
    "experts": Target("experts", {"model": "models/experts/mixture"},
                      ("intervals", "experts", "router", "prune_experts"), lambda p: p.prune_experts.model_name),
    "stack": Target("stack", {"model": "models/stack/model", "stack": "models/stack/stack.json"},
                    ("taylor", "finetune", "intervals", "dipgo", "stack"), lambda p: p.stack.model_name),
}


# teacher.family -> (the kind a pixel-UNet target has -> the family's kind), and the extra artifacts
# every model of the family needs (its VAE); filled by the family's stage module (stages/dit.py).
# A target whose kind a family does not map (the expert mixture on DiT) does not exist there.
FAMILY_KINDS: dict[str, dict[str, str]] = {"unet": {"unet": "unet", "dipgo": "dipgo", "experts": "experts",
                                                     "stack": "stack"}}
FAMILY_PATHS: dict[str, dict[str, str]] = {"unet": {}}


def get_target(name: str, family: str = "unet") -> Target:
    """Pipeline model ``name`` as ``family`` builds it (its kind, and the family's extra artifacts)."""
    from . import _load_all

    _load_all()  # the family modules register their kinds and paths (FAMILY_KINDS) on import
    if name not in TARGETS:
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(sorted(TARGETS))})")
    tgt, kinds = TARGETS[name], FAMILY_KINDS.get(family, {})
    if tgt.kind not in kinds:
        have = sorted(n for n, t in TARGETS.items() if t.kind in kinds)
        raise ConfigError(f"model {name!r}: not available for teacher.family = {family!r} (it has: {', '.join(have)})")
    return dataclasses.replace(tgt, kind=kinds[tgt.kind], paths={**tgt.paths, **FAMILY_PATHS[family]})


def eval_dir(root: Path, target: str) -> Path:
    return safe_subpath(root, f"models/eval/{target}")


def data_shape(p: Params) -> tuple[int, int, int]:
    return (p.data.channels, p.data.image_size, p.data.image_size)


# ----------------------------------------------------------------------------- data

@stage("data")
def run_data(p: Params, root: Path, **_: Any) -> dict:
    """Cache the dataset (train + held-out ref splits) under data/dataset."""
    out = cache_dataset(p.data, safe_subpath(root, DATASET))
    write_json(safe_subpath(root, "data/dataset.params.json"), to_dict(p.data))
    return {"dataset": str(out)}


# ----------------------------------------------------------------------------- features

@stage("features")
def run_features(p: Params, root: Path, progress: bool = True, **_: Any) -> dict:
    """Train the FID feature network on the train split, check it on the ref split, compute the
    FID floor (held-out real images vs training images) and calibrate the extractor.

    The calibration scores known-bad sets made from the dataset (noise, blur, shuffled pixels, the
    mean image; :mod:`diffprune.metrics.calibration`) and refuses an extractor that puts any of them
    too close to the floor. ``calibration.json`` is written either way (to show why);
    ``floor.json`` (with the calibration in it) only when the extractor passes.
    """
    train_x, train_y = load_split(safe_subpath(root, DATASET), "train")
    ref_x, ref_y = load_split(safe_subpath(root, DATASET), "ref")
    out = safe_subpath(root, FEATURES)
    net, acc, task = train_feature_net(train_x, train_y, ref_x, ref_y, epochs=p.evaluate.feature_epochs,
                                       seed=p.project.seed, progress=progress)
    if acc < p.evaluate.min_feature_accuracy:
        raise RuntimeError(f"feature network reached only {acc:.3f} held-out accuracy "
                           f"(< evaluate.min_feature_accuracy = {p.evaluate.min_feature_accuracy})")
    objective = objective_name(net, task)
    save_feature_net(net, out, {"accuracy": acc, "task": task, "objective": objective, "corruptions": CORRUPTIONS})
    ext = get_extractor(out, p.evaluate.inception_weights)
    cal = calibrate(ext.fn, ref_x, train_x, seed=p.project.seed)
    failures = calibration_failures(cal)
    write_json(out / "calibration.json", {"feature_extractor": ext.name, **cal, "passed": not failures,
                                          "failures": failures})
    log.info("FID calibration of %s: %s", ext.name, calibration_table(cal))
    check_calibration(cal, ext.name)
    floor = cal["floor"]
    write_json(out / "floor.json", {"fid_floor": floor, "feature_extractor": ext.name, "accuracy": acc,
                                    "task": task, "objective": objective, "num_ref": len(ref_x),
                                    "num_train": len(train_x), "calibration": cal})
    log.info("feature net: %s held-out accuracy %.3f; FID floor %.3f", objective, acc, floor)
    return {"features": str(out), "fid_floor": floor, "accuracy": acc}


# ----------------------------------------------------------------------------- teacher

def teacher_spec(p: Params) -> TrainSpec:
    t = p.teacher
    return TrainSpec(steps=t.steps, batch_size=t.batch_size, lr=t.lr, ema_decay=t.ema_decay,
                     checkpoint_every=t.checkpoint_every, seed=t.seed, warmup_steps=t.warmup_steps)


def work_dir(root: Path, name: str, *cfgs: Any) -> Path:
    """Resumable working folder of a training run, keyed by its config (runs never share one)."""
    return safe_subpath(root, f"{WORK}/{name}-{fingerprint(*cfgs)}")


def train_or_resume(model, images, scheduler, spec: TrainSpec, work: Path, *, device, progress: bool,
                    desc: str, before_step=None, on_progress: ProgressFn | None = None, teacher=None,
                    mixed_precision: str = "no", **conditional: Any):
    """The one training entry point of every stage: resumable, returns the EMA weights in ``model``.

    Under ``accelerate launch`` every process trains; only the main one may then write the stage's
    outputs (:func:`diffprune.distributed.is_main_process`). A mixed-precision run has its own working
    folder (``WORK-bf16``): it never resumes an fp32 run's checkpoints, nor they its. ``conditional``:
    a conditional family's ``conditions=`` and ``call=`` (:func:`diffprune.training.train_denoiser`).
    """
    if mixed_precision != "no":
        work = work.with_name(f"{work.name}-{mixed_precision}")
    model, ema = train_denoiser(model, images, scheduler, spec, work, device=device, progress=progress,
                                desc=desc, before_step=before_step, on_progress=on_progress, teacher=teacher,
                                mixed_precision=mixed_precision, **conditional)
    ema.copy_to(model)
    return model.eval()


@stage("teacher")
def run_teacher(p: Params, root: Path, progress: bool = True, on_progress: ProgressFn | None = None, **_: Any) -> dict:
    """Load the teacher with from_pretrained, or train it from the config (EMA, resumable)."""
    device = resolve_device(p.project.device)
    out = safe_subpath(root, TEACHER)
    t0 = time.time()
    if p.teacher.pretrained:
        model, scheduler = load_pretrained(p.teacher.pretrained)
        meta = {"source": p.teacher.pretrained}
    else:
        torch.manual_seed(p.teacher.seed)
        images, _ = load_split(safe_subpath(root, DATASET), "train")
        model = build_unet(p.teacher, p.data)
        scheduler = build_scheduler(p.teacher)
        spec = teacher_spec(p)
        model = train_or_resume(model, images, scheduler, spec, work_dir(root, "teacher", p.data, p.teacher),
                                device=device, progress=progress, desc="teacher", on_progress=on_progress,
                                mixed_precision=p.project.mixed_precision)
        if not is_main_process():  # under `accelerate launch`: the main process writes the outputs
            return follower_result("teacher")
        meta = {"source": "trained", "training_options": spec_json(spec), "params": to_dict(p.teacher)}
    meta["train_seconds"] = time.time() - t0
    save_model(model.cpu(), out, scheduler_config=dict(scheduler.config), meta=meta)
    # a quick look at what it draws
    sched = sampling_scheduler(dict(scheduler.config), p.evaluate.sampler)
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    x = sample(ModelDenoiser(model.to(device)), sched, num_images=64, sample_shape=shape, steps=p.evaluate.steps,
               seed=p.project.seed, device=device)
    save_grid(x, safe_subpath(root, "models/teacher-samples.png"))
    return {"teacher": str(out), "seconds": meta["train_seconds"]}


# ----------------------------------------------------------------------------- evaluate

def target_paths(root: Path, target: str, family: str = "unet") -> dict[str, Path]:
    return {k: safe_subpath(root, v) for k, v in get_target(target, family).paths.items()}


@stage("evaluate")
def run_evaluate(p: Params, root: Path, target: str = "teacher", progress: bool = True, **_: Any) -> dict:
    """Evaluate one pipeline model with the shared protocol; writes models/eval/<target>/."""
    device = resolve_device(p.project.device)
    tgt = get_target(target, p.teacher.family)
    loaded = load_target(tgt.kind, target_paths(root, target, p.teacher.family), device)
    sched = sampling_scheduler(loaded.scheduler_config, p.evaluate.sampler)
    feats_dir = safe_subpath(root, FEATURES)
    ext = get_extractor(feats_dir, p.evaluate.inception_weights, device)
    train_x, _ = load_split(safe_subpath(root, DATASET), "train")
    train_feats = ext.fn(train_x)
    reference = None
    if target != "teacher":
        ref_file = eval_dir(root, "teacher") / "samples.safetensors"
        if not ref_file.exists():
            raise ConfigError(f"{ref_file}: evaluate the teacher first (its samples are the fidelity reference)")
        reference = load_file(str(ref_file))["samples"]
    protocol = p.evaluate if loaded.steps is None else dataclasses.replace(p.evaluate, steps=loaded.steps)
    metrics, samples = evaluate(loaded.denoiser, sched, loaded.modules, protocol, ext, train_feats,
                                sample_shape=loaded.sample_shape, reference=reference, device=device,
                                progress=progress)
    if hasattr(loaded.denoiser, "prompts"):  # a text-to-image model: its samples against their prompts
        clip = clip_score(samples, loaded.denoiser.prompts(len(samples)), p.clip.weights)
        metrics |= {"clip_score": clip.score, "clip_label": clip.label}
    floor = read_json(feats_dir / "floor.json")
    metrics["fid_floor"] = floor["fid_floor"]  # the scale beside every FID: floor ... noise (the best bad set)
    if (floor.get("calibration") or {}).get("bad"):
        metrics["fid_noise"] = min(floor["calibration"]["bad"].values())
    metrics |= quality_verdict(metrics, floor.get("calibration"), samples, reference)
    if metrics["degenerate"]:
        log.warning("%s is degenerate: %s", target, metrics["verdict"])
    if reference is not None:
        metrics |= compare_to_teacher(metrics, read_json(eval_dir(root, "teacher") / "metrics.json"))
        metrics |= _speedup(p, protocol, root, loaded, sched, device)
    out = eval_dir(root, target)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        save_file({"samples": samples.contiguous()}, str(tmp / "samples.safetensors"))
        save_grid(samples[: p.evaluate.grid_size], tmp / "grid.png")
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "point.json", [plot_point(target, metrics)])
        write_json(tmp / "protocol.json", {**to_dict(p.evaluate), "machine": machine_info(device)})
    return {"eval": str(out), "metrics": metrics}


def plot_point(target: str, metrics: dict) -> dict:
    """The model's point on dvc.yaml's cost-quality plots (``dvc plots show``: FID and PSNR vs MACs)."""
    return {"model": target, "macs_ratio_vs_teacher": float(metrics.get("macs_ratio_vs_teacher", 1.0)),
            "fid": float(metrics["fid"]), "psnr_vs_teacher": metrics.get("psnr_vs_teacher")}


def _speedup(p: Params, protocol, root: Path, loaded, sched, device) -> dict:
    """The candidate's latency (its ``protocol``: its own steps) against the teacher's (the
    protocol's steps), timed here, interleaved, in this process."""
    family = p.teacher.family
    teacher = load_target(get_target("teacher", family).kind, target_paths(root, "teacher", family), device)
    shape = loaded.sample_shape
    return paired_latency(latency_probe(loaded.denoiser, sched, protocol, shape, device),
                          latency_probe(teacher.denoiser, sched, p.evaluate, shape, device),
                          repeats=p.evaluate.latency_repeats)


# ----------------------------------------------------------------------------- register

@stage("register")
def run_register(p: Params, root: Path, target: str = "teacher", **_: Any) -> dict:
    """Log the evaluated model to MLflow and register it (idempotent by content hash: weights,
    architecture and scheduler config, never the checkpoint's timings or sources)."""
    from .. import registry, serving, tracking, versioning  # glue modules; imported lazily (light library imports)

    tgt = get_target(target, p.teacher.family)
    paths = target_paths(root, target, p.teacher.family)
    for name, path in paths.items():
        if not path.exists():
            raise ConfigError(f"{path}: the {target} model's {name} is missing (run its stages first)")
    ev = eval_dir(root, target)
    metrics = read_json(ev / "metrics.json")
    verdict = {serving.DEGENERATE_TAG: metrics["verdict"]} if metrics.get("degenerate") else {}
    if verdict:  # registered for the record, but `promote` refuses it (serving.promote)
        log.warning("registering %s marked degenerate (promotion refused): %s", target, metrics["verdict"])
    content = registry.model_content_hash(paths)
    dvc_hashes = versioning.stage_hashes(root) if (root / "dvc.lock").exists() else {}
    tags = {f"dvc.{k}": v for k, v in dvc_hashes.items() if k in (DATASET, *tgt.paths.values())}
    tracking.configure(root=root)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    info = registry.register_model(
        name=tgt.model_name(p), kind=tgt.kind, model_dir=paths["model"],
        extra_dirs={k: v for k, v in paths.items() if k != "model"},
        sampler=p.evaluate.sampler, steps=int(metrics.get("steps", p.evaluate.steps)),  # a stacked model's own
        batch_size=p.evaluate.batch_size,
        params={s: to_dict(p.section(s)) for s in (*tgt.sections, "evaluate")},
        metrics=numeric, artifacts=[ev / "grid.png", ev / "metrics.json"],
        tags={**tags, **verdict, "feature_extractor": metrics["feature_extractor"], "target": target},
        experiment=p.register.experiment, content_hash=content, root=root,
    )
    write_json(safe_subpath(root, f"models/registry/{target}.json"), {**info, **verdict})
    return {**info, **verdict}


# ----------------------------------------------------------------------------- benchmarks

@dataclass(frozen=True)
class Baseline:
    """Paths of the spine's outputs that methods and benchmarks start from."""

    root: Path
    dataset: Path
    features: Path
    teacher: Path
    teacher_eval: Path


def ensure_baseline(root: Path, p: Params, progress: bool = True) -> Baseline:
    """Run data, features, teacher and evaluate@teacher under ``root`` where their outputs are missing
    (a finished ``make demo`` in ``root`` is reused as is)."""
    root = Path(root).resolve()
    steps: list[tuple[Path, Callable[[], dict]]] = [
        (safe_subpath(root, DATASET), lambda: run_data(p, root)),
        (safe_subpath(root, FEATURES) / "floor.json", lambda: run_features(p, root, progress=progress)),
        (safe_subpath(root, TEACHER) / "model.safetensors", lambda: run_teacher(p, root, progress=progress)),
        (eval_dir(root, "teacher") / "metrics.json", lambda: run_evaluate(p, root, "teacher", progress=progress)),
    ]
    for out, run in steps:
        if not out.exists():
            run()
    return Baseline(root, safe_subpath(root, DATASET), safe_subpath(root, FEATURES), safe_subpath(root, TEACHER),
                    eval_dir(root, "teacher"))
