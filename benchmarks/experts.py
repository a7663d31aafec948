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
# 20% of the teacher in all, which Diff-Pruning gets too; the chosen cut checked over 3 gradient seeds
BENCH_OVERRIDES = {"experts": {"fraction": 0.05}, "prune_experts": {"fraction": 0.05},
                   "intervals": {"stability_seeds": 3}}
# the variants of the mixture: (intervals, how the fine-tuning steps are shared among the experts)
VARIANTS = {"experts-chosen": ("chosen", "equal"), "experts-served": ("chosen", "served"),
            "experts-uniform": ("uniform", "equal")}
METHODS = (*VARIANTS, "diff-pruning")
FEW_BATCHES = 4  # the alignment estimate of the old default, re-estimated beside the bench's one

QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "intervals": {"grid": 6, "batches": 1, "batch_size": 8, "stability_seeds": 2},
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

def intervals_project(base: Path, p: Params, kind: str) -> Path:
    """Project folder holding ``kind`` ("chosen" | "uniform") intervals of the teacher (keyed by
    ``p.intervals`` only: every variant with these intervals shares it)."""
    key = fingerprint(base.name, p.intervals)
    chosen = _project(base.parent, f"intervals-chosen-{key}", {rel: base / rel for rel in SHARED})
    if not (chosen / stages.INTERVALS / "intervals.json").exists():
        stages.run_intervals(p, chosen, progress=False)
    if kind == "chosen":
        return chosen
    root = _project(base.parent, f"intervals-{kind}-{key}", {rel: base / rel for rel in SHARED})
    if not (root / stages.INTERVALS / "intervals.json").exists():
        doc = read_json(chosen / stages.INTERVALS / "intervals.json")
        cuts = uniform_cuts(p.intervals.grid, doc["k"])
        bounds = uniform_boundaries(doc["num_train_timesteps"], doc["k"])
        doc |= {"cuts": cuts, "boundaries": bounds, "objective": objective(doc["alignment"], cuts),
                "steps_served": steps_per_expert(doc.get("sampling_timesteps", []), bounds)}
        for k in ("seed_boundaries", "seed_outlier_rows", "stable"):  # they describe the chosen cut
            doc.pop(k, None)
        with atomic_path(root / stages.INTERVALS, is_dir=True) as tmp:
            tmp.mkdir(parents=True)
            write_json(tmp / "intervals.json", doc)
    return root


def variant_params(p: Params, split: str) -> Params:
    """``p`` with the experts' and their fine-tuning's steps shared ``split`` ("equal" | "served")."""
    return with_values(p, experts=with_values(p.experts, split=split),
                       prune_experts=with_values(p.prune_experts, split=split))


def variant_project(base: Path, p: Params, method: str, progress: bool) -> Path:
    """Project folder of one mixture variant with its elastic experts trained."""
    kind, split = VARIANTS[method]
    pv = variant_params(p, split)
    ivs = intervals_project(base, p, kind)
    root = _project(base.parent, f"{method}-{fingerprint(ivs.name, pv.experts)}",
                    {rel: ivs / rel for rel in (*SHARED, stages.INTERVALS)})
    stages.run_experts(pv, root, progress=progress)
    return root


def mixture_run(b: Bench, variant: Path, method: str, budget: float, progress: bool) -> Run:
    """Router, pruning, fine-tuning and evaluation of one mixture variant at one budget."""
    pv = variant_params(b.p, VARIANTS[method][1])
    pb = with_values(pv, router=with_values(pv.router, budget=budget))
    key = fingerprint(pb.router, pb.prune_experts)
    root = _project(variant.parent, f"{variant.name}-b{budget}-{key}",
                    {rel: variant / rel for rel in (*SHARED, stages.INTERVALS, stages.ELASTIC)})
    if not (root / stages.ROUTER / "router.json").exists():
        run_router(pb, root, progress=progress)
    stages.run_prune_experts(pb, root, progress=progress)
    summary, rdoc = read_json(root / stages.SUMMARY), read_json(root / stages.ROUTER / "router.json")
    intervals = read_json(root / stages.INTERVALS / "intervals.json")
    served, steps = intervals["steps_served"], b.teacher_info["steps"]
    per_expert = [stages.expert_steps("experts", pb.experts, steps, served, k)
                  + stages.expert_steps("prune_experts", pb.prune_experts, steps, rdoc["steps_per_expert"], k)
                  for k in range(len(served))]
    loaded = load_target("experts", {"model": root / stages.MIXTURE}, b.device)
    extra = {"budget": budget, "boundaries": intervals["boundaries"], "objective": intervals["objective"],
             "router_ratio": rdoc["ratio"], "router_ratio_learned": rdoc.get("ratio_learned"),
             "router_offset": rdoc["offset"], "train_steps": sum(per_expert), "train_steps_per_expert": per_expert,
             "steps_per_expert": summary["steps_per_expert"], "macs_share": summary["macs_share"],
             "subnets_png": str(root / stages.ROUTER / "router.png")}
    return b.run(method, loaded.denoiser, loaded.modules, key=(variant.name, key), extra=extra)


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


