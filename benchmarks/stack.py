"""Benchmark: the stacked model (Diff-Pruning x timestep experts x DiP-GO x fewer steps) against
every single method, at trajectory-MACs budgets from 0.5x down to 0.1x of the teacher's.

On the benchmark teacher (50 DDIM steps):

1. Base networks: the teacher, one Diff-Pruning model per per-step MACs target in
   :data:`PRUNE_TARGETS` (fine-tuned with the ``finetune`` recipe), and the two mixtures of
   :data:`~diffprune.pruning.stack.ORDERS` at :data:`MIXTURE_AT` (2 experts on the experts
   benchmark's intervals, each fine-tuned for half of Diff-Pruning's steps: equal training).
2. For each budget, the ``stack`` stage's own search (:func:`diffprune.stages.stack.search`): every
   split of the budget on the grid nets x :data:`SKIPS`, a DiP-GO schedule trained where a split
   skips blocks, the best by paired PSNR on 64 validation noises (seed 9999, never evaluated). Every
   candidate is also scored by the paired feature distance and by the FID of 500 validation samples;
   the split each of those criteria picks (:data:`ALT_CRITERIA`) is evaluated beside the stack.
3. The chosen stack and each single method at the same MACs (within 2%): fewer steps, DiP-GO on the
   50-step trajectory, one Diff-Pruning model (channel ratio searched; fine-tuned as above), all
   through the harness (FID over 3 seeds, paired PSNR, speedup timed against the teacher). At the
   headline budget 0.2 the best split of each mixture order is evaluated too (which order is better).
   The timestep-expert mixtures of ``benchmarks/results/experts.json`` (same teacher) are plotted.

Writes ``benchmarks/results/stack.{json,md,png}``. Every trained piece is cached under ``.work/``.

Usage::

    python -m benchmarks.stack            # the real thing
    python -m benchmarks.stack --quick    # a tiny end-to-end smoke run in .work/bench-quick
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from diffprune.config import fingerprint, to_dict
from diffprune.io import read_json
from diffprune.models.checkpoint import load_model, read_config, save_model
from diffprune.pruning.dipgo import SkipScheduleDenoiser, train_pruner
from diffprune.pruning.stack import ORDERS, stacked_denoiser
from diffprune.pruning.taylor import PruningError, finetune_spec, prune_unet, search_ratio
from diffprune.sampling import ModelDenoiser
from diffprune.stages import core
from diffprune.stages import stack as stack_stage

from benchmarks.common import MACS_TOLERANCE, QUICK_SPINE, REPO, Bench, Run, start, with_values
from benchmarks.experts import _project, intervals_project
from benchmarks.tables import TABLE_HEAD, compare, plot_pareto, run_row, teacher_lines, write_results

log = logging.getLogger("benchmarks.stack")

BUDGETS = (0.5, 0.3, 0.2, 0.1)
HEADLINE = 0.2                 # the target: >= 5x fewer MACs at FID <= 1.25x the teacher's
PRUNE_TARGETS = (0.5641, 0.45, 0.2522)  # per-step MACs of the stack's Diff-Pruning nets (levels it reaches)
MIXTURE_AT = 0.45              # the mixtures' per-step MACs
SKIPS = (1.0, 0.5)             # nominal DiP-GO kept fractions of the search grid
SINGLES = ("fewer-steps", "dipgo", "diff-pruning")
# the splits the search's other criteria pick, evaluated beside the stack (chosen by stack.fidelity = psnr):
# the paired distance in the FID extractor's space, and the validation FID (500 samples: not paired)
ALT_CRITERIA = ("features", "fid")
FID_TARGET, SPEEDUP_TARGET = 1.25, 0.8
# the experts benchmark's intervals setting: its cached intervals are reused
# Every fine-tune here (the stack's nets and the one-pruned-model baseline alike) distils from the teacher
# (finetune.distill = 1; Diff-Pruning's paper fine-tunes on the plain loss): on the 0.45x net, 1600 steps,
# it raised validation PSNR from 22.92 to 24.66 dB at 50 steps (feature distance 0.103 -> 0.091).
BENCH_OVERRIDES = {"intervals": {"stability_seeds": 3}, "finetune": {"distill": 1.0},
                   "stack": {"fidelity": "psnr", "validation_fid_samples": 500}}

QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "evaluate": {**QUICK_SPINE["evaluate"], "steps": 8},
    "intervals": {"grid": 6, "batches": 1, "batch_size": 8, "stability_seeds": 1},
    "taylor": {"batch_size": 16, "max_timesteps": 20},
    "dipgo": {"steps": 3, "batch_size": 2, "pool_size": 4, "dim": 8},
    "stack": {"validation_samples": 8, "min_steps": 2, "validation_fid_samples": 16},
    "finetune": {"batch_size": 16, "checkpoint_every": 2, "distill": 1.0},
}


# ----------------------------------------------------------------------------- networks

def dp_levels(b: Bench, grid: float = 0.01) -> list[tuple[float, float]]:
    """``(channel ratio, per-step MACs ratio)`` of one Diff-Pruning model over a grid of channel
    ratios (magnitude probes: which channels go never changes how many). On the benchmark teacher
    the MACs move in coarse steps (0.84, 0.56, 0.45, 0.25, 0.18, 0.06): most budgets fall between two."""
    probe = with_values(b.p.taylor, importance="magnitude", batch_size=1)
    out = []
    for r in np.arange(grid, 0.95, grid):
        try:
            rep = prune_unet(b.teacher, None, b.images[:1], with_values(probe, ratio=round(float(r), 4)), device=b.device)[1]
        except PruningError:
            continue
        out.append((round(float(r), 4), rep["macs_after"] / rep["macs_before"]))
    return out


def at_or_above(levels: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The channel ratio whose MACs are the lowest still at or above ``target`` (within 2% below it
    counts as at): the conservative equal-cost baseline, never cheaper than what it is compared with."""
    ok = [lv for lv in levels if lv[1] >= target * (1 - MACS_TOLERANCE)]
    return min(ok, key=lambda lv: (lv[1], -lv[0]))


