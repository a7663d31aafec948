"""Benchmark: DiP-GO against cheaper-trajectory baselines at equal trajectory MACs, on the digits teacher.

For each target MACs ratio (kept MACs / the full model's over the whole trajectory), train the DiP-GO
pruner on the pipeline's teacher for the protocol's sampler and steps, then evaluate with the shared
protocol over three sampling seeds:

* ``dipgo``       - the learned skip schedule;
* ``fewer-steps`` - the full model with round(steps x ratio) sampling steps;
* ``deepcache``   - DeepCache's uniform schedule (interval, branch) closest to the ratio;
* ``random``      - a random skip schedule thresholded to the ratio;

and the teacher itself. Reports FID (mean, spread, per seed), the MACs ratio counted while sampling,
the measured wall-clock speedup next to it, PSNR/SSIM vs the teacher's same-seed samples and the
pruner's training time. Writes ``benchmarks/results/dipgo.json``, ``dipgo.md``, ``dipgo.png`` (FID vs
MACs) and, per ratio, the learned schedule as JSON + heatmap.

Every finished run is cached under ``.work/`` (keyed by the configs and the teacher's weights).

Usage::

    python -m benchmarks.dipgo            # the real thing (reuses a finished `make demo`)
    python -m benchmarks.dipgo --quick    # a tiny end-to-end smoke run in .work/bench-dipgo-quick
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
from torch import nn

from diffprune.config import Params, fingerprint, resolve_device, to_dict
from diffprune.data import load_split
from diffprune.env import quiet_defaults
from diffprune.io import atomic_path, read_json, write_json
from diffprune.metrics.evaluate import evaluate
from diffprune.metrics.fid import get_extractor
from diffprune.models.checkpoint import load_model, load_scheduler_config, read_config
from diffprune.models.unet import sampling_scheduler
from diffprune.pruning.dipgo import (
    Schedule,
    SkipScheduleDenoiser,
    deepcache_for_ratio,
    random_schedule,
    save_heatmap,
    train_pruner,
)
from diffprune.sampling import Denoiser, ModelDenoiser
from diffprune.stages.core import ensure_baseline, work_dir

from benchmarks.common import QUICK_SPINE, bench_params, cached_teacher_eval, fmt_fid

log = logging.getLogger("benchmarks.dipgo")

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dipgo", "fewer-steps", "deepcache", "random")

# A tiny end-to-end setting: checks that the benchmark runs, says nothing about the method.
QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "evaluate": {**QUICK_SPINE["evaluate"], "steps": 6},
    "dipgo": {"steps": 4, "batch_size": 2, "pool_size": 8, "dim": 16, "tolerance": 0.05},
}


@dataclass
class Bench:
    """Everything the runs share: the teacher, its sampling scheduler and the FID reference."""

    p: Params
    root: Path
    out: Path
    device: torch.device
    teacher: nn.Module
    scheduler_config: dict
    sample_shape: tuple[int, int, int]
    extractor: Any
    train_feats: np.ndarray      # (N, D) FID reference features
    teacher_samples: torch.Tensor | None
    teacher_metrics: dict
    key: str                     # teacher weights + shared configs, part of every cache key


def _evaluate(b: Bench, denoiser: Denoiser, steps: int, reference: torch.Tensor | None) -> dict:
    protocol = replace(b.p.evaluate, steps=steps)
    sched = sampling_scheduler(b.scheduler_config, protocol.sampler)
    metrics, _ = evaluate(denoiser, sched, [b.teacher], protocol, b.extractor, b.train_feats,
                          sample_shape=b.sample_shape, reference=reference, device=b.device, progress=False)
    return metrics


def setup(root: Path, out: Path, p: Params, progress: bool) -> Bench:
    """Ensure the baseline (data, feature net, teacher) and evaluate the teacher under this protocol."""
    base = ensure_baseline(root, p, progress=progress)
    device = resolve_device(p.project.device)
    teacher = load_model(base.teacher, device).eval()
    images, _ = load_split(base.dataset, "train")
    extractor = get_extractor(base.features, p.evaluate.inception_weights, device)
    cfg = teacher.config
    b = Bench(p, root, out, device, teacher, load_scheduler_config(base.teacher),
              (cfg.in_channels, cfg.sample_size, cfg.sample_size), extractor, extractor.fn(images), None, {},
              fingerprint(read_config(base.teacher)["sha256"], p.data, p.teacher, p.evaluate))
    cache = work_dir(root, "bench-dipgo-teacher", b.key)
    b.teacher_metrics, b.teacher_samples = cached_teacher_eval(cache, lambda: evaluate(
        ModelDenoiser(teacher), sampling_scheduler(b.scheduler_config, p.evaluate.sampler), [teacher], p.evaluate,
        extractor, b.train_feats, sample_shape=b.sample_shape, device=device, progress=False))
    b.teacher_metrics["fid_floor"] = read_json(base.features / "floor.json")["fid_floor"]
    return b


def _vs_teacher(m: dict, t: dict) -> dict:
    return {
        "macs_ratio": m["trajectory_macs"] / t["trajectory_macs"],
        "speedup": t["latency_s"] / m["latency_s"],
        "fid_ratio": m["fid"] / t["fid"],
    }


def train_schedule(b: Bench, target: float, progress: bool) -> tuple[Schedule, dict]:
    """Train DiP-GO at ``target``; the schedule and its training info are cached."""
    cfg = replace(b.p.dipgo, target_ratio=target)
    work = work_dir(b.root, f"bench-dipgo-r{target}", b.key, cfg)
    if (work / "info.json").exists():
        return Schedule.load(work / "schedule.json"), read_json(work / "info.json")
    schedule, info = train_pruner(b.teacher, b.scheduler_config, cfg, steps=b.p.evaluate.steps,
                                  sample_shape=b.sample_shape, device=b.device, progress=progress,
                                  sampler=b.p.evaluate.sampler)
    schedule.save(work / "schedule.json")
    write_json(work / "info.json", info)  # written last: marks the cache complete
    return schedule, info


def run_target(b: Bench, target: float, progress: bool) -> dict:
    """Train DiP-GO at one MACs ratio and evaluate it with the baselines at the ratio it reached."""
    work = work_dir(b.root, f"bench-dipgo-run-r{target}", b.key, b.p.dipgo)
    if (work / "result.json").exists():
        return read_json(work / "result.json")
    T = b.p.evaluate.steps
    schedule, info = train_schedule(b, target, progress)
    ratio = float(schedule.macs_ratio)
    tag = f"r{target}"
    schedule.save(b.out / f"dipgo_schedule_{tag}.json")
    save_heatmap(schedule, b.out / f"dipgo_schedule_{tag}.png")

    deepcache = deepcache_for_ratio(b.teacher, T, ratio, b.sample_shape)
    rand = random_schedule(b.teacher, T, ratio, b.sample_shape, seed=b.p.dipgo.seed, tolerance=b.p.dipgo.tolerance)
    fewer = max(1, round(T * ratio))
    runs: dict[str, tuple[Denoiser, int, dict]] = {
        "dipgo": (SkipScheduleDenoiser(b.teacher, schedule), T, {"schedule_macs_ratio": ratio}),
        "fewer-steps": (ModelDenoiser(b.teacher), fewer, {"steps": fewer}),
        "deepcache": (SkipScheduleDenoiser(b.teacher, deepcache), T,
                      {"schedule_macs_ratio": deepcache.macs_ratio, **deepcache.meta}),
        "random": (SkipScheduleDenoiser(b.teacher, rand), T, {"schedule_macs_ratio": rand.macs_ratio}),
    }
    methods = {}
    for name, (den, steps, extra) in runs.items():
        log.info("target %.2f: evaluating %s", target, name)
        m = _evaluate(b, den, steps, b.teacher_samples)
        methods[name] = m | extra | {"vs_teacher": _vs_teacher(m, b.teacher_metrics)}
    result = {
        "target_ratio": target,
        "achieved_ratio": ratio,
        "train_seconds": info["train_time_s"],
        "train_steps": info["train_steps"],
        "pool_seconds": info.get("pool_time_s"),
        "final_kept_ratio": info["final_kept_ratio"],
        "schedule": f"dipgo_schedule_{tag}.json",
        "heatmap": f"dipgo_schedule_{tag}.png",
        "methods": methods,
    }
    write_json(work / "result.json", result)
    return result


def plot(doc: dict, png: Path) -> Path:
    """FID (mean ± std over seeds) against the measured MACs ratio, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    t = doc["teacher"]
    ax.axhline(t["fid"], color="k", lw=0.8, ls="--", label=f"teacher ({t['fid']:.2f})")
    for name in METHODS:
        pts = sorted((r["methods"][name]["vs_teacher"]["macs_ratio"], r["methods"][name]["fid"],
                      r["methods"][name]["fid_std"]) for r in doc["runs"])
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
    ax.set_xlabel("trajectory MACs / teacher")
    ax.set_ylabel("FID (mean ± std, 3 seeds)")
    ax.set_title(f"DiP-GO vs baselines ({doc['params']['evaluate']['sampler']} "
                 f"{doc['params']['evaluate']['steps']} steps)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return png


def to_markdown(doc: dict) -> str:
    """The results as a readable table (one block per target ratio, the teacher first)."""
    t = doc["teacher"]
    ev = doc["params"]["evaluate"]
    d = doc["params"]["dipgo"]
    lines = [
        "# DiP-GO vs baselines at equal trajectory MACs"
        + (" (QUICK smoke setting: numbers are meaningless)" if doc["quick"] else ""),
        "",
        f"Teacher: {t['params']:,} params, {t['macs_per_step'] / 1e6:.2f} MMACs/step, FID {fmt_fid(t)} "
        f"(floor {t['fid_floor']:.2f}), latency {t['latency_s']:.3f} s per {t['latency_batch']} images.",
        f"Protocol: {ev['sampler']} {ev['steps']} steps, {ev['num_samples']} samples per seed, seeds {ev['seeds']}, "
        f"features: {t['feature_extractor']}.",
        f"Pruner: {d['steps']} SGD steps (lr {d['lr']}, momentum {d['momentum']}, cosine), batch {d['batch_size']} "
        f"from a pool of {d['pool_size']} noises, loss {d['loss']}, alpha_s {d['alpha_s']}, D {d['dim']}.",
        "MACs ratio: counted while sampling, method / teacher. Speedup: teacher / method wall-clock on a shared "
        "CPU (noisy). PSNR/SSIM: same-seed samples vs the teacher's.",
        "",
        "| target | method | MACs ratio | speedup | FID | FID / teacher | PSNR / SSIM | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        for name in METHODS:
            m = r["methods"][name]
            vs = m["vs_teacher"]
            note = {
                "dipgo": f"train {r['train_seconds']:.0f} s ({r['train_steps']} steps)",
                "fewer-steps": f"{m.get('steps')} steps",
                "deepcache": f"interval {m.get('interval')}, branch {m.get('branch')}",
                "random": "",
            }[name]
            lines.append(
                f"| {r['target_ratio']} | {name} | {vs['macs_ratio']:.3f} | {vs['speedup']:.2f}x | {fmt_fid(m)} "
                f"| {vs['fid_ratio']:.2f} | {m['psnr_vs_teacher']:.1f} / {m['ssim_vs_teacher']:.3f} | {note} |"
            )
    lines += ["", "Learned schedules: " + ", ".join(f"`{r['heatmap']}`" for r in doc["runs"]),
              "", "![FID vs MACs](dipgo.png)"]
    return "\n".join(lines) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-dipgo-quick")] = False,
    targets: Annotated[str, typer.Option(help="comma-separated MACs ratios; default: dipgo.target_ratio")] = "",
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml, data/ and models/")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for dipgo.json, .md, .png and the schedules")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON + Markdown + PNG results."""
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if quick:
        root = REPO / ".work/bench-dipgo-quick"
        out = root / "results"
        root.mkdir(parents=True, exist_ok=True)
    p = bench_params(root, QUICK if quick else None)
    try:
        ratios = [float(v) for v in targets.split(",") if v.strip()] or [p.dipgo.target_ratio]
    except ValueError:
        raise typer.BadParameter(f"--targets = {targets!r}: expected comma-separated numbers") from None
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise typer.BadParameter(f"--targets: {r} is not in (0, 1]")
    b = setup(root, out, p, progress)
    runs = []
    for r in ratios:
        log.info("target MACs ratio %.3f", r)
        runs.append(run_target(b, r, progress))
    doc = {
        "quick": quick,
        "teacher": b.teacher_metrics,
        "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "dipgo")},
        "runs": runs,
    }
    write_json(out / "dipgo.json", doc)
    plot(doc, out / "dipgo.png")
    with atomic_path(out / "dipgo.md") as tmp:
        tmp.write_text(to_markdown(doc))
    log.info("wrote %s, %s and %s", out / "dipgo.json", out / "dipgo.md", out / "dipgo.png")


if __name__ == "__main__":
    typer.run(main)