def _seed_lines(title: str, doc: dict) -> list[str]:
    """The chosen cut of one alignment estimate per gradient seed, and its least-aligned row."""
    rows = doc.get("seed_outlier_rows", {})
    lines = [f"**{title}** ({doc['params']['batches']} batches of {doc['params']['batch_size']}): boundaries "
             f"{doc['boundaries']}, stable over seeds: {doc.get('stable', '?')}", "",
             "| gradient seed | boundaries | least-aligned row: t | its mean alignment | its neighbours' |",
             "|---|---|---|---|---|"]
    for seed, bounds in doc.get("seed_boundaries", {}).items():
        r = rows.get(seed, {})
        nb = r.get("neighbours_mean_alignment")
        lines.append(f"| {seed} | {bounds} | {r.get('timestep', '?')} | {r.get('mean_alignment', float('nan')):.3f} "
                     f"| {'-' if nb is None else f'{nb:.3f}'} |")
    return lines + [""]


def _intervals_lines(b: Bench, ivs: dict, few: dict) -> list[str]:
    ch = ivs["chosen"]
    lines = [f"## Intervals (K = {b.p.intervals.k}, grid {b.p.intervals.grid})", "",
             f"Chosen boundaries {ch['boundaries']} with J = {ch['objective']:.4f}, sampling steps per interval "
             f"{ch['steps_served']}; uniform {ivs['uniform']['boundaries']} with J = "
             f"{ivs['uniform']['objective']:.4f}, steps {ivs['uniform']['steps_served']}.", "",
             "| K | J | boundaries | sampling steps per interval |", "|---|---|---|---|",
             *(f"| {c['k']} | {c['objective']:.4f} | {c['boundaries']} | {c['steps_served']} |"
               for c in ch.get("candidates", [])), "",
             *_seed_lines("The bench's estimate", ch),
             *_seed_lines(f"The estimate from {FEW_BATCHES} batches (the old default)", few)]
    return lines


def _router_lines(grid: dict[float, dict[str, Run]]) -> list[str]:
    """Whether the agent met each budget itself: its own MACs ratio, the one after the offset."""
    lines = ["## The agent's own selection against the budget", "",
             "| budget | variant | agent's own MACs ratio | after the adjustment | shift / budget | logit offset |",
             "|---|---|---|---|---|---|"]
    for budget, runs in grid.items():
        for m in VARIANTS:
            e = runs[m].extra
            own = e.get("router_ratio_learned")
            shift = "?" if own is None else f"{abs(e['router_ratio'] - own) / budget:.1%}"
            lines.append(f"| {budget} | {m} | {'?' if own is None else f'{own:.3f}'} | {e['router_ratio']:.3f} "
                         f"| {shift} | {e['router_offset']:+.2f} |")
    return lines + [""]