_DP: dict[float, tuple[Any, dict]] = {}  # this run's Diff-Pruning nets by channel ratio (a Taylor pass is minutes)


def dp_net(b: Bench, ratio: float, progress: bool) -> tuple[Any, dict]:
    """One Diff-Pruning net at channel ratio ``ratio``, fine-tuned with the ``finetune`` recipe;
    cached by its configs."""
    if ratio not in _DP:
        _DP[ratio] = _dp_net(b, ratio, progress)
    net, info = _DP[ratio]
    return net, dict(info)


def _dp_net(b: Bench, ratio: float, progress: bool) -> tuple[Any, dict]:
    cfg = with_values(b.p.taylor, importance="diff-pruning", ratio=ratio)
    cache = core.work_dir(b.root, "bench-stack-pruned", b.key, cfg)  # the Taylor pass: minutes, once
    if (cache / "config.json").exists():
        pruned, report = load_model(cache, b.device), read_config(cache)["meta"]
    else:
        pruned, report = prune_unet(b.teacher, b.train_scheduler, b.images, cfg, device=b.device)
        save_model(pruned, cache, scheduler_config=b.scheduler_config, meta=report)
    spec = finetune_spec(b.p.finetune, b.teacher_info["steps"])
    work = core.work_dir(b.root, "bench-stack-diffpruning", b.key, cfg, spec)
    net = core.train_or_resume(copy.deepcopy(pruned), b.images, b.train_scheduler, spec, work, device=b.device,
                               progress=progress, desc=f"diff-pruning r={ratio:.3f}",
                               teacher=b.teacher if spec.distill else None)
    return net, {"channel_ratio": ratio, "macs_ratio": report["macs_after"] / report["macs_before"],
                 "train_steps": spec.steps, "timesteps_used": report["timesteps_used"], "pruned": pruned}


