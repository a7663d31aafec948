"""Benchmark: the benchmark teacher's convergence curve (the teacher every other benchmark uses).

Trains the digits teacher with the demo's recipe for 8x the demo's steps (``BENCH_TEACHER_STEPS``), scoring the
EMA weights at 8 points (FID on the feature net under the protocol, held-out denoising loss), and
writes ``benchmarks/results/teacher.{json,md,png}``. Cached: the other benchmarks reuse it.

Usage::

    python -m benchmarks.teacher            # the real thing
    python -m benchmarks.teacher --quick    # a tiny smoke run in .work/bench-quick
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffprune.io import atomic_path

from benchmarks.common import REPO, QUICK_SPINE, overfitting, start
from benchmarks.tables import write_results



def plot_curve(curve: list[dict], png: Path) -> Path:
    """FID and held-out loss against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5.5, 3.8))
    steps = [c["step"] for c in curve]
    ax1.plot(steps, [c["fid"] for c in curve], "o-", color="C0", label="FID (feature net, seed 0)")
    ax1.set_xlabel("training steps")
    ax1.set_ylabel("FID", color="C0")
    ax2 = ax1.twinx()
    ax2.plot(steps, [c["val_loss"] for c in curve], "s--", color="C1", label="held-out loss")
    ax2.set_ylabel("held-out denoising loss", color="C1")
    fig.suptitle("Benchmark teacher: convergence", fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return png


def to_markdown(info: dict, quick: bool) -> str:
    lines = ["# The benchmark teacher" + (" (QUICK smoke setting: numbers are meaningless)" if quick else ""), "",
             f"{info['steps']} training steps in {info['train_seconds'] / 60:.1f} min on {info['device']} "
             f"(scoring included); converged: {'yes' if info['converged'] else 'NO'} (last FID within 10% and "
             "held-out loss within 1% of the best before). FID floor: "
             f"{info['fid_floor']:.3f}.", *([f"The teacher {overfitting(info['curve'])}."]
                                            if overfitting(info["curve"]) else []), "",
             "| step | FID | held-out loss | minutes |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['fid']:.3f} | {c['val_loss']:.5f} | {c['train_seconds'] / 60:.1f} |"
              for c in info["curve"]]
    return "\n".join(lines + ["", "![curve](teacher.png)"]) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny smoke setting in .work/bench-quick")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for teacher.json, .md, .png")] = REPO / "benchmarks/results",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train (or reuse) the benchmark teacher and write its convergence curve."""
    b, out = start("teacher", quick=quick, root=root, out=out, overrides=QUICK_SPINE if quick else None,
                   progress=progress)
    write_results(out, "teacher", {"quick": quick, **b.teacher_info}, to_markdown(b.teacher_info, quick))
    plot_curve(b.teacher_info["curve"], out / "teacher.png")


if __name__ == "__main__":
    typer.run(main)
