"""Benchmark: the mixture of efficient experts, chosen vs uniform intervals, vs one Diff-Pruning model.

On the benchmark teacher:

1. Intervals: the gradient-alignment intervals (and their objective ``J``) next to uniform ones.
2. For MACs budgets near 0.3 / 0.5 / 0.7 of the teacher's trajectory: the mixture with the chosen
   intervals, the mixture with uniform intervals (same elastic training, router and fine-tuning),
   and one Diff-Pruning model whose channel ratio is searched until its MACs match what the chosen
   mixture reached (within 2%), fine-tuned for as many steps as the mixture's experts got in total.
   A budget one Diff-Pruning model cannot reach within 2% is moved to the MACs it reaches nearest
   to it (:func:`reachable_budget`; on digits 0.3 -> 0.25, 0.5 -> 0.45, 0.7 -> 0.56).
   Every model is evaluated with the harness (FID over 3 seeds, KID, paired PSNR/SSIM against the
   teacher, speedup timed against it) and the chosen mixture is compared with the uniform one and
   with Diff-Pruning (paired test, FID intervals).

Every variant runs the pipeline's own stage functions in a project folder of its own under
``.work/bench-experts*/`` (inputs hard-linked, folders keyed by the configs), so an interrupted
benchmark resumes. Writes ``benchmarks/results/experts.{json,md,png}`` and the alignment matrix.

Usage::

    python -m benchmarks.experts            # the real thing
    python -m benchmarks.experts --quick    # a tiny end-to-end smoke run in .work/bench-quick
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from diffprune.config import Params, fingerprint, to_dict
from diffprune.io import atomic_path, read_json, write_json
from diffprune.pruning.experts import objective, steps_per_expert, uniform_boundaries, uniform_cuts
from diffprune.pruning.taylor import prune_unet, search_ratio
from diffprune.sampling import ModelDenoiser
from diffprune.stages import core
from diffprune.stages import experts as stages
from diffprune.stages.router import run_router
from diffprune.targets import load_target
from diffprune.training import TrainSpec

from benchmarks.common import REPO, Bench, QUICK_SPINE, Run, start, with_values
from benchmarks.tables import TABLE_HEAD, compare, plot_pareto, run_row, teacher_lines, write_results

log = logging.getLogger("benchmarks.experts")

BUDGETS = (0.3, 0.5, 0.7)
# training per expert, as fractions of the benchmark teacher's steps: 2 experts x (0.05 + 0.05) =
# 20% of the teacher in all, which Diff-Pruning gets too
BENCH_FRACTIONS = {"experts": {"fraction": 0.05}, "prune_experts": {"fraction": 0.05}}

QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "intervals": {"grid": 6, "batches": 1, "batch_size": 8},
    "experts": {"fraction": 0.5, "batch_size": 8, "checkpoint_every": 2},
    "router": {"steps": 2, "batch_size": 4, "hidden": 8},
    "prune_experts": {"fraction": 0.34, "batch_size": 8, "checkpoint_every": 2},
    "taylor": {"batch_size": 16, "max_timesteps": 20},
    "finetune": {"batch_size": 16, "checkpoint_every": 2},
}


# ----------------------------------------------------------------------------- project folders

def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) ``src`` to ``dst``; stage outputs are always replaced, never written in place."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    tmp = dst.with_name(f".{dst.name}.linking")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=link)
    else:
        link(str(src), str(tmp))
    os.replace(tmp, dst)


def _project(parent: Path, name: str, sources: dict[str, Path]) -> Path:
    """A project folder ``parent/name`` holding ``sources`` (relative path -> existing artifact)."""
    root = parent / name
    for rel, src in sources.items():
        _link_tree(src, root / rel)
    return root


SHARED = ("data/dataset", core.FEATURES, core.TEACHER)


# ----------------------------------------------------------------------------- the mixture

def intervals_variant(base: Path, p: Params, kind: str, key: str, progress: bool) -> Path:
    """Project folder with ``kind`` ("chosen" | "uniform") intervals and the elastic experts trained."""
    key = fingerprint(key, p.intervals, p.experts)
    root = _project(base.parent, f"{kind}-{key}", {rel: base / rel for rel in SHARED})
    doc_path = root / stages.INTERVALS / "intervals.json"
    if not doc_path.exists():
        chosen = _project(base.parent, f"chosen-{key}", {rel: base / rel for rel in SHARED})
        if not (chosen / stages.INTERVALS / "intervals.json").exists():
            stages.run_intervals(p, chosen, progress=progress)
        if kind == "uniform":
            doc = read_json(chosen / stages.INTERVALS / "intervals.json")
            cuts = uniform_cuts(p.intervals.grid, doc["k"])
            bounds = uniform_boundaries(doc["num_train_timesteps"], doc["k"])
            doc |= {"cuts": cuts, "boundaries": bounds, "objective": objective(doc["alignment"], cuts),
                    "steps_served": steps_per_expert(doc.get("sampling_timesteps", []), bounds)}
            write_json(doc_path, doc)
    stages.run_experts(p, root, progress=progress)
    return root


def mixture_run(b: Bench, variant: Path, kind: str, budget: float, progress: bool) -> Run:
    """Router, pruning, fine-tuning and evaluation of one mixture at one budget."""
    pb = with_values(b.p, router=with_values(b.p.router, budget=budget))
    key = fingerprint(pb.router, pb.prune_experts)
    root = _project(variant.parent, f"{variant.name}-b{budget}-{key}",
                    {rel: variant / rel for rel in (*SHARED, stages.INTERVALS, stages.ELASTIC)})
    if not (root / stages.ROUTER / "router.json").exists():
        run_router(pb, root, progress=progress)
    stages.run_prune_experts(pb, root, progress=progress)
    summary, rdoc = read_json(root / stages.SUMMARY), read_json(root / stages.ROUTER / "router.json")
    intervals = read_json(root / stages.INTERVALS / "intervals.json")
    k = len(summary["macs_per_expert"])
    train_steps = k * (stages._steps(b.p.experts.fraction, b.teacher_info["steps"])
                       + stages._steps(b.p.prune_experts.fraction, b.teacher_info["steps"]))
    loaded = load_target("experts", {"model": root / stages.MIXTURE}, b.device)
    extra = {"budget": budget, "boundaries": intervals["boundaries"], "objective": intervals["objective"],
             "router_ratio": rdoc["ratio"], "router_ratio_learned": rdoc.get("ratio_learned"),
             "router_offset": rdoc["offset"], "train_steps": train_steps,
             "steps_per_expert": summary["steps_per_expert"], "macs_share": summary["macs_share"]}
    return b.run(f"experts-{kind}", loaded.denoiser, loaded.modules, key=(variant.name, key), extra=extra)


# ----------------------------------------------------------------------------- Diff-Pruning

def diff_pruning_run(b: Bench, target: float, train_steps: int, progress: bool) -> Run:
    """One Diff-Pruning model at ``target`` MACs (channel ratio searched to within 2%), fine-tuned for
    ``train_steps`` steps with the experts' fine-tuning recipe."""
    m = search_ratio(b.teacher, b.images, b.p.taylor, target, device=b.device)
    cfg = with_values(b.p.taylor, importance="diff-pruning", ratio=m.ratio)
    pruned, report = prune_unet(b.teacher, b.train_scheduler, b.images, cfg, device=b.device)
    f = b.p.prune_experts
    spec = TrainSpec(steps=train_steps, batch_size=f.batch_size, lr=f.lr, ema_decay=f.ema_decay,
                     checkpoint_every=f.checkpoint_every, seed=f.seed, distill=f.distill)
    work = core.work_dir(b.root, "bench-experts-diffpruning", b.key, cfg, spec)
    tuned = core.train_or_resume(pruned, b.images, b.train_scheduler, spec, work, device=b.device, progress=progress,
                                 desc=f"diff-pruning r={m.ratio:.3f}", teacher=b.teacher if spec.distill else None)
    return b.run("diff-pruning", ModelDenoiser(tuned), [tuned], key=(to_dict(cfg), train_steps),
                 extra={"channel_ratio": m.ratio, "macs_within_2pct": m.within, "train_steps": train_steps,
                        "params": report["params_after"]})


