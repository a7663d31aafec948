"""Benchmark: Diff-Pruning against its ablations (random, magnitude, plain Taylor) on the digits teacher.

For channel ratios 0.3 and 0.5 and every importance, prune the pipeline's teacher, evaluate it right
away, fine-tune it for ``finetune.fraction`` (at most 0.2) of the teacher's training steps, and
evaluate again, with the shared protocol over three sampling seeds. Reports parameters, MACs,
FID (mean, spread and per seed), latency and fidelity (PSNR/SSIM of same-seed samples), each
against the teacher. Writes ``benchmarks/results/taylor.json`` and ``taylor.md``.

Every finished run is cached under ``.work/`` (keyed by the configs and the teacher's weights), and
fine-tuning resumes, so an interrupted benchmark picks up where it stopped.

Usage::

    python -m benchmarks.taylor            # the real thing (reuses a finished `make demo`)
    python -m benchmarks.taylor --quick    # a tiny end-to-end smoke run in .work/bench-taylor-quick
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from diffusers import DDPMScheduler
from torch import nn

from diffprune.config import Params, fingerprint, resolve_device, to_dict
from diffprune.data import load_split
from diffprune.env import quiet_defaults
from diffprune.io import atomic_path, read_json, write_json
from diffprune.metrics.evaluate import evaluate
from diffprune.metrics.fid import get_extractor
from diffprune.models.checkpoint import load_model, load_scheduler_config, read_config
from diffprune.models.unet import sampling_scheduler
from diffprune.pruning.taylor import finetune_spec, prune_unet
from diffprune.sampling import ModelDenoiser
from diffprune.stages.core import ensure_baseline, train_or_resume, work_dir

from benchmarks.common import QUICK_SPINE, bench_params, cached_teacher_eval, fmt_fid

log = logging.getLogger("benchmarks.taylor")

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.3, 0.5)
IMPORTANCES = ("random", "magnitude", "taylor", "diff-pruning")
MAX_FINETUNE_FRACTION = 0.2  # of the teacher's training steps

# A tiny end-to-end setting: checks that the benchmark runs, says nothing about the method.
QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "taylor": {"batch_size": 16, "max_timesteps": 20},
    "finetune": {"batch_size": 16, "checkpoint_every": 1},
}


@dataclass
class Bench:
    """Everything the runs share: the teacher, its schedulers, the data and the FID reference."""

    p: Params
    root: Path
    device: torch.device
    teacher: nn.Module
    train_scheduler: DDPMScheduler
    sample_scheduler: Any
    images: torch.Tensor         # (N, C, H, W) training images in [-1, 1]
    extractor: Any
    train_feats: np.ndarray      # (N, D) FID reference features
    teacher_samples: torch.Tensor | None
    teacher_metrics: dict
    key: str                     # teacher weights + shared configs, part of every cache key


def taylor_params(root: Path, quick: bool) -> Params:
    """The benchmark params with the fine-tune capped at 20% of the teacher's steps."""
    p = bench_params(root, QUICK if quick else None)
    if p.finetune.fraction > MAX_FINETUNE_FRACTION:
        p = replace(p, finetune=replace(p.finetune, fraction=MAX_FINETUNE_FRACTION))
    return p


