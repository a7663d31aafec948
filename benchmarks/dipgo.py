"""Benchmark: DiP-GO against cheaper-trajectory baselines at equal trajectory MACs.

On the benchmark teacher (:func:`benchmarks.common.bench_teacher`), for each target MACs ratio
(method / the teacher's full-protocol trajectory) and each base trajectory (the protocol's steps,
e.g. 50, and a shorter one, e.g. 20: at 20 steps fewer-steps is no longer saturated):

* ``dipgo``       - the learned skip schedule, trained on that trajectory;
* ``fewer-steps`` - the full model with 50 x ratio sampling steps (each ratio is snapped to a whole
  number of steps, 0.33 -> 0.34 and 0.25 -> 0.24, so that it is met exactly);
* ``deepcache``   - DeepCache at the ratio (:func:`~diffprune.pruning.dipgo.deepcache_for_macs`): a
  uniform (interval <= 5, branch) schedule, on fewer steps than the base trajectory where its
  shallow branch alone costs more than the budget;
* ``random``      - a random skip schedule on that trajectory, thresholded to the ratio.

Each is evaluated with the harness: FID over 3 seeds, KID, paired PSNR/SSIM against the teacher's
samples from the same noises, the speedup timed against the teacher; DiP-GO is compared with every
baseline at the same point (paired test, FID intervals). Writes ``benchmarks/results/dipgo.{json,md,png}``
and, per point, the learned schedule's heatmap. Every finished run is cached under ``.work/``.

Usage::

    python -m benchmarks.dipgo            # the real thing
    python -m benchmarks.dipgo --quick    # a tiny end-to-end smoke run in .work/bench-quick
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from diffprune.config import to_dict
from diffprune.io import atomic_path, read_json, write_json
from diffprune.pruning.dipgo import (
    Schedule,
    SkipScheduleDenoiser,
    deepcache_for_macs,
    random_schedule,
    save_heatmap,
    train_pruner,
)
from diffprune.sampling import ModelDenoiser
from diffprune.stages.core import work_dir

from benchmarks.common import REPO, Bench, QUICK_SPINE, Run, start, with_values
from benchmarks.tables import TABLE_HEAD, compare, plot_pareto, run_row, teacher_lines, write_results

log = logging.getLogger("benchmarks.dipgo")

BASELINES = ("fewer-steps", "deepcache", "random")
RATIOS = (0.5, 0.33, 0.25)
SHORT_TRAJECTORY = 20

# A tiny end-to-end setting: checks that the benchmark runs, says nothing about the method.
QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "evaluate": {**QUICK_SPINE["evaluate"], "steps": 6},
    "dipgo": {"steps": 4, "batch_size": 2, "pool_size": 8, "dim": 16, "tolerance": 0.05},
}


def plot_histories(histories: dict[str, list[dict]], png: Path) -> None:
    """The pruner's consistency loss and kept-MACs ratio over its training steps, one line per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for tag, hist in histories.items():
        if hist:
            a1.plot([h["step"] for h in hist], [h["consistency"] for h in hist], label=tag)
            a2.plot([h["step"] for h in hist], [h["kept_ratio"] for h in hist], label=tag)
    a1.set(xlabel="pruner step", ylabel="consistency loss", yscale="log")
    a2.set(xlabel="pruner step", ylabel="kept MACs (of its trajectory)")
    a2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def train_schedule(b: Bench, steps: int, ratio: float, progress: bool) -> tuple[Schedule, dict]:
    """DiP-GO on a ``steps``-step trajectory at ``ratio`` of THAT trajectory's MACs (cached)."""
    cfg = with_values(b.p.dipgo, target_ratio=ratio)
    work = work_dir(b.root, "bench-dipgo-pruner", b.key, cfg, steps)
    if (work / "info.json").exists():
        return Schedule.load(work / "schedule.json"), read_json(work / "info.json")
    schedule, info = train_pruner(b.teacher, b.scheduler_config, cfg, steps=steps, sample_shape=b.sample_shape,
                                  device=b.device, progress=progress, sampler=b.p.evaluate.sampler,
                                  work_dir=work / "state")
    schedule.save(work / "schedule.json")
    write_json(work / "info.json", info)  # last: marks it done (the loss history included: the curves plot)
    return schedule, info


def reuse_pattern(schedule: Schedule) -> dict[str, int]:
    """How a schedule saves: steps whose whole prediction is reused (no block runs after step 0's),
    steps with some blocks reused, and steps computed in full."""
    ex = schedule.executed()
    whole = sum(not any(row) for row in ex[1:])
    full = sum(all(row) for row in ex[1:]) + 1
    return {"steps": len(ex), "whole_step_reuse": whole, "partial_reuse": len(ex) - whole - full, "full": full}


