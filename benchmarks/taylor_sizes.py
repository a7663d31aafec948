"""Benchmark: what a Diff-Pruning channel ratio removes, in parameters and MACs (no training).

For channel ratios 0.1-0.7, prunes two architectures built from their configs with random weights
(which channels go depends on the scores; how many, and so the counts, on the ratio only):
google/ddpm-cifar10-32's UNet (the Diff-Pruning paper's Table 1: ratio 0.3 gives 35.7M -> 19.8M
params, 6.1G -> 3.4G MACs) and the digits teacher of ``params.yaml``. Writes
``benchmarks/results/taylor_sizes.{json,md,png}``, the table the README points to for choosing a ratio
(or set ``taylor.target_macs_ratio`` and let the stage search it).

Usage::

    python -m benchmarks.taylor_sizes            # the table (about a minute)
    python -m benchmarks.taylor_sizes --quick    # ratios 0.3 and 0.5 only, in .work/bench-quick
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from diffusers import UNet2DModel

from diffprune.config import TaylorConfig, load_params
from diffprune.io import atomic_path
from diffprune.models.unet import CIFAR10_DDPM, build_unet
from diffprune.pruning.taylor import prune_unet

from benchmarks import common
from benchmarks.common import REPO
from benchmarks.tables import write_results

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
PAPER = {"ratio": 0.3, "params_before": 35.7e6, "params_after": 19.8e6, "macs_before": 6.1e9, "macs_after": 3.4e9}


def sizes(model: UNet2DModel, shape: tuple[int, ...], ratios: tuple[float, ...]) -> list[dict]:
    """Params and MACs (one call) after pruning ``model`` at each ratio (magnitude scores, seed 0)."""
    rows = []
    for r in ratios:
        cfg = TaylorConfig(importance="magnitude", ratio=r, batch_size=1, max_timesteps=1)
        rep = prune_unet(model, None, torch.zeros(1, *shape), cfg)[1]
        rows.append({"ratio": r, **{k: rep[k] for k in ("params_before", "params_after", "macs_before", "macs_after")},
                     "macs_ratio": rep["macs_after"] / rep["macs_before"]})
    return rows


def to_markdown(table: dict[str, list[dict]]) -> str:
    names = list(table)
    lines = ["# What a Diff-Pruning channel ratio removes", "",
             "Kept fraction of one UNet call's MACs (params after pruning in brackets). Paper (CIFAR-10 DDPM, "
             "ratio 0.3): 35.7M -> 19.8M params, 6.1G -> 3.4G MACs (0.56x).", "",
             "| channel ratio | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, r in enumerate(table[names[0]]):
        cells = [f"{table[n][i]['macs_ratio']:.3f} ({table[n][i]['params_after'] / 1e6:.2f}M)" for n in names]
        lines.append(f"| {r['ratio']} | " + " | ".join(cells) + " |")
    before = [f"{n}: {table[n][0]['params_before'] / 1e6:.2f}M params, {table[n][0]['macs_before'] / 1e9:.3f}G MACs"
              for n in names]
    return "\n".join(lines + ["", "Unpruned: " + "; ".join(before) + ".", "", "![MACs vs ratio](taylor_sizes.png)"]) + "\n"


def plot(table: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, rows in table.items():
        ax.plot([r["ratio"] for r in rows], [r["macs_ratio"] for r in rows], "o-", label=name)
    ax.plot([PAPER["ratio"]], [PAPER["macs_after"] / PAPER["macs_before"]], "k*", ms=10, label="paper (CIFAR-10)")
    ax.set_xlabel("channel ratio (taylor.ratio)")
    ax.set_ylabel("kept MACs fraction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(
    quick: Annotated[bool, typer.Option("--quick", help="two ratios only")] = False,
    root: Annotated[Path, typer.Option(help="project folder holding params.yaml")] = REPO,
    out: Annotated[Path, typer.Option(help="folder for taylor_sizes.json, .md, .png")] = REPO / "benchmarks/results",
) -> None:
    """Prune both architectures at every ratio and write the table."""
    ratios = (0.3, 0.5) if quick else RATIOS
    if quick:  # a smoke run never overwrites the real table
        out = common.QUICK_ROOT / "results"
    p = load_params(root / "params.yaml")
    torch.manual_seed(0)
    cifar = UNet2DModel(**CIFAR10_DDPM).eval()
    digits = build_unet(p.teacher, p.data).eval()
    table = {"CIFAR-10 DDPM (32x32)": sizes(cifar, (3, 32, 32), ratios),
             f"digits teacher ({p.data.image_size}x{p.data.image_size})":
                 sizes(digits, (p.data.channels, p.data.image_size, p.data.image_size), ratios)}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "taylor_sizes", {"quick": quick, "paper": PAPER, "table": table}, to_markdown(table))
    plot(table, out / "taylor_sizes.png")


if __name__ == "__main__":
    typer.run(main)