def _evaluate(model: nn.Module, b: Bench, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    return evaluate(ModelDenoiser(model.to(b.device).eval()), b.sample_scheduler, [model], b.p.evaluate, b.extractor,
                    b.train_feats, sample_shape=shape, reference=reference, device=b.device, progress=False)


def setup(root: Path, p: Params, progress: bool) -> Bench:
    """Ensure the baseline (data, feature net, teacher) and evaluate the teacher under this protocol."""
    base = ensure_baseline(root, p, progress=progress)
    device = resolve_device(p.project.device)
    teacher = load_model(base.teacher, device)
    sched_cfg = load_scheduler_config(base.teacher)
    images, _ = load_split(base.dataset, "train")
    extractor = get_extractor(base.features, p.evaluate.inception_weights, device)
    b = Bench(p, root, device, teacher, DDPMScheduler.from_config(sched_cfg),
              sampling_scheduler(sched_cfg, p.evaluate.sampler), images, extractor, extractor.fn(images),
              None, {}, fingerprint(read_config(base.teacher)["sha256"], p.data, p.teacher, p.evaluate))
    cache = work_dir(root, "bench-taylor-teacher", b.key)
    b.teacher_metrics, b.teacher_samples = cached_teacher_eval(cache, lambda: _evaluate(teacher, b, None))
    b.teacher_metrics["fid_floor"] = read_json(base.features / "floor.json")["fid_floor"]
    return b


def _vs_teacher(m: dict, t: dict) -> dict:
    return {
        "params_ratio": m["params"] / t["params"],
        "macs_ratio": m["trajectory_macs"] / t["trajectory_macs"],
        "speedup": t["latency_s"] / m["latency_s"],
        "fid_ratio": m["fid"] / t["fid"],
    }


def run_one(b: Bench, importance: str, ratio: float, progress: bool) -> dict:
    """Prune, evaluate, fine-tune, evaluate one (importance, ratio); cached by its configs."""
    tcfg = replace(b.p.taylor, importance=importance, ratio=ratio)
    spec = finetune_spec(b.p.finetune, b.p.teacher.steps)
    work = work_dir(b.root, f"bench-taylor-{importance}-r{ratio}", b.key, tcfg, b.p.finetune)
    if (work / "result.json").exists():
        return read_json(work / "result.json")

    t0 = time.time()
    pruned, report = prune_unet(b.teacher, b.train_scheduler, b.images, tcfg, device=b.device)
    prune_s = time.time() - t0
    right_after, _ = _evaluate(pruned, b, b.teacher_samples)

    t0 = time.time()
    tuned = train_or_resume(pruned, b.images, b.train_scheduler, spec, work / "finetune", device=b.device,
                            progress=progress, desc=f"fine-tune {importance} r={ratio}")
    finetune_s = time.time() - t0
    after_ft, _ = _evaluate(tuned, b, b.teacher_samples)

    result = {
        "importance": importance,
        "ratio": ratio,
        "threshold": report["threshold"],
        "timesteps_used": report["timesteps_used"],
        "prune_losses": report["losses"],
        "params": report["params_after"],
        "macs_per_call": report["macs_after"],
        "prune_seconds": prune_s,
        "finetune_steps": spec.steps,
        "finetune_seconds": finetune_s,
        "pruned": right_after | {"vs_teacher": _vs_teacher(right_after, b.teacher_metrics)},
        "finetuned": after_ft | {"vs_teacher": _vs_teacher(after_ft, b.teacher_metrics)},
    }
    write_json(work / "result.json", result)
    return result


def to_markdown(doc: dict) -> str:
    """The results as a readable table (one row per run, the teacher first)."""
    t = doc["teacher"]
    ev = doc["params"]["evaluate"]
    lines = [
        "# Diff-Pruning vs ablations" + (" (QUICK smoke setting: numbers are meaningless)" if doc["quick"] else ""),
        "",
        f"Teacher: {t['params']:,} params, {t['macs_per_step'] / 1e6:.2f} MMACs/step, FID {fmt_fid(t)} "
        f"(floor {t['fid_floor']:.2f}), latency {t['latency_s']:.3f} s per {t['latency_batch']} images.",
        f"Protocol: {ev['sampler']} {ev['steps']} steps, {ev['num_samples']} samples per seed, seeds {ev['seeds']}, "
        f"features: {t['feature_extractor']}. Fine-tuning: {doc['finetune_steps']} steps "
        f"({doc['params']['finetune']['fraction']:.0%} of the teacher's {doc['params']['teacher']['steps']}).",
        "FID is mean ± std over the sampling seeds; ratios are model / teacher (speedup: teacher / model latency, "
        "on a shared CPU, so noisy). PSNR/SSIM: same-seed samples vs the teacher's, after fine-tuning.",
        "",
        "| ratio | importance | T steps | params | MACs | FID pruned | FID fine-tuned | FID ft / teacher "
        "| speedup | PSNR / SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        ft = r["finetuned"]
        vs = ft["vs_teacher"]
        lines.append(
            f"| {r['ratio']} | {r['importance']} | {r['timesteps_used'] or '-'} | {r['params']:,} "
            f"({vs['params_ratio']:.2f}x) | {vs['macs_ratio']:.2f}x | {fmt_fid(r['pruned'])} | {fmt_fid(ft)} "
            f"| {vs['fid_ratio']:.2f} | {vs['speedup']:.2f}x "
            f"| {ft['psnr_vs_teacher']:.1f} / {ft['ssim_vs_teacher']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-taylor-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml, data/ and models/")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for taylor.json and taylor.md")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    ratios: Annotated[str, typer.Option(help="comma-separated channel ratios")] = ",".join(map(str, RATIOS)),
    importances: Annotated[str, typer.Option(help="comma-separated importances")] = ",".join(IMPORTANCES),
) -> None:
    """Run the benchmark and write its JSON + Markdown results."""
    chosen = [i.strip() for i in importances.split(",") if i.strip()]
    unknown = sorted(set(chosen) - set(IMPORTANCES))
    if unknown:
        raise typer.BadParameter(f"--importances: unknown {unknown} (known: {', '.join(IMPORTANCES)})")
    ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if quick:
        root = REPO / ".work/bench-taylor-quick"
        out = root / "results"
        root.mkdir(parents=True, exist_ok=True)
    p = taylor_params(root, quick)
    b = setup(root, p, progress)
    runs = []
    for ratio in ratio_list:
        for importance in chosen:
            log.info("ratio %.1f, importance %s", ratio, importance)
            runs.append(run_one(b, importance, ratio, progress))
    doc = {
        "quick": quick,
        "teacher": b.teacher_metrics,
        "finetune_steps": finetune_spec(p.finetune, p.teacher.steps).steps,
        "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "taylor", "finetune")},
        "runs": runs,
    }
    write_json(out / "taylor.json", doc)
    with atomic_path(out / "taylor.md") as tmp:
        tmp.write_text(to_markdown(doc))
    log.info("wrote %s and %s", out / "taylor.json", out / "taylor.md")


if __name__ == "__main__":
    typer.run(main)
