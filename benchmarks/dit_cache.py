"""Benchmark: DiP-GO against diffusers' own transformer caches (FirstBlockCache, TaylorSeer) on a
class-conditional DiT, at equal trajectory MACs, with fewer sampling steps as the simplest baseline.

The teacher is the ``dit-digits`` preset's (``presets/dit-digits.yaml``: a 6-block
``DiTTransformer2DModel`` on the 4 x 4 x 4 latents of a VAE fitted to the digits), trained by the
pipeline's own stages (data, latents, features, teacher) in a workspace of this benchmark. For each
budget (trajectory MACs / the teacher's 50-step trajectory):

* ``dipgo``       - the learned skip schedule (each block reuses its previous step's residual update),
  trained on guided, class-conditioned trajectories (the ``dipgo`` stage's graph);
* ``first-block-cache`` - diffusers' FirstBlockCache (``diffusers.hooks``), its threshold bisected
  until its counted MACs on the harness's probe trajectory land on the budget;
* ``taylorseer`` - diffusers' TaylorSeer cache over every block's attention and feed-forward, its
  ``(cache_interval, warmup, max_order)`` taken from a grid: of the settings within 2% of the
  budget, the one whose probe trajectory is closest to the teacher's (none within: the cheapest
  at or above the budget);
* ``fewer-steps`` - the teacher with ``budget x 50`` steps.

FirstBlockCache decides per call from the whole batch's first-block residual, so its cost depends on
the batch: the harness counts MACs on one image (as for every method); the MACs it ran at the
evaluation batch are measured too and reported beside them (``macs_ratio_at_eval_batch``).

Every run goes through the harness (FID over 3 seeds on the decoded images, paired PSNR against
the teacher's images from the same noises and labels, speedup timed against the teacher).
Writes ``benchmarks/results/dit_cache.{json,md,png}``; every trained piece is cached.

Usage::

    python -m benchmarks.dit_cache            # the real thing
    python -m benchmarks.dit_cache --quick    # a tiny end-to-end smoke run in .work/bench-quick
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
import typer

from diffprune.config import fingerprint, load_params, resolve_device, to_dict
from diffprune.families import merge_preset
from diffprune.io import read_json
from diffprune.metrics.cost import MacCounter
from diffprune.metrics.fid import get_extractor
from diffprune.models.checkpoint import load_scheduler_config, read_config
from diffprune.models.dit import ClassCycle, GuidedDiT
from diffprune.pruning.dipgo import train_pruner
from diffprune.pruning.dipgo.conditioned import dit_conditioned
from diffprune.pruning.dipgo.dit import SkipScheduleDiT
from diffprune.pruning.dipgo.diffusers_cache import (first_block_cache, first_block_cache_for_macs, taylorseer_cache,
                                                     taylorseer_for_macs)
from diffprune.safe_yaml import read_yaml
from diffprune.sampling import sample
from diffprune.stages import get_stage
from diffprune.stages.core import DATASET, FEATURES, TEACHER, target_paths, work_dir
from diffprune.stages.latent import AUTOENCODER, load_latents
from diffprune.targets import conditioning, load_target

import benchmarks.common as common
from benchmarks.common import (MACS_TOLERANCE, QUICK_SPINE, REPO, SEEDS, Bench, Run, quiet_defaults,
                               with_values)
from benchmarks.tables import TABLE_HEAD, compare, plot_pareto, run_row, write_results

log = logging.getLogger("benchmarks.dit_cache")

BUDGETS = (0.5, 0.35)
METHODS = ("dipgo", "first-block-cache", "taylorseer", "fewer-steps")
PROTOCOL = {"steps": 50, "num_samples": 500, "batch_size": 250, "latency_repeats": 5, "seeds": SEEDS}
QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "teacher": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "warmup_steps": 1},
    "dit": {"num_layers": 4, "num_heads": 2, "head_dim": 8},
    "autoencoder": {"steps": 10, "batch_size": 32, "block_out_channels": [8, 8]},
    "evaluate": {**QUICK_SPINE["evaluate"], "steps": 8, "seeds": SEEDS},
    "dipgo": {"steps": 3, "batch_size": 2, "pool_size": 4, "dim": 8, "tolerance": 0.05},
}


def bench_params(quick: bool):
    """params.yaml with the dit-digits preset and the benchmark protocol (or the smoke setting) over it."""
    preset = read_yaml(REPO / "presets" / "dit-digits.yaml")
    over = QUICK if quick else {"evaluate": PROTOCOL}
    return load_params(REPO / "params.yaml", merge_preset(preset, over))


def setup(p, root: Path, progress: bool) -> Bench:
    """The workspace (data, latents, features, teacher by the pipeline's stages, each once) and the
    harness around its teacher, sampled as the pipeline's loader builds it (``targets.load_target``:
    a DiT's class cycle, a text-to-image UNet's prompt cycle) for ``p.teacher.family``."""
    family = p.teacher.family
    sections = ("data", "teacher", family, "autoencoder")
    ws = root / ".work" / f"bench-{family}-cache-{fingerprint(*(p.section(s) for s in sections))}"
    done = {"data": ws / DATASET, "latents": ws / AUTOENCODER, "features": ws / FEATURES / "floor.json",
            "teacher": ws / TEACHER}
    for name, out in done.items():
        if not out.exists():
            get_stage(name)(p, ws, progress=progress)
    device = resolve_device(p.project.device)
    teacher_dir = ws / TEACHER
    loaded = load_target(family, target_paths(ws, "teacher", family), device)
    teacher = loaded.modules[0].eval()
    latents, _ = load_latents(ws)
    from diffprune.data import load_split

    images, _ = load_split(ws / DATASET, "train")
    extractor = get_extractor(ws / FEATURES, p.evaluate.inception_weights, device)
    meta = read_config(teacher_dir)["meta"]
    info = {"steps": p.teacher.steps, "train_seconds": meta.get("train_seconds", float("nan")), "device": str(device),
            "converged": None, "curve": [], "fid_floor": read_json(ws / FEATURES / "floor.json")["fid_floor"]}
    key = fingerprint(read_config(teacher_dir)["sha256"], p.data, p.evaluate)
    return Bench(f"{family}-cache", p, ws, device, teacher, teacher_dir, info, load_scheduler_config(teacher_dir),
                 latents, extractor, extractor.fn(images), key, teacher_denoiser=loaded.denoiser)


def dipgo_run(b: Bench, budget: float, progress: bool) -> Run:
    cond = conditioning(b.teacher_dir)
    cfg = with_values(b.p.dipgo, target_ratio=budget, tolerance=min(b.p.dipgo.tolerance, MACS_TOLERANCE))
    T = b.p.evaluate.steps
    graph = dit_conditioned(b.teacher, torch.arange(cond["num_classes"]), cond["guidance_scale"], b.teacher_sampler().vae)
    schedule, _ = train_pruner(graph, b.scheduler_config, cfg, steps=T, sample_shape=b.sample_shape, device=b.device,
                               progress=progress, sampler=b.p.evaluate.sampler,
                               work_dir=work_dir(b.root, "bench-dit-cache-dipgo", b.key, cfg, T))
    n = cond["num_classes"]
    den = ClassCycle(SkipScheduleDiT(b.teacher, schedule, list(range(n)), cond["guidance_scale"]), n,
                     b.teacher_sampler().vae)
    return b.run("dipgo", den, [b.teacher], key=to_dict(cfg),
                 extra={"train_steps": cfg.steps, "schedule_ratio": schedule.macs_ratio})


def _probe(b: Bench, batch: int):
    """Sample ``batch`` images of seed 0 with denoiser ``d`` (the harness counts MACs on batch 1)."""
    return lambda d: sample(d, b.sampler(), num_images=batch, sample_shape=b.sample_shape, steps=b.p.evaluate.steps,
                            seed=0, batch_size=batch, device=b.device)


def _teacher_copy(b: Bench):
    """``(transformer, denoiser)``: a copy of the teacher and its class cycle, for a cache's hooks to go
    on (the teacher's own latency probe, inside ``b.run``, runs the plain transformer)."""
    model = copy.deepcopy(b.teacher)
    cond = conditioning(b.teacher_dir)
    n = cond["num_classes"]
    return model, ClassCycle(GuidedDiT(model, list(range(n)), cond["guidance_scale"]), n, b.teacher_sampler().vae)


def fbc_run(b: Bench, budget: float) -> Run:
    model, den = _teacher_copy(b)
    found = first_block_cache_for_macs(_probe(b, 1), den, model, budget, tolerance=MACS_TOLERANCE)
    if not found.within:
        log.warning("first-block-cache at %s: nearest threshold %.4g gives %.3f", budget, found.threshold,
                    found.macs_ratio)
    batch = b.p.evaluate.batch_size
    with MacCounter(model) as full:
        _probe(b, batch)(den)
    with first_block_cache(model, found.threshold) as wrap:
        cached = wrap(den)
        with MacCounter(model) as ran:
            _probe(b, batch)(cached)
        return b.run("first-block-cache", cached, [model], key=(budget, found.threshold),
                     extra={"train_steps": 0, "threshold": found.threshold, "search_within_2pct": found.within,
                            "macs_ratio_at_eval_batch": ran.total / full.total, "eval_batch": batch})


def taylorseer_run(b: Bench, budget: float) -> Run:
    model, den = _teacher_copy(b)
    found = taylorseer_for_macs(_probe(b, 1), den, model, budget, tolerance=MACS_TOLERANCE)
    if not found.within:
        log.warning("taylorseer at %s: nearest setting (interval %d, warmup %d) gives %.3f", budget,
                    found.cache_interval, found.warmup, found.macs_ratio)
    with taylorseer_cache(model, found.cache_interval, found.warmup, found.max_order) as wrap:
        return b.run("taylorseer", wrap(den), [model],
                     key=(budget, found.cache_interval, found.warmup, found.max_order),
                     extra={"train_steps": 0, "cache_interval": found.cache_interval, "warmup": found.warmup,
                            "max_order": found.max_order, "search_within_2pct": found.within})


def fewer_steps_run(b: Bench, budget: float) -> Run:
    steps = max(1, round(budget * b.p.evaluate.steps))
    return b.run("fewer-steps", b.teacher_sampler(), [b.teacher], steps=steps, key=steps,
                 extra={"steps": steps, "train_steps": 0})


def to_markdown(b: Bench, grid: dict[float, dict[str, Run]], quick: bool) -> str:
    t, _ = b.reference()
    ev = b.p.evaluate
    lines = ["# DiP-GO vs diffusers' FirstBlockCache and TaylorSeer on a class-conditional DiT"
             + (" (QUICK smoke setting: numbers are meaningless)" if quick else ""), "",
             f"Teacher: the dit-digits preset's DiT ({b.p.dit.num_layers} blocks, {t['params']:,} params, "
             f"{t['macs_per_step'] / 1e6:.3f} MMACs/step), {b.teacher_info['steps']} training steps "
             f"({b.teacher_info['train_seconds'] / 60:.1f} min on {b.teacher_info['device']}), FID {t['fid']:.3f} "
             f"± {t['fid_std']:.3f} (floor {b.teacher_info['fid_floor']:.3f}).",
             f"Protocol: {ev.sampler} {ev.steps} steps, {ev.num_samples} samples per seed (class i % n), seeds "
             f"{list(ev.seeds)}, features: {t['feature_extractor']}, on the VAE-decoded images. MACs: counted on one "
             "image's trajectory; FirstBlockCache decides from the whole batch, so its MACs at the evaluation batch "
             "are given beside them.", ""]
    for bud, runs in grid.items():
        d = runs["dipgo"]
        cmp = [compare(d, runs[m]) for m in METHODS[1:] if m in runs]
        lines += [f"## Budget {bud}", "", TABLE_HEAD, run_row(d, cmp), *(run_row(runs[m]) for m in METHODS[1:]
                                                                        if m in runs), ""]
        if "first-block-cache" in runs:
            x = runs["first-block-cache"].extra
            lines += [f"FirstBlockCache: threshold {x['threshold']:.4g}; MACs at the evaluation batch of "
                      f"{x['eval_batch']}: {x['macs_ratio_at_eval_batch']:.3f} of the teacher's.", ""]
        if "taylorseer" in runs:
            x = runs["taylorseer"].extra
            lines += [f"TaylorSeer: cache_interval {x['cache_interval']}, warmup {x['warmup']} full steps, order "
                      f"{x['max_order']} (attn1 and ff of every block)"
                      f"{'' if x['search_within_2pct'] else ' - NOT within 2% of the budget'}.", ""]
    return "\n".join(lines + ["![PSNR and FID vs MACs](dit_cache.png)"]) + "\n"


def run_bench(name: str, p, methods: tuple[str, ...], runs_at: Callable[[Bench, float], dict[str, Run]],
              markdown: Callable[[Bench, dict, bool], str], title: str, quick: bool, out: Path,
              progress: bool, budgets: tuple[float, ...] = BUDGETS) -> None:
    """A latent family's cache benchmark (this one, ``benchmarks.sd_cache``): for each budget the
    runs of ``runs_at(b, budget)`` (``methods[0]`` against the others), then ``NAME.{json,md,png}``."""
    root = common.QUICK_ROOT if quick else REPO  # (read at call time: tests/test_benchmarks.py points it elsewhere)
    out = common.QUICK_ROOT / "results" if quick else out
    b = setup(p, root, progress)
    grid: dict[float, dict[str, Run]] = {}
    for bud in budgets[:1] if quick else budgets:
        grid[bud] = runs_at(b, bud)
        log.info("budget %s: %s", bud, {m: round(r.metrics["fid"], 3) for m, r in grid[bud].items()})
    t, _ = b.reference()
    sections = ("data", "teacher", p.teacher.family, "autoencoder", "evaluate", "dipgo")
    doc = {"quick": quick, "teacher": t, "teacher_training": b.teacher_info,
           "params": {s: to_dict(p.section(s)) for s in sections},
           "budgets": [{"budget": bud, "runs": {m: r.to_json() for m, r in runs.items()},
                        f"{methods[0]}_vs": [compare(runs[methods[0]], runs[m]) for m in methods[1:]]}
                       for bud, runs in grid.items()]}
    write_results(out, name, doc, markdown(b, grid, quick))
    plot_pareto({m: [runs[m] for runs in grid.values()] for m in methods}, out / f"{name}.png", title, t["fid"])


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    out: Annotated[Path, typer.Option(help="folder for dit_cache.json / .md / .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON, Markdown and plot."""
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def runs_at(b: Bench, bud: float) -> dict[str, Run]:
        return {"dipgo": dipgo_run(b, bud, progress), "first-block-cache": fbc_run(b, bud),
                "taylorseer": taylorseer_run(b, bud), "fewer-steps": fewer_steps_run(b, bud)}

    run_bench("dit_cache", bench_params(quick), METHODS, runs_at, to_markdown,
              "DiP-GO vs FirstBlockCache and TaylorSeer (DiT, digits)", quick, out, progress)


if __name__ == "__main__":
    typer.run(main)
