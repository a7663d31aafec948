"""Benchmark results: significance against baselines, markdown tables, the Pareto plot, the files.

Every comparison is between two runs at equal trajectory MACs (within 2%): fidelity by a paired
Wilcoxon test on per-image PSNR against the teacher (the same initial noises for every model), FID
by the overlap of 95% t-intervals over the sampling seeds. A difference is called real only when it
is significant; otherwise the table says "n.s.".
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from diffprune.io import atomic_path, write_json
from diffprune.metrics.stats import intervals_overlap, mean_ci, paired_test

from benchmarks.common import MACS_TOLERANCE, Bench, Run, overfitting


def fmt_fid(m: dict) -> str:
    """``mean ± std`` of a metrics dict's FID over the sampling seeds."""
    return f"{m['fid']:.3f} ± {m['fid_std']:.3f}"


def fid_interval(m: dict) -> tuple[float, float]:
    """95% t-interval of the FID over the sampling seeds."""
    e = mean_ci(m["fid_per_seed"])
    return e.lo, e.hi


def compare(run: Run, baseline: Run) -> dict:
    """``run`` against ``baseline``: equal cost, paired fidelity test, FID interval overlap."""
    test = paired_test(run.psnr_per_image, baseline.psnr_per_image)
    fid_sep = not intervals_overlap(fid_interval(run.metrics), fid_interval(baseline.metrics))
    fid_verdict = "n.s." if not fid_sep else ("better" if run.metrics["fid"] < baseline.metrics["fid"] else "worse")
    return {
        "baseline": baseline.method,
        "equal_macs": abs(run.macs_ratio - baseline.macs_ratio) <= MACS_TOLERANCE * baseline.macs_ratio,
        "psnr_diff_db": test.mean_diff, "psnr_diff_ci95": [test.ci_lo, test.ci_hi], "p_value": test.p_value,
        "psnr_verdict": test.verdict("higher") if test.significant else "n.s.",
        "fid_verdict": fid_verdict,
    }


def verdict_cell(c: dict) -> str:
    """One table cell: ``vs fewer-steps: PSNR +0.42 dB (better, p=0.001); FID n.s.``."""
    eq = "" if c["equal_macs"] else " (MACs differ by > 2%)"
    return (f"vs {c['baseline']}: PSNR {c['psnr_diff_db']:+.2f} dB ({c['psnr_verdict']}, p={c['p_value']:.3g}); "
            f"FID {c['fid_verdict']}{eq}")


def run_row(run: Run, comparisons: Sequence[dict] = ()) -> str:
    """A markdown row: method, MACs, training, FID, KID, PSNR [CI], SSIM, speedup, significance."""
    m = run.metrics
    lo, hi = m.get("psnr_vs_teacher_ci95", [float("nan")] * 2)
    return (f"| {run.method} | {run.macs_ratio:.3f} | {run.extra.get('train_steps', 0)} | {fmt_fid(m)} "
            f"| {m.get('kid', float('nan')) * 1e3:.2f} | {m.get('psnr_vs_teacher', float('nan')):.2f} "
            f"[{lo:.2f}, {hi:.2f}] | {m.get('ssim_vs_teacher', float('nan')):.3f} "
            f"| {m.get('speedup_vs_teacher', float('nan')):.2f}x | {'; '.join(verdict_cell(c) for c in comparisons)} |")


TABLE_HEAD = ("| method | MACs / teacher | train steps | FID (mean ± std, 3 seeds) | KID x1e3 | PSNR vs teacher "
              "[95% CI] | SSIM | speedup (wall-clock) | significance vs baselines at equal MACs |\n"
              "|---|---|---|---|---|---|---|---|---|")


def teacher_lines(b: Bench) -> list[str]:
    """The header every result file starts with: the teacher, its training cost, the protocol."""
    t, _ = b.reference()
    info, ev = b.teacher_info, b.p.evaluate
    return [
        f"Benchmark teacher: {info['steps']} training steps ({info['train_seconds'] / 60:.1f} min on "
        f"{info['device']}; converged: {'yes' if info['converged'] else 'NO'}"
        f"{'; ' + overfitting(info['curve']) if overfitting(info.get('curve', [])) else ''}), {t['params']:,} params, "
        f"{t['macs_per_step'] / 1e6:.2f} MMACs/step, FID {fmt_fid(t)} (floor {info['fid_floor']:.3f}).",
        f"Protocol: {ev.sampler} {ev.steps} steps, {ev.num_samples} samples per seed, seeds {list(ev.seeds)}, "
        f"features: {t['feature_extractor']}. PSNR/SSIM: each sample against the teacher's sample from the same "
        "initial noise. Speedup: timed against the teacher in the same process, interleaved, median.",
    ]


def plot_pareto(series: dict[str, Iterable[Run]], png: Path, title: str, teacher_fid: float) -> Path:
    """Two panels against trajectory MACs (log x): paired PSNR with 95% CI, FID ± std; a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, runs in series.items():
        pts = sorted(runs, key=lambda r: r.macs_ratio)
        if not pts:
            continue
        x = [r.macs_ratio for r in pts]
        psnr = np.array([r.metrics["psnr_vs_teacher"] for r in pts])
        ci = np.array([r.metrics["psnr_vs_teacher_ci95"] for r in pts]).T
        ax1.errorbar(x, psnr, yerr=[psnr - ci[0], ci[1] - psnr], marker="o", capsize=3, label=name)
        ax2.errorbar(x, [r.metrics["fid"] for r in pts], yerr=[r.metrics["fid_std"] for r in pts], marker="o",
                     capsize=3, label=name)
    ax2.axhline(teacher_fid, color="k", lw=0.8, ls="--", label=f"teacher ({teacher_fid:.3f})")
    for ax, ylabel in ((ax1, "PSNR vs teacher, dB (95% CI)"), (ax2, "FID (mean ± std, 3 seeds)")):
        ax.set_xscale("log")
        ax.set_xlabel("trajectory MACs / teacher")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return png


def write_results(out: Path, name: str, doc: dict, markdown: str) -> list[Path]:
    """``out/NAME.json`` and ``out/NAME.md`` (the PNG is written by :func:`plot_pareto`)."""
    write_json(out / f"{name}.json", doc)
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(markdown)
    return [out / f"{name}.json", out / f"{name}.md"]