def reachable_budget(b: Bench, nominal: float) -> float:
    """``nominal``, or where one Diff-Pruning model cannot come within 2% of it (its MACs move in steps
    of whole channels per GroupNorm group), the MACs ratio it reaches nearest to it: every model of a
    budget is then compared at equal MACs."""
    m = search_ratio(b.teacher, b.images, b.p.taylor, nominal, device=b.device)
    return nominal if m.within else round(m.macs_ratio, 4)


def to_markdown(b: Bench, ivs: dict, grid: dict[float, dict[str, Run]], quick: bool) -> str:
    lines = ["# Mixture of efficient experts" + (" (QUICK smoke setting: numbers are meaningless)" if quick else ""),
             "", *teacher_lines(b),
             f"Intervals (K = {b.p.intervals.k}, grid {b.p.intervals.grid}): chosen boundaries "
             f"{ivs['chosen']['boundaries']} with J = {ivs['chosen']['objective']:.4f}; uniform "
             f"{ivs['uniform']['boundaries']} with J = {ivs['uniform']['objective']:.4f}.",
             "Training steps: elastic + pruned fine-tuning summed over experts; Diff-Pruning gets the same.", ""]
    for budget, runs in grid.items():
        ch = runs["experts-chosen"]
        learned = ch.extra.get("router_ratio_learned")
        lines += [f"## Budget {budget} (router: {'?' if learned is None else f'{learned:.3f}'} before adjustment, "
                  f"{ch.extra['router_ratio']:.3f} after, offset "
                  f"{ch.extra['router_offset']:.2f}; steps per expert {ch.extra['steps_per_expert']}, MACs share "
                  f"{' / '.join(f'{s:.2f}' for s in ch.extra['macs_share'])})", "", TABLE_HEAD,
                  run_row(ch, [compare(ch, runs[m]) for m in ("experts-uniform", "diff-pruning")]),
                  run_row(runs["experts-uniform"]), run_row(runs["diff-pruning"]), ""]
    return "\n".join(lines + ["![PSNR and FID vs MACs](experts.png)"]) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for experts.json / .md / .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON, Markdown and plot."""
    b, out = start("experts", quick=quick, root=root, out=out, overrides=QUICK if quick else BENCH_FRACTIONS,
                   progress=progress)
    p, budgets = b.p, BUDGETS[1:2] if quick else BUDGETS
    base = _project(b.root / ".work" / "bench-experts", f"base-{b.key}",
                    {"data/dataset": b.root / core.DATASET, core.FEATURES: b.root / core.FEATURES,
                     core.TEACHER: b.teacher_dir})
    variants = {kind: intervals_variant(base, p, kind, b.key, progress) for kind in ("chosen", "uniform")}
    ivs = {kind: read_json(v / stages.INTERVALS / "intervals.json") for kind, v in variants.items()}
    grid: dict[float, dict[str, Run]] = {}
    for nominal in budgets:
        budget = reachable_budget(b, nominal)
        runs = {f"experts-{kind}": mixture_run(b, v, kind, budget, progress) for kind, v in variants.items()}
        ch = runs["experts-chosen"]
        runs["diff-pruning"] = diff_pruning_run(b, ch.macs_ratio, ch.extra["train_steps"], progress)
        grid[budget] = runs
        log.info("budget %s: compared at %s (the MACs one Diff-Pruning model reaches)", nominal, budget)
    doc = {"quick": quick, "teacher": b.reference()[0], "teacher_training": b.teacher_info,
           "intervals": {kind: {"boundaries": d["boundaries"], "objective": d["objective"], "cuts": d["cuts"]}
                         for kind, d in ivs.items()},
           "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "intervals", "experts",
                                                         "router", "prune_experts", "taylor")},
           "budgets": [{"budget": bud, "runs": {m: r.to_json() for m, r in runs.items()},
                        "chosen_vs": [compare(runs["experts-chosen"], runs[m]) for m in ("experts-uniform", "diff-pruning")]}
                       for bud, runs in grid.items()]}
    write_results(out, "experts", doc, to_markdown(b, ivs, grid, quick))
    series = {m: [runs[m] for runs in grid.values()] for m in ("experts-chosen", "experts-uniform", "diff-pruning")}
    plot_pareto(series, out / "experts.png", "Timestep experts vs one Diff-Pruning model", b.reference()[0]["fid"])
    with atomic_path(out / "experts-alignment.png") as tmp:
        shutil.copyfile(variants["chosen"] / stages.INTERVALS / "alignment.png", tmp)


if __name__ == "__main__":
    typer.run(main)
