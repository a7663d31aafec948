"""Benchmark: Diff-Pruning against its ablations (plain Taylor, magnitude, random) at equal MACs.

On the benchmark teacher, for each target MACs ratio (0.56x: the paper's operating point, 6.1G ->
3.4G on CIFAR-10; and 0.35x) and every importance, the channel ratio is searched until the pruned
UNet's MACs land within 2% of the target (:func:`diffprune.pruning.taylor.search_ratio`); the pruned net is
evaluated right away and again after fine-tuning for ``finetune.fraction`` (at most 0.2) of the
teacher's training steps, the same steps for every importance. Diff-Pruning is compared with each
ablation at both stages: paired test on per-image PSNR against the teacher, FID intervals.
Writes ``benchmarks/results/taylor.{json,md,png}``; every probe and run is cached under ``.work/``.

Usage::

    python -m benchmarks.taylor            # the real thing
    python -m benchmarks.taylor --quick    # a tiny end-to-end smoke run in .work/bench-quick
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from diffprune.config import to_dict
from diffprune.pruning.taylor import IMPORTANCES, RatioSearch, finetune_spec, prune_unet, search_ratio
from diffprune.sampling import ModelDenoiser
from diffprune.stages.core import train_or_resume, work_dir

from benchmarks.common import REPO, Bench, QUICK_SPINE, Run, start, with_values
from benchmarks.tables import TABLE_HEAD, compare, plot_pareto, run_row, teacher_lines, write_results

log = logging.getLogger("benchmarks.taylor")

TARGETS = (0.56, 0.35)
FULL = {"finetune": {"fraction": 0.2}}  # fine-tuning: 20% of the teacher's training steps (the cap)
ABLATIONS = ("taylor", "magnitude", "random")

# A tiny end-to-end setting: checks that the benchmark runs, says nothing about the method.
QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "taylor": {"batch_size": 16, "max_timesteps": 20},
    "finetune": {"fraction": 0.2, "batch_size": 16, "checkpoint_every": 1},
}


def run_one(b: Bench, importance: str, target: float, progress: bool) -> tuple[RatioSearch, Run, Run]:
    """Prune at the ratio matching ``target`` MACs, evaluate; fine-tune, evaluate."""
    m = search_ratio(b.teacher, b.images, b.p.taylor, target, device=b.device)  # the same ratio for every importance
    cfg = with_values(b.p.taylor, importance=importance, ratio=m.ratio)
    spec = finetune_spec(b.p.finetune, b.p.teacher.steps)
    pruned, report = prune_unet(b.teacher, b.train_scheduler, b.images, cfg, device=b.device)
    extra = {"importance": importance, "channel_ratio": m.ratio, "macs_within_2pct": m.within,
             "timesteps_used": report["timesteps_used"], "params": report["params_after"]}
    right_after = b.run(f"{importance}-pruned", ModelDenoiser(pruned.eval()), [pruned], key=to_dict(cfg),
                        extra={**extra, "train_steps": 0})
    work = work_dir(b.root, "bench-taylor-finetune", b.key, cfg, b.p.finetune, spec.steps)
    tuned = train_or_resume(pruned, b.images, b.train_scheduler, spec, work, device=b.device, progress=progress,
                            desc=f"fine-tune {importance} @ {target}")
    after = b.run(f"{importance}-finetuned", ModelDenoiser(tuned), [tuned], key=(to_dict(cfg), spec.steps),
                  extra={**extra, "train_steps": spec.steps})
    return m, right_after, after


def to_markdown(b: Bench, grid: dict[float, dict[str, tuple[RatioSearch, Run, Run]]], quick: bool, steps: int) -> str:
    lines = ["# Diff-Pruning vs ablations at equal MACs" + (" (QUICK smoke setting: numbers are meaningless)"
                                                            if quick else ""), "", *teacher_lines(b),
             f"Fine-tuning: {steps} steps for every importance (finetune.fraction "
             f"{b.p.finetune.fraction:.0%} of the teacher's {b.teacher_info['steps']}).", ""]
    for target, runs in grid.items():
        for stage, idx in (("right after pruning", 1), ("after fine-tuning", 2)):
            m = runs["diff-pruning"][0]
            reached = (f"{m.macs_ratio:.3f}x reached" if m.within else f"{m.macs_ratio:.3f}x reached: the nearest to "
                       "it, since whole channels per GroupNorm group move the MACs in steps")
            lines += [f"## Target {target}x the teacher's MACs ({reached}; channel ratio {m.ratio:.3f}), {stage}", "",
                      TABLE_HEAD]
            dp = runs["diff-pruning"][idx]
            lines.append(run_row(dp, [compare(dp, runs[a][idx]) for a in ABLATIONS if a in runs]))
            lines += [run_row(runs[a][idx]) for a in ABLATIONS if a in runs]
            lines.append("")
    return "\n".join(lines + ["![PSNR and FID vs MACs](taylor.png)"]) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for taylor.json, .md, .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    targets: Annotated[str, typer.Option(help="comma-separated MACs ratios")] = ",".join(map(str, TARGETS)),
) -> None:
    """Run the benchmark and write its JSON + Markdown + PNG results."""
    try:
        target_list = [float(t) for t in targets.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"--targets = {targets!r}: expected comma-separated numbers") from None
    b, out = start("taylor", quick=quick, root=root, out=out, overrides=QUICK if quick else FULL, progress=progress)
    p, target_list = b.p, target_list[:1] if quick else target_list
    grid = {t: {imp: run_one(b, imp, t, progress) for imp in IMPORTANCES} for t in target_list}
    steps = finetune_spec(b.p.finetune, b.p.teacher.steps).steps
    doc = {"quick": quick, "teacher": b.reference()[0], "teacher_training": b.teacher_info, "finetune_steps": steps,
           "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "taylor", "finetune")},
           "targets": [{"target": t, "runs": {imp: {"matched": vars(m), "pruned": a.to_json(), "finetuned": f.to_json()}
                                              for imp, (m, a, f) in runs.items()},
                        "diff_pruning_vs": {stage: [compare(runs["diff-pruning"][i], runs[a][i]) for a in ABLATIONS]
                                            for stage, i in (("pruned", 1), ("finetuned", 2))}}
                       for t, runs in grid.items()]}
    write_results(out, "taylor", doc, to_markdown(b, grid, quick, steps))
    series = {imp: [runs[imp][2] for runs in grid.values()] for imp in IMPORTANCES}
    plot_pareto(series, out / "taylor.png", "Diff-Pruning vs ablations after fine-tuning", b.reference()[0]["fid"])


if __name__ == "__main__":
    typer.run(main)
