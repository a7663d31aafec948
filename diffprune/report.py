"""The metrics table printed at the end of a pipeline run (markdown, and rows for a Prefect table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .io import read_json


def collect(root: Path) -> list[dict]:
    """Every evaluated model's metrics (``models/eval/*/metrics.json``), the teacher first.

    Raises:
        ArtifactError: a metrics file is truncated or not JSON (its path named).
    """
    rows = []
    for f in sorted((Path(root) / "models" / "eval").glob("*/metrics.json")):
        m = read_json(f)
        m["model"] = f.parent.name
        rows.append(m)
    order = {"teacher": 0}
    return sorted(rows, key=lambda r: (order.get(r["model"], 1), r["model"]))


def _num(key: str, scale: float = 1.0, digits: int = 3) -> Callable[[dict], Any]:
    def get(r: dict) -> Any:
        v = r.get(key)
        return None if v is None else round(v / scale, digits)

    return get


# column -> how to read it from a metrics row (None = not measured for this model)
COLUMNS: dict[str, Callable[[dict], Any]] = {
    "model": lambda r: r["model"],
    "FID": _num("fid"),
    "FID std": lambda r: round(r["fid_std"], 3) if len(r.get("fid_per_seed", [])) > 1 else None,
    "FID floor": _num("fid_floor"),
    "FID noise": _num("fid_noise", digits=1),  # the calibration's lowest bad set (noise, blur, ...)
    "KID": _num("kid", digits=4),
    "MACs/step (M)": _num("macs_per_step", 1e6, 2),
    "trajectory MACs (G)": _num("trajectory_macs", 1e9, 3),
    "MACs vs teacher": lambda r: round(r.get("macs_ratio_vs_teacher", 1.0), 3),
    "params (M)": _num("params", 1e6, 3),
    "latency (s/batch)": _num("latency_s"),
    "speedup": lambda r: round(r.get("speedup_vs_teacher", 1.0), 2),
    "PSNR vs teacher": _num("psnr_vs_teacher", digits=2),
    "SSIM vs teacher": _num("ssim_vs_teacher"),
    "verdict": lambda r: "DEGENERATE: " + r["verdict"] if r.get("degenerate") else "ok",
}


def table_rows(root: Path, every: bool = False) -> list[dict[str, Any]]:
    """One dict per evaluated model: the model first, the :data:`COLUMNS` rounded for display, and
    with ``every`` all other scalar metrics after them (floats to 4 significant digits)."""
    rows = []
    for r in collect(root):
        row = {name: get(r) for name, get in COLUMNS.items()}
        if every:
            rest = sorted(k for k, v in r.items() if k != "model" and not isinstance(v, (list, dict)))
            row |= {k: float(f"{r[k]:.4g}") if isinstance(r[k], float) else r[k] for k in rest}
        rows.append(row)
    return rows


def metrics_table(root: Path) -> str:
    """A markdown table: FID (and floor), MACs, params, latency, fidelity for every evaluated model."""
    raw = collect(root)
    if not raw:
        return "no evaluated models yet (run the pipeline)"
    rows = table_rows(root)
    cols = [c for c in COLUMNS if c != "FID std"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = {c: "-" if r[c] is None else str(r[c]) for c in cols}
        if r["FID std"] is not None:
            cells["FID"] += f" ± {r['FID std']}"
        cells["speedup"] += "x"
        lines.append("| " + " | ".join(cells[c] for c in cols) + " |")
    first = raw[0]
    lines.append(f"\nFID features: {first.get('feature_extractor', '?')}; protocol: {first['sampler']} "
                 f"{first['steps']} steps, {first['num_samples']} samples, latency per batch of "
                 f"{first['latency_batch']}.")
    return "\n".join(lines)