def build_nets(b: Bench, root: Path, progress: bool) -> tuple[dict[str, Any], dict[str, dict]]:
    """The search's base networks (named by kind and per-step MACs) and what each cost to train."""
    nets, info = {"teacher": b.teacher}, {"teacher": {"train_steps": 0}}
    boundaries = read_json(intervals_project(root, b.p, "chosen") / "models/intervals/intervals.json")["boundaries"]
    for target in PRUNE_TARGETS:
        net, i = dp_net(b, search_ratio(b.teacher, b.images, b.p.taylor, target, device=b.device).ratio, progress)
        nets[f"diff-pruning-{target}"], info[f"diff-pruning-{target}"] = net, i
        if target == MIXTURE_AT:
            pt = with_values(b.p, taylor=with_values(b.p.taylor, ratio=i["channel_ratio"]))
            for order in ORDERS:
                nets[f"{order}-{target}"] = stack_stage.make_mixture(
                    pt, root, order, b.teacher, i["pruned"], boundaries, b.images, b.train_scheduler, b.device,
                    progress, passes=i["timesteps_used"])
                info[f"{order}-{target}"] = {"train_steps": i["train_steps"], "macs_ratio": i["macs_ratio"],
                                             "boundaries": boundaries}
    for i in info.values():
        i.pop("pruned", None)
    return nets, info


# ----------------------------------------------------------------------------- runs

def fewer_steps_run(b: Bench, budget: float) -> Run:
    steps = max(1, round(budget * b.p.evaluate.steps))
    return b.run("fewer-steps", ModelDenoiser(b.teacher), [b.teacher], steps=steps, key=steps,
                 extra={"steps": steps, "train_steps": 0})


def dipgo_run(b: Bench, root: Path, budget: float, progress: bool) -> Run:
    """DiP-GO alone: a schedule over the teacher's full trajectory at ``budget``."""
    cfg = with_values(b.p.dipgo, target_ratio=budget, tolerance=min(b.p.dipgo.tolerance, MACS_TOLERANCE * budget))
    T = b.p.evaluate.steps
    schedule, _ = train_pruner(b.teacher, b.scheduler_config, cfg, steps=T, sample_shape=b.sample_shape,
                               device=b.device, progress=progress, sampler=b.p.evaluate.sampler,
                               work_dir=core.work_dir(root, "bench-stack-dipgo", b.key, cfg, T))
    return b.run("dipgo", SkipScheduleDenoiser(b.teacher, schedule), [b.teacher], key=to_dict(cfg),
                 extra={"train_steps": cfg.steps, "schedule_ratio": schedule.macs_ratio})


def diff_pruning_run(b: Bench, levels: list, budget: float, progress: bool) -> Run:
    """One Diff-Pruning model at the lowest MACs it reaches at or above ``budget``."""
    net, info = dp_net(b, at_or_above(levels, budget)[0], progress)
    info.pop("pruned")
    return b.run("diff-pruning", ModelDenoiser(net), [net], key=(budget, info["channel_ratio"], info["train_steps"]),
                 extra=info)


def search_at(b: Bench, root: Path, nets: dict, budget: float, progress: bool) -> stack_stage.Searched:
    """The ``stack`` stage's own search at ``budget`` over ``nets`` (every candidate scored by each
    criterion of :data:`~diffprune.pruning.stack.FIDELITY`)."""
    pb = with_values(b.p, stack=with_values(b.p.stack, budget=budget, skip_ratios=list(SKIPS)))
    return stack_stage.search(pb, root, nets, b.device, progress)


def stack_run(b: Bench, nets: dict, info: dict, budget: float, pick: tuple, method: str = "stack",
              same_as: Run | None = None) -> Run:
    """The split ``pick = (split, schedule, rows best first)`` of a search, evaluated by the harness
    (``same_as``: the run of the same split already evaluated under another name, reused)."""
    best, schedule, rows = pick
    extra = {"chosen": rows[0], "candidates": rows}
    if same_as is not None and same_as.extra["chosen"]["name"] == best.name:
        return Run(method, same_as.metrics, same_as.psnr_per_image, {**same_as.extra, **extra})
    net = nets[best.net]
    modules = list(getattr(net, "experts", [net]))
    steps_trained = info[best.net]["train_steps"] + (b.p.dipgo.steps if schedule is not None else 0)
    return b.run(method, stacked_denoiser(net, schedule), modules, steps=best.steps,
                 key=(budget, rows[0]["name"], fingerprint({k: v for k, v in rows[0].items() if k != "chosen_by"})),
                 extra={**extra, "train_steps": steps_trained})


