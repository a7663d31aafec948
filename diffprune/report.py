"""The metrics table printed at the end of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path


def collect(root: Path) -> list[dict]:
    rows = []
    for f in sorted((Path(root) / "models" / "eval").glob("*/metrics.json")):
        m = json.loads(f.read_text())
        m["model"] = f.parent.name
        rows.append(m)
    order = {"teacher": 0}
    return sorted(rows, key=lambda r: (order.get(r["model"], 1), r["model"]))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def metrics_table(root: Path) -> str:
    """A markdown table: FID (and floor), MACs, params, latency, fidelity for every evaluated model."""
    rows = collect(root)
    if not rows:
        return "no evaluated models yet (run the pipeline)"
    head = ("| model | FID | FID floor | MACs/step (M) | trajectory MACs (G) | MACs vs teacher | params (M) "
            "| latency (s/batch) | speedup | PSNR vs teacher | SSIM vs teacher |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fid = f"{r['fid']:.3f}" + (f" ± {r['fid_std']:.3f}" if len(r.get("fid_per_seed", [])) > 1 else "")
        lines.append(
            f"| {r['model']} | {fid} | {r.get('fid_floor', float('nan')):.3f} | {r['macs_per_step'] / 1e6:.2f} "
            f"| {r['trajectory_macs'] / 1e9:.3f} | {_fmt(r.get('macs_ratio_vs_teacher', 1.0), '.3f')} "
            f"| {r['params'] / 1e6:.3f} | {r['latency_s']:.3f} | {_fmt(r.get('speedup_vs_teacher', 1.0), '.2f')}x "
            f"| {_fmt(r.get('psnr_vs_teacher'), '.2f')} | {_fmt(r.get('ssim_vs_teacher'), '.3f')} |"
        )
    ext = rows[0].get("feature_extractor", "?")
    lines.append(f"\nFID features: {ext}; protocol: {rows[0]['sampler']} {rows[0]['steps']} steps, "
                 f"{rows[0]['num_samples']} samples, latency per batch of {rows[0]['latency_batch']}.")
    return "\n".join(lines)
