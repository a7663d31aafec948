"""Benchmark: cost and speed of the Hub presets' real architectures, full vs DiP-GO schedule vs Diff-Pruned.

SD-1.5's ``UNet2DConditionModel`` (latent 64 x 64, 77 text tokens, classifier-free guidance) and
DiT-XL/2-256's ``DiTTransformer2DModel`` (latent 32 x 32, guidance), with RANDOM weights: speed needs
no weights, and nothing is downloaded. Per model:

* MACs per denoising step of one image, counted as the house counts them (every product) and in the
  papers' convention (convolutions and linear layers; SD-1.5 x 50 steps = DiP-GO's 16.94T);
* a skip schedule of DiP-GO's form (``T x N`` gates, step 0 computing every block) thresholded to
  ``TARGET`` of the trajectory's MACs from seeded random scores: a trained pruner needs the real
  weights, so this measures what a schedule of that cost buys in wall-clock, not its quality;
* one Diff-Pruning model (ratio ``RATIO``, magnitude scores: the Taylor scores of random weights mean
  nothing, and the channel counts are the same) - GPU only: tracing an 860 M-parameter UNet on
  2 CPU cores is not a benchmark;
* on a CUDA device, per-step latency in fp16 (median of ``REPEATS`` trajectories, guidance batch of
  2), full vs schedule vs pruned, beside the MACs ratios. Without one the latency columns say so.

Usage::

    python -m benchmarks.families          # the real architectures (latency and pruning on a GPU only)
    python -m benchmarks.families --quick  # the tiny models of the same classes, everything on this machine
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from diffprune.env import quiet_defaults
from diffprune.metrics.cost import measure_latency
from diffprune.pruning.dipgo import DiTGraph, SDUNetGraph, block_costs, schedule_from_scores
from diffprune.sampling import trajectory

from benchmarks.common import REPO
from benchmarks.tables import write_results

log = logging.getLogger("benchmarks.families")

STEPS, TARGET, RATIO, REPEATS, GUIDANCE = 50, 0.3, 0.3, 3, 7.5


def _models(quick: bool, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """name -> model (random weights), its graph, latent shape, the model call's conditioning."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    from diffprune.models.dit import DIT_XL_2_256, TINY_DIT
    from diffprune.models.sd import SD15_UNET, TINY_SD_UNET

    sd_cfg, dit_cfg, tokens = (TINY_SD_UNET, TINY_DIT, 24) if quick else (SD15_UNET, DIT_XL_2_256, 77)
    on = torch.device("meta") if device.type == "cpu" and not quick else device  # counting only, on CPU
    with torch.device(on):
        sd, dit = UNet2DConditionModel(**sd_cfg).eval(), DiTTransformer2DModel(**dit_cfg).eval()
    if dtype != torch.float32:
        sd, dit = sd.to(dtype), dit.to(dtype)
    return {
        "sd-1.5 unet" if not quick else "tiny sd unet": dict(
            model=sd, graph=SDUNetGraph(sd, tokens), shape=(4, sd_cfg["sample_size"], sd_cfg["sample_size"]),
            cond=torch.zeros(2, tokens, sd_cfg["cross_attention_dim"], device=on, dtype=dtype)),
        "dit-xl/2-256" if not quick else "tiny dit": dict(
            model=dit, graph=DiTGraph(dit), shape=(4, dit_cfg["sample_size"], dit_cfg["sample_size"]),
            cond=torch.tensor([1, 1000], device=on)),
    }