def budget_runs(b: Bench, proj: Path, nets: dict, info: dict, levels: list, bud: float,
                progress: bool) -> tuple[dict[str, Run], stack_stage.Searched]:
    """At one budget: the stack (chosen by ``stack.fidelity``), the splits the other criteria pick,
    and the single methods."""
    found = search_at(b, proj, nets, bud, progress)
    runs = {"stack": stack_run(b, nets, info, bud, (found.best, found.schedule, found.rows))}
    for c in ALT_CRITERIA:
        runs[f"stack (by {c})"] = stack_run(b, nets, info, bud, found.best_by(c), f"stack (by {c})", runs["stack"])
    runs["fewer-steps"] = fewer_steps_run(b, bud)
    try:
        runs["dipgo"] = dipgo_run(b, proj, bud, progress)
    except ValueError as e:  # the schedule cannot land within 2% of this budget
        log.warning("dipgo alone at budget %s: %s", bud, e)
    runs["diff-pruning"] = diff_pruning_run(b, levels, bud, progress)
    return runs, found


def expert_points(b: Bench, out: Path) -> list[Run]:
    """The mixtures of the experts benchmark (chosen intervals), when it ran on this teacher."""
    path = out / "experts.json"
    if not path.exists():
        return []
    doc = read_json(path)
    if abs(doc["teacher"]["fid"] - b.reference()[0]["fid"]) > 1e-9:
        log.warning("experts.json was made on another teacher: its points are left off the plot")
        return []
    return [Run("experts (experts.json)", bud["runs"]["experts-chosen"]["metrics"], np.array([]))
            for bud in doc["budgets"]]


# ----------------------------------------------------------------------------- report

def _verdicts(stack: Run, singles: dict[str, Run]) -> list[dict]:
    return [compare(stack, singles[m]) for m in SINGLES if m in singles]


def _on_or_beyond(cmp: list[dict]) -> bool:
    """No single method is significantly better on paired PSNR or on FID."""
    return all(c["psnr_verdict"] != "worse" and c["fid_verdict"] != "worse" for c in cmp)


def _headline(run: Run | None, t_fid: float) -> dict | None:
    if run is None:
        return None
    return {"split": run.extra["chosen"]["name"], "macs_ratio": run.macs_ratio, "fid": run.metrics["fid"],
            "fid_over_teacher": run.metrics["fid"] / t_fid,
            "met": run.macs_ratio <= HEADLINE * (1 + MACS_TOLERANCE) and run.metrics["fid"] <= FID_TARGET * t_fid}


def targets(b: Bench, grid: dict[float, dict[str, Run]]) -> dict:
    t_fid = b.reference()[0]["fid"]
    at = grid.get(HEADLINE, {})
    curve = {bud: _on_or_beyond(_verdicts(runs["stack"], runs)) for bud, runs in grid.items()}
    speed = {bud: runs["stack"].metrics.get("speedup_vs_teacher", float("nan")) * runs["stack"].macs_ratio
             for bud, runs in grid.items()}
    return {
        "headline": _headline(at.get("stack"), t_fid),
        "headline_by_other_criteria": {c: _headline(at.get(f"stack (by {c})"), t_fid) for c in ALT_CRITERIA},
        "on_or_beyond_every_single_method": curve, "all_budgets_met": all(curve.values()),
        "speedup_over_macs_ratio": speed, "speedup_met": all(v >= SPEEDUP_TARGET for v in speed.values()),
    }


