"""The ``report`` stage: every evaluated model (and the benchmarks' baselines) on a Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Params
from ..pareto import BENCH_DIR, REPORT_DIR, build_report, write_report
from . import safe_subpath, stage


@stage("report")
def run_report(p: Params, root: Path, **_: Any) -> dict:
    """Write ``models/report/pareto.{png,md,json}``: FID vs trajectory MACs (log x) and vs measured
    latency for every model under ``models/eval/``, with the benchmark baselines of
    ``benchmarks/results/`` when present (their own marker and front: another teacher's FID scale)."""
    report = build_report(root, safe_subpath(root, BENCH_DIR))
    out = write_report(report, safe_subpath(root, REPORT_DIR))
    return {**{k: str(v) for k, v in out.items()},
            "points": len(report["points"]), "skipped_benchmarks": len(report["skipped"])}
