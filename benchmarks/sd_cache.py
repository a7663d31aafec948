"""Benchmark: DiP-GO against DeepCache on a text-to-image latent UNet, at equal trajectory MACs, with
fewer sampling steps as the simplest baseline (the digits benchmark's comparison, on the sd family).

The teacher is the ``sd-digits`` preset's (``presets/sd-digits.yaml``: a ``UNet2DConditionModel``
prompted "a handwritten {label}" through a tiny CLIP text encoder, on the 4 x 4 x 4 latents of a VAE
fitted to the digits), trained by the pipeline's own stages (data, latents, features, teacher) in a
workspace of this benchmark. For each budget (trajectory MACs / the teacher's 50-step trajectory):

* ``dipgo``       - the learned skip schedule over the UNet's blocks with the skip-connection cascade,
  trained on guided, prompted trajectories (the ``dipgo`` stage's graph, ``sd_conditioned``);
* ``deepcache``   - DeepCache's uniform schedule (full steps every ``interval``, the shallow branch
  between them on the cached deep features; fewer steps where the branch alone costs more than the
  budget), by ``deepcache_for_macs`` as on the digits benchmark;
* ``fewer-steps`` - the teacher with ``budget x 50`` steps.

Every run goes through the harness (FID over 3 seeds on the decoded images, paired PSNR against
the teacher's images from the same noises and prompts, speedup timed against the teacher).
Writes ``benchmarks/results/sd_cache.{json,md,png}``; every trained piece is cached.

Usage::

    python -m benchmarks.sd_cache            # the real thing
    python -m benchmarks.sd_cache --quick    # a tiny end-to-end smoke run in .work/bench-quick
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from diffprune.config import load_params, to_dict
from diffprune.families import merge_preset
from diffprune.models.sd import PromptCycle
from diffprune.pruning.dipgo import SkipScheduleSD, deepcache_for_macs, train_pruner
from diffprune.pruning.dipgo.conditioned import sd_conditioned
from diffprune.pruning.dipgo.sd import SDUNetGraph
from diffprune.safe_yaml import read_yaml
from diffprune.stages.core import work_dir

from benchmarks.common import MACS_TOLERANCE, QUICK_SPINE, REPO, SEEDS, Bench, Run, quiet_defaults
from benchmarks.common import with_values
from benchmarks.dit_cache import PROTOCOL, fewer_steps_run, run_bench
from benchmarks.tables import TABLE_HEAD, compare, run_row

log = logging.getLogger("benchmarks.sd_cache")

BUDGETS = (0.5, 0.35)
METHODS = ("dipgo", "deepcache", "fewer-steps")
QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "teacher": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "warmup_steps": 1},
    "sd": {"block_out_channels": [8, 16], "attention_head_dim": 2, "norm_num_groups": 4, "text_width": 16,
           "text_layers": 1, "text_heads": 2},
    "autoencoder": {"steps": 10, "batch_size": 32, "block_out_channels": [8, 8]},
    "evaluate": {**QUICK_SPINE["evaluate"], "steps": 8, "seeds": SEEDS},
    "dipgo": {"steps": 3, "batch_size": 2, "pool_size": 4, "dim": 8, "tolerance": 0.05},
}


def bench_params(quick: bool):
    """params.yaml with the sd-digits preset and the benchmark protocol (or the smoke setting) over it."""
    preset = read_yaml(REPO / "presets" / "sd-digits.yaml")
    return load_params(REPO / "params.yaml", merge_preset(preset, QUICK if quick else {"evaluate": PROTOCOL}))


def _scheduled(b: Bench, schedule) -> Any:
    """The teacher's prompt cycle with its guided calls running ``schedule`` (as the sd-dipgo loader does)."""
    cycle = b.teacher_sampler()
    return PromptCycle(SkipScheduleSD(b.teacher, schedule, cycle.guided.text, cycle.guided.guidance_scale),
                       cycle.table, cycle.vae)