def _candidate_lines(run: Run, n: int) -> list[str]:
    by = run.extra["chosen"].get("chosen_by", "psnr")
    lines = [f"Candidates, best first by validation {by} (PSNR and feature distance paired on {n} noises; FID of "
             "the validation samples):", "",
             "| split (net, skip, steps) | MACs / teacher | validation PSNR (dB) | validation feature distance "
             "| validation FID |", "|---|---|---|---|---|"]
    return lines + [f"| {r['name']}{' **(chosen)**' if i == 0 else ''} | {r['macs_ratio']:.3f} "
                    f"| {r['validation_psnr']:.2f} | {r.get('validation_feature_distance', float('nan')):.4f} "
                    f"| {r.get('validation_fid', float('nan')):.3f} |"
                    for i, r in enumerate(run.extra["candidates"])]


def _feature_line(runs: dict[str, Run]) -> str:
    """Each run's paired feature distance to the teacher (evaluation noises, seed 0) with its 95% CI."""
    cells = []
    for m, r in runs.items():
        lo, hi = r.metrics.get("feature_distance_vs_teacher_ci95", [float("nan")] * 2)
        cells.append(f"{m} {r.metrics.get('feature_distance_vs_teacher', float('nan')):.4f} [{lo:.4f}, {hi:.4f}]")
    return "Paired feature distance to the teacher (0: the teacher's own features; 1: unrelated samples): " + \
        "; ".join(cells) + "."