def to_markdown(b: Bench, ivs: dict, few: dict, grid: dict[float, dict[str, Run]], quick: bool) -> str:
    lines = ["# Mixture of efficient experts" + (" (QUICK smoke setting: numbers are meaningless)" if quick else ""),
             "", *teacher_lines(b),
             "Training steps: elastic + pruned fine-tuning summed over experts; Diff-Pruning gets the same. "
             "experts-served shares them by the sampling steps each expert serves, the others equally.", "",
             *_intervals_lines(b, ivs, few), *_router_lines(grid)]
    for budget, runs in grid.items():
        ch, sv = runs["experts-chosen"], runs["experts-served"]
        lines += [f"## Budget {budget}", "",
                  f"Sampling steps per expert {ch.extra['steps_per_expert']}; training steps per expert: "
                  f"{ch.extra['train_steps_per_expert']} (equal), {sv.extra['train_steps_per_expert']} (served); "
                  f"MACs share {' / '.join(f'{s:.2f}' for s in ch.extra['macs_share'])}.", "", TABLE_HEAD,
                  run_row(ch, [compare(ch, runs[m]) for m in ("experts-uniform", "diff-pruning")]),
                  run_row(sv, [compare(sv, runs[m]) for m in ("experts-chosen", "diff-pruning")]),
                  run_row(runs["experts-uniform"]), run_row(runs["diff-pruning"]), "",
                  f"![sub-networks per expert at budget {budget}](experts-subnets-b{budget}.png)", ""]
    return "\n".join(lines + ["![PSNR and FID vs MACs](experts.png)"]) + "\n"


def run_grid(b: Bench, base: Path, budgets, progress: bool) -> dict[float, dict[str, Run]]:
    """Every variant and one Diff-Pruning model at each budget (moved to what Diff-Pruning reaches)."""
    variants = {m: variant_project(base, b.p, m, progress) for m in VARIANTS}
    grid: dict[float, dict[str, Run]] = {}
    for nominal in budgets:
        budget = reachable_budget(b, nominal)
        runs = {m: mixture_run(b, v, m, budget, progress) for m, v in variants.items()}
        ch = runs["experts-chosen"]
        runs["diff-pruning"] = diff_pruning_run(b, ch.macs_ratio, ch.extra["train_steps"], progress)
        grid[budget] = runs
        log.info("budget %s: compared at %s (the MACs one Diff-Pruning model reaches)", nominal, budget)
    return grid


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for experts.json / .md / .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON, Markdown and plots."""
    b, out = start("experts", quick=quick, root=root, out=out, overrides=QUICK if quick else BENCH_OVERRIDES,
                   progress=progress)
    p, budgets = b.p, BUDGETS[1:2] if quick else BUDGETS
    base = _project(b.root / ".work" / "bench-experts", f"base-{b.key}",
                    {"data/dataset": b.root / core.DATASET, core.FEATURES: b.root / core.FEATURES,
                     core.TEACHER: b.teacher_dir})
    ivs = {kind: read_json(intervals_project(base, p, kind) / stages.INTERVALS / "intervals.json")
           for kind in ("chosen", "uniform")}
    few_p = with_values(p, intervals=with_values(p.intervals, batches=min(FEW_BATCHES, p.intervals.batches)))
    few = read_json(intervals_project(base, few_p, "chosen") / stages.INTERVALS / "intervals.json")
    grid = run_grid(b, base, budgets, progress)
    doc = {"quick": quick, "teacher": b.reference()[0], "teacher_training": b.teacher_info,
           "intervals": {kind: {k: d.get(k) for k in ("boundaries", "objective", "cuts", "steps_served", "candidates",
                                                      "seed_boundaries", "seed_outlier_rows", "outlier_row")}
                         for kind, d in {**ivs, f"chosen-{FEW_BATCHES}-batches": few}.items()},
           "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "intervals", "experts",
                                                         "router", "prune_experts", "taylor")},
           "budgets": [{"budget": bud, "runs": {m: r.to_json() for m, r in runs.items()},
                        "chosen_vs": [compare(runs["experts-chosen"], runs[m]) for m in ("experts-uniform", "diff-pruning")],
                        "served_vs": [compare(runs["experts-served"], runs[m]) for m in ("experts-chosen", "diff-pruning")]}
                       for bud, runs in grid.items()]}
    write_results(out, "experts", doc, to_markdown(b, ivs, few, grid, quick))
    series = {m: [runs[m] for runs in grid.values()] for m in METHODS}
    plot_pareto(series, out / "experts.png", "Timestep experts vs one Diff-Pruning model", b.reference()[0]["fid"])
    copies = {out / "experts-alignment.png": intervals_project(base, p, "chosen") / stages.INTERVALS / "alignment.png",
              **{out / f"experts-subnets-b{bud}.png": Path(runs["experts-chosen"].extra["subnets_png"])
                 for bud, runs in grid.items()}}
    for dst, src in copies.items():
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


if __name__ == "__main__":
    typer.run(main)