def dipgo_run(b: Bench, budget: float, progress: bool) -> Run:
    cycle = b.teacher_sampler()
    cfg = with_values(b.p.dipgo, target_ratio=budget, tolerance=min(b.p.dipgo.tolerance, MACS_TOLERANCE))
    T = b.p.evaluate.steps
    table = cycle.table
    graph = sd_conditioned(b.teacher, table.cond.to(b.device), table.negative.to(b.device),
                           cycle.guided.guidance_scale, cycle.vae)
    schedule, _ = train_pruner(graph, b.scheduler_config, cfg, steps=T, sample_shape=b.sample_shape, device=b.device,
                               progress=progress, sampler=b.p.evaluate.sampler,
                               work_dir=work_dir(b.root, "bench-sd-cache-dipgo", b.key, cfg, T))
    return b.run("dipgo", _scheduled(b, schedule), [b.teacher], key=to_dict(cfg),
                 extra={"train_steps": cfg.steps, "schedule_ratio": schedule.macs_ratio})


def deepcache_run(b: Bench, budget: float) -> Run:
    tokens = b.teacher_sampler().guided.text.shape[1]
    schedule = deepcache_for_macs(SDUNetGraph(b.teacher, tokens=tokens), b.p.evaluate.steps, budget, b.sample_shape,
                                  tolerance=MACS_TOLERANCE)
    m = schedule.meta
    return b.run("deepcache", _scheduled(b, schedule), [b.teacher], steps=m["steps"],
                 key=(budget, m["steps"], m["interval"], m["branch"]),
                 extra={"train_steps": 0, "steps": m["steps"], "interval": m["interval"], "branch": m["branch"],
                        "cached": m["cached"]})


def to_markdown(b: Bench, grid: dict[float, dict[str, Run]], quick: bool) -> str:
    t, _ = b.reference()
    ev = b.p.evaluate
    lines = ["# DiP-GO vs DeepCache on a text-to-image latent UNet"
             + (" (QUICK smoke setting: numbers are meaningless)" if quick else ""), "",
             f"Teacher: the sd-digits preset's UNet2DConditionModel ({t['params']:,} params, "
             f"{t['macs_per_step'] / 1e6:.3f} MMACs/step), {b.teacher_info['steps']} training steps "
             f"({b.teacher_info['train_seconds'] / 60:.1f} min on {b.teacher_info['device']}), FID {t['fid']:.3f} "
             f"± {t['fid_std']:.3f} (floor {b.teacher_info['fid_floor']:.3f}).",
             f"Protocol: {ev.sampler} {ev.steps} steps, {ev.num_samples} samples per seed (image i prompted with "
             f"caption i % n), seeds {list(ev.seeds)}, features: {t['feature_extractor']}, on the VAE-decoded images.",
             ""]
    for bud, runs in grid.items():
        d = runs["dipgo"]
        lines += [f"## Budget {bud}", "", TABLE_HEAD, run_row(d, [compare(d, runs[m]) for m in METHODS[1:]]),
                  *(run_row(runs[m]) for m in METHODS[1:]), ""]
        x = runs["deepcache"].extra
        lines += [f"DeepCache: {x['steps']} steps, a full step every {x['interval']}, branch {x['branch']} "
                  f"(cached block {x['cached']}).", ""]
    return "\n".join(lines + ["![PSNR and FID vs MACs](sd_cache.png)"]) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    out: Annotated[Path, typer.Option(help="folder for sd_cache.json / .md / .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON, Markdown and plot."""
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def runs_at(b: Bench, bud: float) -> dict[str, Run]:
        return {"dipgo": dipgo_run(b, bud, progress), "deepcache": deepcache_run(b, bud),
                "fewer-steps": fewer_steps_run(b, bud)}

    run_bench("sd_cache", bench_params(quick), METHODS, runs_at, to_markdown,
              "DiP-GO vs DeepCache (text-to-image UNet, digits)", quick, out, progress, BUDGETS)


if __name__ == "__main__":
    typer.run(main)