def to_markdown(b: Bench, grid: dict, orders: dict, info: dict, tg: dict, head: float, quick: bool) -> str:
    t_fid = b.reference()[0]["fid"]
    h = tg["headline"] or {}
    lines = ["# Stacking: Diff-Pruning x timestep experts x DiP-GO x fewer steps"
             + (" (QUICK smoke setting: numbers are meaningless)" if quick else ""), "", *teacher_lines(b), "",
             "## Targets", "",
             f"- {1 / HEADLINE:.0f}x fewer trajectory MACs at FID <= {FID_TARGET}x the teacher's ({FID_TARGET * t_fid:.3f}): "
             f"**{'met' if h.get('met') else 'missed'}** (MACs {h.get('macs_ratio', float('nan')):.3f}, FID "
             f"{h.get('fid', float('nan')):.3f} = {h.get('fid_over_teacher', float('nan')):.2f}x the teacher's).",
             *[f"  - with the split the validation {c} picks ({o['split']}): **{'met' if o['met'] else 'missed'}** "
               f"(MACs {o['macs_ratio']:.3f}, FID {o['fid']:.3f} = {o['fid_over_teacher']:.2f}x)"
               for c, o in tg["headline_by_other_criteria"].items() if o],
             "- On or beyond every single method at every budget (no single method significantly better on paired "
             f"PSNR or FID): **{'met' if tg['all_budgets_met'] else 'missed'}** "
             f"({', '.join(f'{k}: ' + ('yes' if v else 'no') for k, v in tg['on_or_beyond_every_single_method'].items())}).",
             f"- Wall-clock speedup >= {SPEEDUP_TARGET:.0%} of the MACs ratio: **{'met' if tg['speedup_met'] else 'missed'}** "
             f"({', '.join(f'{k}: {v:.0%}' for k, v in tg['speedup_over_macs_ratio'].items())}).", "",
             "Base networks of the search (per-step MACs / teacher; training steps): "
             + "; ".join(f"{n} ({i.get('macs_ratio', 1.0):.3f}; {i['train_steps']})" for n, i in info.items()) + ".", "",
             "Equal cost: the stack, fewer steps and DiP-GO land within 2% of each budget. One Diff-Pruning model's "
             "MACs move in coarse steps (whole channels per GroupNorm group), so it is taken at the lowest MACs it "
             "reaches at or above the budget: never cheaper than the stack it is compared with (its cell says when "
             "the MACs differ by more than 2%). Train steps: fine-tuning + DiP-GO pruner steps.", ""]
    for bud, runs in grid.items():
        st = runs["stack"]
        lines += [f"## Budget {bud}", "", f"Chosen split: **{st.extra['chosen']['name']}**.", "", TABLE_HEAD,
                  run_row(st, _verdicts(st, runs)), *(run_row(runs[m], _verdicts(runs[m], runs)) for m in runs
                                                      if m.startswith("stack (by")),
                  *(run_row(runs[m]) for m in SINGLES if m in runs), "",
                  "The other criteria's picks: " + "; ".join(f"{m}: **{r.extra['chosen']['name']}**"
                                                            for m, r in runs.items() if m.startswith("stack (by"))
                  + ".", "",
                  _feature_line(runs), "", *_candidate_lines(st, b.p.stack.validation_samples), ""]
    if orders:
        first, *rest = orders.values()
        lines += [f"## Which order at budget {head}", "",
                  "The best split of each mixture order (the search over that mixture and the teacher)"
                  + ("" if len(orders) == len(ORDERS) else f"; no split of {set(ORDERS) - set(orders)} reached the budget")
                  + ".", "", TABLE_HEAD, run_row(first, [compare(first, r) for r in rest]), *map(run_row, rest), ""]
    return "\n".join(lines + ["![PSNR and FID vs MACs](stack.png)"]) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for stack.json / .md / .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON, Markdown and plot."""
    b, res = start("stack", quick=quick, root=root, out=out, overrides=QUICK if quick else BENCH_OVERRIDES,
                   progress=progress)
    budgets = (0.5,) if quick else BUDGETS
    proj = _project(b.root / ".work" / "bench-experts", f"base-{b.key}",
                    {"data/dataset": b.root / core.DATASET, core.FEATURES: b.root / core.FEATURES,
                     core.TEACHER: b.teacher_dir})
    nets, info = build_nets(b, proj, progress)
    levels = dp_levels(b)
    grid: dict[float, dict[str, Run]] = {}
    searches: dict[float, stack_stage.Searched] = {}
    for bud in budgets:
        grid[bud], searches[bud] = budget_runs(b, proj, nets, info, levels, bud, progress)
        log.info("budget %s: stack %s, FID %.3f", bud, grid[bud]["stack"].extra["chosen"]["name"],
                 grid[bud]["stack"].metrics["fid"])
        publish(b, res, grid, {}, info, budgets[0], quick, complete=False)  # what is done so far, marked so
    head = HEADLINE if HEADLINE in grid else budgets[0]
    orders = {}
    for o in ORDERS:
        try:
            orders[o] = stack_run(b, nets, info, head, searches[head].best_of(o), f"stack ({o})")
        except ValueError as e:  # no split of this order reached the budget within 2%
            log.warning("order %s at budget %s: %s", o, head, e)
    publish(b, res, grid, orders, info, head, quick, complete=True)


def publish(b: Bench, res: Path, grid: dict, orders: dict, info: dict, head: float, quick: bool, complete: bool) -> None:
    """stack.{json,md,png} from the budgets run so far (``complete``: all of them and the orders)."""
    tg = targets(b, grid)
    doc = {"quick": quick, "complete": complete, "teacher": b.reference()[0], "teacher_training": b.teacher_info,
           "targets": tg,
           "nets": info, "params": {s: to_dict(b.p.section(s)) for s in ("data", "teacher", "evaluate", "taylor",
                                                                          "finetune", "dipgo", "intervals", "stack")},
           "budgets": [{"budget": bud, "runs": {m: r.to_json() for m, r in runs.items()},
                        "stack_vs": _verdicts(runs["stack"], runs)} for bud, runs in grid.items()],
           "orders": {o: r.to_json() for o, r in orders.items()}}
    md = to_markdown(b, grid, orders, info, tg, head, quick)
    if not complete:
        md = md.replace("\n", f"\n\n**PARTIAL: budgets {list(grid)} of {list(BUDGETS)} done; the run goes on.**\n", 1)
    write_results(res, "stack", doc, md)
    series = {m: [runs[m] for runs in grid.values() if m in runs] for m in ("stack", "stack (by fid)", *SINGLES)}
    series["experts (experts.json)"] = expert_points(b, res)
    plot_pareto(series, res / "stack.png", "Stacked vs single methods", b.reference()[0]["fid"])


if __name__ == "__main__":
    typer.run(main)