def point(b: Bench, out: Path, steps: int, target: float, progress: bool) -> dict[str, Run]:
    """All methods at ``target`` of the teacher's full trajectory, on a ``steps``-step base trajectory."""
    full = b.p.evaluate.steps
    inner = target * full / steps  # the same MACs as a ratio of the shorter trajectory's
    schedule, info = train_schedule(b, steps, inner, progress)
    tag = f"T{steps}_r{target}"
    schedule.save(out / f"dipgo_schedule_{tag}.json")
    save_heatmap(schedule, out / f"dipgo_schedule_{tag}.png")
    deepcache = deepcache_for_macs(b.teacher, steps, inner, b.sample_shape)
    save_heatmap(deepcache, out / f"deepcache_schedule_{tag}.png",
                 title=f"deepcache: interval {deepcache.meta['interval']}, branch {deepcache.meta['branch']}, "
                       f"{deepcache.meta['steps']} steps")
    rand = random_schedule(b.teacher, steps, inner, b.sample_shape, seed=b.p.dipgo.seed,
                           tolerance=b.p.dipgo.tolerance)
    fewer = max(1, round(full * target))
    key = (steps, target)
    teacher = [b.teacher]
    return {
        "dipgo": b.run("dipgo", SkipScheduleDenoiser(b.teacher, schedule), teacher, steps=steps,
                       key=(key, to_dict(b.p.dipgo)),
                       extra={"train_steps": info["train_steps"], "train_seconds": info["train_time_s"],
                              "heatmap": f"dipgo_schedule_{tag}.png", "pattern": reuse_pattern(schedule)}),
        "fewer-steps": b.run("fewer-steps", ModelDenoiser(b.teacher), teacher, steps=fewer, key=fewer,
                             extra={"steps": fewer}),
        "deepcache": b.run("deepcache", SkipScheduleDenoiser(b.teacher, deepcache), teacher,
                           steps=deepcache.meta["steps"],
                           key=(key, deepcache.meta),
                           extra={**deepcache.meta, "heatmap": f"deepcache_schedule_{tag}.png",
                                  "pattern": reuse_pattern(deepcache)}),
        "random": b.run("random", SkipScheduleDenoiser(b.teacher, rand), teacher, steps=steps, key=key),
    }


def to_markdown(b: Bench, grid: dict[tuple[int, float], dict[str, Run]], quick: bool) -> str:
    d = b.p.dipgo
    lines = ["# DiP-GO vs baselines at equal trajectory MACs" + (" (QUICK smoke setting: numbers are meaningless)"
                                                                 if quick else ""), "", *teacher_lines(b),
             f"Pruner: {d.steps} SGD steps (lr {d.lr}, momentum {d.momentum}), batch {d.batch_size} from a pool of "
             f"{d.pool_size} noises, loss {d.loss}, alpha_s {d.alpha_s}, D {d.dim}.", ""]
    for (steps, target), runs in grid.items():
        lines += [f"## {target}x the teacher's MACs, on a {steps}-step base trajectory", "", TABLE_HEAD]
        lines.append(run_row(runs["dipgo"], [compare(runs["dipgo"], runs[m]) for m in BASELINES]))
        lines += [run_row(runs[m]) for m in BASELINES]
        dp, dc = runs["dipgo"].extra, runs["deepcache"].extra
        pat = dp["pattern"]
        lines += ["", f"DiP-GO's schedule: the whole prediction reused at {pat['whole_step_reuse']} of {pat['steps']} "
                  f"steps, some blocks reused at {pat['partial_reuse']}, {pat['full']} computed in full. DeepCache: "
                  f"interval {dc['interval']}, branch {dc['branch']}, on {dc['steps']} steps.", "",
                  f"![DiP-GO's schedule]({dp['heatmap']}) ![DeepCache's schedule]({dc['heatmap']})", ""]
    return "\n".join(lines + ["![PSNR and FID vs MACs](dipgo.png)", "",
                              "![the pruner's training curves](dipgo_pruner_curves.png)"]) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for dipgo.json, .md, .png and the schedules")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON + Markdown + PNG results."""
    b, out = start("dipgo", quick=quick, root=root, out=out, overrides=QUICK if quick else None, progress=progress)
    p = b.p
    short = 4 if quick else SHORT_TRAJECTORY
    ratios = RATIOS[:2] if quick else RATIOS  # 0.25x of a 6-step trajectory is finer than its gates can cut
    # each target snapped to a whole number of the protocol's steps (0.33 -> 17/50 = 0.34), so that
    # fewer-steps lands on it exactly and every method of a point spends the same MACs (within 2%)
    ratios = tuple(round(max(1, round(r * p.evaluate.steps)) / p.evaluate.steps, 4) for r in ratios)
    grid = {(steps, r): point(b, out, steps, r, progress)
            for steps in (p.evaluate.steps, short) for r in ratios if r * p.evaluate.steps / steps <= 1.0}
    doc = {"quick": quick, "teacher": b.reference()[0], "teacher_training": b.teacher_info,
           "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "dipgo")},
           "points": [{"steps": s, "target": r, "runs": {m: run.to_json() for m, run in runs.items()},
                       "dipgo_vs": [compare(runs["dipgo"], runs[m]) for m in BASELINES]}
                      for (s, r), runs in grid.items()]}
    write_results(out, "dipgo", doc, to_markdown(b, grid, quick))
    series = {f"{m} (T={s})": [runs[m] for (s2, _), runs in grid.items() if s2 == s]
              for s in (p.evaluate.steps, short) for m in ("dipgo", "deepcache", "random")}
    series["fewer-steps"] = list({runs["fewer-steps"].extra["steps"]: runs["fewer-steps"] for runs in grid.values()}.values())
    plot_pareto(series, out / "dipgo.png", "DiP-GO vs baselines (paired fidelity and FID vs MACs)",
                b.reference()[0]["fid"])
    histories = {f"T{s}_r{r}": train_schedule(b, s, r * p.evaluate.steps / s, progress)[1]["history"]
                 for s, r in grid}  # cached: read back from each point's info.json
    plot_histories(histories, out / "dipgo_pruner_curves.png")


if __name__ == "__main__":
    typer.run(main)
