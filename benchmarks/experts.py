"""Benchmark: the mixture of efficient experts, chosen vs uniform intervals, vs one Diff-Pruning model.

1. Intervals: the gradient-alignment intervals (and their objective ``J``) next to uniform ones.
2. For MACs budgets 0.3 / 0.5 / 0.7 of the teacher's trajectory: the mixture with the chosen
   intervals, the mixture with uniform intervals (same elastic training, router and fine-tuning),
   and one Diff-Pruning model pruned to the MACs the chosen mixture reached and fine-tuned for as
   many steps as the mixture's experts got in total (elastic + pruned fine-tuning). A budget below
   the smallest mixture of the elastic space cannot be met: the router then keeps the smallest.
   FID (mean ± std over three sampling seeds) against the trajectory MACs, and each expert's
   share of the mixture's MACs.

Every variant runs the pipeline's own stage functions in a project folder of its own under
``.work/bench-experts*/`` (inputs hard-linked from the baseline, folders keyed by the configs), so
an interrupted benchmark resumes and a finished variant is reused. Writes
``benchmarks/results/experts.json``, ``experts.md`` and ``experts.png``.

Usage::

    python -m benchmarks.experts            # the real thing (reuses a finished `make demo`)
    python -m benchmarks.experts --quick    # a tiny end-to-end smoke run in .work/bench-experts-quick
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from diffprune.config import Params, fingerprint, resolve_device, to_dict
from diffprune.data import load_split
from diffprune.env import quiet_defaults
from diffprune.io import atomic_path, read_json, write_json
from diffprune.metrics.evaluate import evaluate
from diffprune.metrics.fid import get_extractor
from diffprune.models.checkpoint import load_model, load_scheduler_config, read_config
from diffprune.models.unet import sampling_scheduler
from diffprune.pruning.experts import objective, uniform_boundaries, uniform_cuts
from diffprune.sampling import ModelDenoiser
from diffprune.stages import core
from diffprune.stages import experts as stages
from diffprune.stages.router import run_router
from diffprune.training import TrainSpec

from benchmarks.common import QUICK_SPINE, bench_params, fmt_fid

log = logging.getLogger("benchmarks.experts")

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (0.3, 0.5, 0.7)

QUICK: dict[str, Any] = {
    **QUICK_SPINE,
    "intervals": {"grid": 6, "batches": 1, "batch_size": 8},
    "experts": {"fraction": 0.5, "batch_size": 8, "checkpoint_every": 2},
    "router": {"steps": 2, "batch_size": 4, "hidden": 8},
    "prune_experts": {"fraction": 0.34, "batch_size": 8, "checkpoint_every": 2},
    "taylor": {"batch_size": 16, "max_timesteps": 20},
    "finetune": {"batch_size": 16, "checkpoint_every": 2},
}

SHARED = ("data/dataset", core.FEATURES, core.TEACHER)


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


def _evaluated(root: Path, p: Params, target: str, model: str) -> dict:
    """``evaluate`` of ``target`` (checkpoint folder ``model``) in ``root``, reused when done under the
    same protocol on the same weights."""
    ev = core.eval_dir(root, target)
    sha = read_config(root / model)["sha256"]
    if ((ev / "metrics.json").exists() and read_json(ev / "protocol.json") == to_dict(p.evaluate)
            and (ev / "bench-model.json").exists() and read_json(ev / "bench-model.json")["sha256"] == sha):
        return read_json(ev / "metrics.json")
    metrics = core.run_evaluate(p, root, target, progress=False)["metrics"]
    write_json(ev / "bench-model.json", {"sha256": sha})
    return metrics


# ----------------------------------------------------------------------------- the mixture

def intervals_variant(base: Path, p: Params, kind: str, teacher_sha: str, progress: bool) -> Path:
    """Project folder with ``kind`` ("chosen" | "uniform") intervals and the elastic experts trained."""
    key = fingerprint(teacher_sha, p.data, p.teacher, p.intervals, p.experts)
    root = _project(base.parent, f"{kind}-{key}", {rel: base / rel for rel in SHARED}
                    | {"models/eval/teacher": core.eval_dir(base, "teacher")})
    doc_path = root / stages.INTERVALS / "intervals.json"
    if not doc_path.exists():
        chosen = _project(base.parent, f"chosen-{key}", {rel: base / rel for rel in SHARED})
        if not (chosen / stages.INTERVALS / "intervals.json").exists():
            stages.run_intervals(p, chosen, progress=progress)
        if kind == "uniform":
            doc = read_json(chosen / stages.INTERVALS / "intervals.json")
            cuts = uniform_cuts(p.intervals.grid, p.intervals.k)
            doc |= {"cuts": cuts, "boundaries": uniform_boundaries(doc["num_train_timesteps"], p.intervals.k),
                    "objective": objective(doc["alignment"], cuts)}
            write_json(doc_path, doc)
    stages.run_experts(p, root, progress=progress)
    return root


def mixture_run(variant: Path, p: Params, budget: float, progress: bool) -> dict:
    """Router, pruning, fine-tuning and evaluation of one mixture at one budget."""
    pb = replace(p, router=replace(p.router, budget=budget))
    key = fingerprint(pb.router, pb.prune_experts, pb.evaluate)
    root = _project(variant.parent, f"{variant.name}-b{budget}-{key}",
                    {rel: variant / rel for rel in (*SHARED, "models/eval/teacher", stages.INTERVALS, stages.ELASTIC)})
    if not (root / stages.ROUTER / "router.json").exists():
        run_router(pb, root, progress=progress)
    stages.run_prune_experts(pb, root, progress=progress)
    metrics = _evaluated(root, pb, "experts", stages.MIXTURE)
    summary = read_json(root / stages.SUMMARY)
    rdoc = read_json(root / stages.ROUTER / "router.json")
    intervals = read_json(root / stages.INTERVALS / "intervals.json")
    k = len(summary["macs_per_expert"])
    train_steps = k * (stages._steps(p.experts.fraction, p.teacher.steps)
                       + stages._steps(p.prune_experts.fraction, p.teacher.steps))
    return {
        "budget": budget,
        "boundaries": intervals["boundaries"],
        "objective": intervals["objective"],
        "router_ratio": rdoc["ratio"],
        "router_offset": rdoc["offset"],
        "steps_per_expert": summary["steps_per_expert"],
        "macs_per_expert": summary["macs_per_expert"],
        "macs_share": summary["macs_share"],
        "params_per_expert": summary["params_per_expert"],
        "train_steps": train_steps,
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------- Diff-Pruning

def diff_pruning_run(base: Path, p: Params, target: float, train_steps: int, progress: bool) -> dict | None:
    """One Diff-Pruning model with at most ``target`` of the teacher's MACs (channel ratio by bisection),
    fine-tuned for ``train_steps`` steps; None when the taylor module is not available."""
    try:
        from diffprune.pruning.taylor import PruningError, prune_unet
    except ImportError:  # pragma: no cover - another method's module
        return None
    device = resolve_device(p.project.device)
    teacher = load_model(base / core.TEACHER, device)
    sched_cfg = load_scheduler_config(base / core.TEACHER)
    sched = DDPMScheduler.from_config(sched_cfg)
    images, _ = load_split(base / "data/dataset", "train")
    key = fingerprint(read_config(base / core.TEACHER)["sha256"], p.taylor, p.finetune, p.evaluate, target, train_steps,
                      p.prune_experts.distill)
    work = core.work_dir(base, "bench-experts-diffpruning", key)
    if (work / "result.json").exists():
        return read_json(work / "result.json")

    # 1. the smallest channel ratio whose MACs fit the target; with the Diff-Pruning importance itself,
    #    since the importance decides where GroupNorm rounding and head pruning land (magnitude at ratio
    #    0.25 kept 0.50 of the MACs, Diff-Pruning 0.35)
    def macs_ratio(r: float) -> float:
        try:
            _, rep = prune_unet(teacher, sched, images, replace(p.taylor, importance="diff-pruning", ratio=r), device)
        except PruningError:
            return 0.0
        return rep["macs_after"] / rep["macs_before"]

    lo, hi = 0.0, 0.95
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        if macs_ratio(mid) <= target:
            hi = mid
        else:
            lo = mid
    pruned, report = prune_unet(teacher, sched, images, replace(p.taylor, importance="diff-pruning", ratio=hi), device)
    # 2. fine-tune for as many steps as the mixture's experts got, then the shared protocol
    f = p.finetune
    spec = TrainSpec(steps=train_steps, batch_size=f.batch_size, lr=f.lr, ema_decay=f.ema_decay,
                     checkpoint_every=f.checkpoint_every, seed=f.seed, warmup_steps=f.warmup_steps,
                     distill=p.prune_experts.distill)  # the experts' fine-tuning recipe
    tuned = core.train_or_resume(pruned, images, sched, spec, work / "finetune", device=device, progress=progress,
                                 desc=f"diff-pruning r={hi:.3f}", teacher=teacher if spec.distill else None)
    ext = get_extractor(base / core.FEATURES, p.evaluate.inception_weights, device)
    reference = load_file(str(core.eval_dir(base, "teacher") / "samples.safetensors"))["samples"]
    shape = (tuned.config.in_channels, tuned.config.sample_size, tuned.config.sample_size)
    metrics, _ = evaluate(ModelDenoiser(tuned.to(device).eval()), sampling_scheduler(sched_cfg, p.evaluate.sampler),
                          [tuned], p.evaluate, ext, ext.fn(images), sample_shape=shape, reference=reference,
                          device=device, progress=False)
    teacher_m = read_json(core.eval_dir(base, "teacher") / "metrics.json")
    metrics["macs_ratio_vs_teacher"] = metrics["trajectory_macs"] / teacher_m["trajectory_macs"]
    metrics["fid_ratio_vs_teacher"] = metrics["fid"] / teacher_m["fid"]
    metrics["speedup_vs_teacher"] = teacher_m["latency_s"] / metrics["latency_s"]
    result = {"macs_target": target, "channel_ratio": hi, "macs_after": report["macs_after"],
              "params": report["params_after"], "train_steps": train_steps, "metrics": metrics}
    write_json(work / "result.json", result)
    return result


# ----------------------------------------------------------------------------- report

def to_markdown(doc: dict) -> str:
    t = doc["teacher"]
    ev = doc["params"]["evaluate"]
    iv = doc["intervals"]
    lines = [
        "# Mixture of efficient experts" + (" (QUICK smoke setting: numbers are meaningless)" if doc["quick"] else ""),
        "",
        f"Teacher: {t['params']:,} params, {t['macs_per_step'] / 1e6:.2f} MMACs/step, FID {fmt_fid(t)} "
        f"(floor {t['fid_floor']:.2f}). Protocol: {ev['sampler']} {ev['steps']} steps, {ev['num_samples']} samples "
        f"per seed, seeds {ev['seeds']}, features: {t['feature_extractor']}.",
        "",
        f"Intervals (K = {doc['params']['intervals']['k']}, grid {doc['params']['intervals']['grid']}): chosen "
        f"boundaries {iv['chosen']['boundaries']} with J = {iv['chosen']['objective']:.4f}; uniform "
        f"{iv['uniform']['boundaries']} with J = {iv['uniform']['objective']:.4f}.",
        "",
        "FID is mean ± std over the sampling seeds; MACs are counted over a whole trajectory, as a fraction of the "
        "teacher's. Training steps: elastic + pruned fine-tuning summed over experts; Diff-Pruning gets the same.",
        "",
        "| budget | model | MACs / teacher | FID | FID / teacher | params | steps per expert | MACs share per expert "
        "| train steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        m = r["metrics"]
        steps = r.get("steps_per_expert")
        share = r.get("macs_share")
        lines.append(
            f"| {r['budget']} | {r['model']} | {m['macs_ratio_vs_teacher']:.3f} | {fmt_fid(m)} "
            f"| {m['fid_ratio_vs_teacher']:.2f} | {m['params']:,} | {steps if steps else '-'} "
            f"| {' / '.join(f'{s:.2f}' for s in share) if share else '-'} | {r['train_steps']} |"
        )
    lines += ["", "Targets (computed from the rows above):", ""]
    by = {(r["budget"], r["model"]): r["metrics"] for r in doc["runs"]}
    for kind in ("chosen", "uniform"):
        model = f"experts ({kind} intervals)"
        wins = [b for b in sorted({r["budget"] for r in doc["runs"]})
                if (b, "diff-pruning") in by and (b, model) in by and by[(b, model)]["fid"] <= by[(b, "diff-pruning")]["fid"]]
        budgets = sorted({b for b, m in by if m == model})
        lines.append(f"- {model}: FID at or below Diff-Pruning's at {len(wins)} of {len(budgets)} budgets "
                     f"({', '.join(map(str, wins)) or 'none'}); target: all. At budget 0.5: "
                     + (f"{by[(0.5, model)]['fid_ratio_vs_teacher']:.2f}x the teacher's FID (target <= 1.15x)."
                        if (0.5, model) in by else "not run."))
    return "\n".join(lines) + "\n"


def save_plot(doc: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for model, marker in (("experts (chosen intervals)", "o"), ("experts (uniform intervals)", "s"),
                          ("diff-pruning", "^")):
        rows = [r for r in doc["runs"] if r["model"] == model]
        if rows:
            ax1.errorbar([r["metrics"]["macs_ratio_vs_teacher"] for r in rows], [r["metrics"]["fid"] for r in rows],
                         yerr=[r["metrics"]["fid_std"] for r in rows], marker=marker, capsize=3, label=model)
    ax1.axhline(doc["teacher"]["fid"], color="grey", ls="--", lw=1, label="teacher")
    ax1.set_xlabel("trajectory MACs / teacher")
    ax1.set_ylabel("FID (log scale)")
    ax1.set_yscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax1.yaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50]))
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.yaxis.set_minor_formatter(NullFormatter())
    ax1.legend(fontsize=7)
    chosen = [r for r in doc["runs"] if r["model"] == "experts (chosen intervals)"]
    if chosen:
        k = len(chosen[0]["macs_share"])
        bottom = [0.0] * len(chosen)
        xs = list(range(len(chosen)))
        for e in range(k):
            vals = [r["macs_share"][e] for r in chosen]
            ax2.bar(xs, vals, bottom=bottom, label=f"expert {e}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        steps = chosen[0]["steps_per_expert"]
        ax2.axhline(steps[0] / sum(steps), color="k", ls=":", lw=1, label="expert 0's share of the steps")
        ax2.set_xticks(xs, [str(r["budget"]) for r in chosen])
        ax2.set_xlabel("budget")
        ax2.set_ylabel("share of the mixture's MACs")
        ax2.set_title("chosen intervals", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-experts-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml, data/ and models/")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for experts.json / .md / .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the benchmark and write its JSON, Markdown and plot."""
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench = REPO / (".work/bench-experts-quick" if quick else ".work/bench-experts")
    if quick:
        root, out = bench / "baseline", bench / "results"
        root.mkdir(parents=True, exist_ok=True)
    p = bench_params(root, QUICK if quick else None)
    baseline = core.ensure_baseline(root, p, progress=progress)
    teacher_sha = read_config(baseline.teacher)["sha256"]
    # the teacher under the benchmark's protocol, in a folder of the benchmark's own
    base = _project(bench, f"base-{fingerprint(teacher_sha, p.data, p.evaluate)}",
                    {rel: baseline.root / rel for rel in SHARED})
    teacher = _evaluated(base, p, "teacher", core.TEACHER)
    teacher["fid_floor"] = read_json(base / core.FEATURES / "floor.json")["fid_floor"]

    variants = {kind: intervals_variant(base, p, kind, teacher_sha, progress) for kind in ("chosen", "uniform")}
    ivs = {kind: read_json(v / stages.INTERVALS / "intervals.json") for kind, v in variants.items()}
    runs = []
    for budget in BUDGETS:
        for kind, variant in variants.items():
            log.info("budget %.1f, %s intervals", budget, kind)
            runs.append({"model": f"experts ({kind} intervals)"} | mixture_run(variant, p, budget, progress))
        # Diff-Pruning at the MACs the chosen mixture really reached (a budget below the smallest
        # mixture of the elastic space is not reachable; the router then keeps the smallest one)
        reached = runs[-2]["metrics"]["macs_ratio_vs_teacher"]
        log.info("budget %.1f, diff-pruning at %.3f of the teacher's MACs", budget, reached)
        dp = diff_pruning_run(base, p, reached, runs[-1]["train_steps"], progress)
        if dp is not None:
            runs.append({"model": "diff-pruning", "budget": budget} | dp)
    doc = {
        "quick": quick,
        "teacher": teacher,
        "intervals": {kind: {"boundaries": d["boundaries"], "objective": d["objective"], "cuts": d["cuts"]}
                      for kind, d in ivs.items()} | {"grid": ivs["chosen"]["grid"],
                                                     "cutoff_curve": ivs["chosen"]["cutoff_curve"]},
        "params": {s: to_dict(p.section(s)) for s in ("data", "teacher", "evaluate", "intervals", "experts", "router",
                                                      "prune_experts", "taylor", "finetune")},
        "runs": runs,
    }
    write_json(out / "experts.json", doc)
    with atomic_path(out / "experts.md") as tmp:
        tmp.write_text(to_markdown(doc))
    save_plot(doc, out / "experts.png")
    with atomic_path(out / "experts-alignment.png") as tmp:
        shutil.copyfile(variants["chosen"] / stages.INTERVALS / "alignment.png", tmp)
    log.info("wrote %s, %s and %s", out / "experts.json", out / "experts.md", out / "experts.png")


if __name__ == "__main__":
    typer.run(main)