def _pruned(entry: dict) -> dict:
    """The entry of one Diff-Pruning model of ``entry``'s (magnitude scores, ratio ``RATIO``)."""
    from diffusers import DDPMScheduler

    from diffprune.config import TaylorConfig
    from diffprune.pruning.dit_taylor import prune_dit
    from diffprune.pruning.sd_taylor import prune_sd_unet

    model, cond = entry["model"], entry["cond"]
    p = next(model.parameters())
    cfg = TaylorConfig(importance="magnitude", ratio=RATIO, batch_size=2, max_timesteps=1, seed=0)
    latents = torch.randn(2, *entry["shape"], generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    sched = DDPMScheduler(num_train_timesteps=1000)
    if isinstance(entry["graph"], SDUNetGraph):
        small, _ = prune_sd_unet(model, sched, latents, cond.to(p.dtype), cfg, device=p.device)
        graph = SDUNetGraph(small, entry["graph"].tokens)
    else:
        small, _ = prune_dit(model, sched, latents, cond, cfg)
        graph = DiTGraph(small)
    return {**entry, "model": small.eval(), "graph": graph}


def _macs(entry: dict, count: str) -> int:
    c = block_costs(entry["graph"], entry["shape"], count=count)
    return c.full


def _schedule(entry: dict, steps: int):
    graph = entry["graph"]
    costs = block_costs(graph, entry["shape"])
    scores = torch.rand(steps, len(graph.block_names), generator=torch.Generator().manual_seed(0))
    return schedule_from_scores(scores, graph, costs, target_ratio=TARGET, tolerance=0.05)


def _latency(entry: dict, keep, steps: int, device: torch.device, dtype: torch.dtype) -> float:
    """Median seconds per step of a guided trajectory (batch 2 = one image with guidance)."""
    from diffusers import DDIMScheduler

    from diffprune.pruning.dipgo import GatedRunner

    graph, cond = entry["graph"], entry["cond"]
    runner = GatedRunner(graph)
    x = torch.randn(2, *entry["shape"], device=device, dtype=dtype)

    def den(xt, t, step):  # eps: a learned-sigma DiT's variance channels dropped
        with graph.conditioned(cond):
            out = runner.step_hard(xt, t, keep[step]) if keep is not None else graph.call_model(xt, t)
        return out[:, : xt.shape[1]]

    sched = DDIMScheduler(num_train_timesteps=1000)

    def run():
        runner.reset()
        with torch.no_grad():
            trajectory(den, sched, x, steps, clamp=False)

    return measure_latency(run, repeats=REPEATS)["median_s"] / steps


def _row(name: str, entry: dict, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    sched = _schedule(entry, steps)
    row = {"model": name, "params_m": sum(p.numel() for p in entry["model"].parameters()) / 1e6,
           "macs_per_step_g": _macs(entry, "all") / 1e9, "macs_per_step_layers_g": _macs(entry, "layers") / 1e9,
           "schedule_macs_ratio": sched.macs_ratio, "steps": steps}
    row["trajectory_macs_layers_t"] = row["macs_per_step_layers_g"] * steps / 1e3
    if next(entry["model"].parameters()).device.type == "meta":
        return row  # counted only: no weights to time or prune
    pruned = _pruned(entry)
    row["pruned_macs_ratio"] = _macs(pruned, "all") / _macs(entry, "all")
    row["latency_full_s"] = _latency(entry, None, steps, device, dtype)
    row["latency_schedule_s"] = _latency(entry, sched.keep, steps, device, dtype)
    row["latency_pruned_s"] = _latency(pruned, None, steps, device, dtype)
    row["speedup_schedule"] = row["latency_full_s"] / row["latency_schedule_s"]
    row["speedup_pruned"] = row["latency_full_s"] / row["latency_pruned_s"]
    return row


def to_markdown(rows: list[dict], device: str, quick: bool) -> str:
    lines = ["# The families' real architectures: MACs and speed" + (" (QUICK: tiny models)" if quick else ""), "",
             f"Device: {device}. Random weights. Guidance doubles every call (batch 2 for one image); MACs are "
             "per image and step, unguided. 'layers' = convolutions + linear layers, the papers' convention.",
             f"Schedule: DiP-GO's form thresholded to {TARGET} of the trajectory MACs from seeded random scores "
             "(its cost, not a trained pruner's quality).", "",
             f"Diff-Pruned: ratio {RATIO}, magnitude scores (channel counts as Taylor's; random weights).",
             "Parameters: diffusers' DiT repeats the timestep and label embedding in every block (2.7 M each), "
             "so DiT-XL/2 has 750 M parameters there, not the paper's 675 M; its MACs are the paper's.", "",
             "| model | params (M) | MACs / step (G) | layers only (G) | x steps, layers (T) | schedule MACs ratio "
             "| pruned MACs ratio | s / step: full | schedule | pruned | speedup: schedule | pruned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = (f"{r['pruned_macs_ratio']:.3f} | {r['latency_full_s']:.4f} | {r['latency_schedule_s']:.4f} | "
               f"{r['latency_pruned_s']:.4f} | {r['speedup_schedule']:.2f}x | {r['speedup_pruned']:.2f}x"
               if "latency_full_s" in r else "GPU only | not measured (no CUDA device) | - | - | - | -")
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['macs_per_step_g']:.4g} | "
                     f"{r['macs_per_step_layers_g']:.4g} | {r['trajectory_macs_layers_t']:.4g} ({r['steps']} steps) | "
                     f"{r['schedule_macs_ratio']:.3f} | {lat} |")
    return "\n".join(lines) + "\n"


def main(
    quick: Annotated[bool, typer.Option("--quick", help="tiny models of the same classes")] = False,
    out: Annotated[Path, typer.Option(help="folder for families.json / .md")] = REPO / "benchmarks/results",
) -> None:
    """Count (and on a GPU, time) the families' real architectures."""
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and not quick:
        log.info("no CUDA device: MACs counted on the meta device; latency is measured on a GPU only")
    steps = 4 if quick else STEPS
    if quick:
        out = REPO / ".work" / "bench-quick" / "results"
    rows = [_row(name, e, steps, device, dtype) for name, e in _models(quick, device, dtype).items()]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    write_results(out, "families", {"quick": quick, "device": dev, "rows": rows}, to_markdown(rows, dev, quick))
    log.info("wrote %s", out / "families.md")


if __name__ == "__main__":
    typer.run(main)
