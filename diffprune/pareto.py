"""The Pareto report: every evaluated model on FID vs trajectory MACs and FID vs measured latency.

Pure library code (no Prefect, MLflow or DVC): the ``report`` stage (:mod:`diffprune.stages.report`)
calls :func:`build_report` and :func:`write_report`; the flow publishes what they wrote.

Points come from two places and are never mixed into one front:

* ``pipeline``: this run's models (``models/eval/*/metrics.json``, :func:`diffprune.report.collect`);
* ``benchmark``: the runs of ``benchmarks/results/{dipgo,taylor,experts,stack}.json`` when present. Their
  FIDs are on the benchmark teacher's scale (another teacher, often another feature network and
  sample count), so they get their own marker, legend entry, front and table, and the caption says
  how their teacher differs from this run's. A missing or malformed file is skipped with a warning.

The front is the set of non-dominated points (lower is better on both axes), computed per source,
once in (trajectory MACs, FID) and once in (latency, FID). A degenerate model is shown but is never
on a front.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from .io import ArtifactError, atomic_path, read_json, write_json
from .report import collect

log = logging.getLogger(__name__)

REPORT_DIR = "models/report"
BENCH_DIR = "benchmarks/results"
BENCHMARKS = ("dipgo", "taylor", "experts", "stack")  # benchmarks/results/NAME.json, read when present
BENCH_LISTS = ("points", "targets", "budgets")      # the per-setting lists of those files
FILES = {"png": "pareto.png", "md": "pareto.md", "json": "pareto.json"}
AXES = {"macs": "trajectory_macs", "latency": "latency_s"}


# ----------------------------------------------------------------------------- points

def _num(v: Any) -> Optional[float]:
    """A finite float, else None (bools, strings, NaN, inf are not measurements)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def make_point(model: str, source: str, m: dict, *, teacher: bool = False) -> Optional[dict[str, Any]]:
    """One plotted point from a metrics dict (the evaluation protocol's keys); None without a FID."""
    fid = _num(m.get("fid"))
    if fid is None:
        return None
    return {"model": model, "label": model, "source": source, "fid": fid,
            "trajectory_macs": _num(m.get("trajectory_macs")),
            "macs_ratio": 1.0 if teacher else _num(m.get("macs_ratio_vs_teacher")),
            "latency_s": _num(m.get("latency_s")),
            "speedup": 1.0 if teacher else _num(m.get("speedup_vs_teacher")),
            "degenerate": bool(m.get("degenerate", False))}


def pipeline_points(root: Path) -> list[dict[str, Any]]:
    """This run's evaluated models, the teacher first (a malformed metrics file raises ArtifactError)."""
    pts = [make_point(r["model"], "pipeline", r, teacher=r["model"] == "teacher") for r in collect(root)]
    return [p for p in pts if p is not None]


def _context(entry: dict) -> str:
    """``target=0.5, steps=50``: the scalar settings of one benchmark list entry."""
    return ", ".join(f"{k}={v}" for k, v in sorted(entry.items()) if isinstance(v, (int, float, str))
                     and not isinstance(v, bool))


def _runs(node: Any, name: str = "") -> Iterable[tuple[str, dict]]:
    """Every ``(method, run)`` below a benchmark's ``runs``: a dict holding a ``metrics`` dict."""
    if isinstance(node, dict):
        if isinstance(node.get("metrics"), dict):
            yield str(node.get("method") or name), node
            return
        for key, child in node.items():
            yield from _runs(child, str(key))
    elif isinstance(node, list):
        for child in node:
            yield from _runs(child, name)


def bench_points(name: str, doc: Any) -> tuple[list[dict[str, Any]], Optional[dict]]:
    """The points of one benchmark result and its teacher's metrics; ValueError when it has none."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    teacher = doc.get("teacher") if isinstance(doc.get("teacher"), dict) else None
    pts, seen = [], set()
    if teacher is not None and (t := make_point(f"{name}: teacher", "benchmark", teacher, teacher=True)):
        pts.append(dict(t, label="teacher"))
    for key in BENCH_LISTS:
        entries = doc.get(key) if isinstance(doc.get(key), list) else []
        for entry in (e for e in entries if isinstance(e, dict)):
            for method, run in _runs(entry.get("runs")):
                # the run's own steps (a fewer-steps baseline) override the setting's
                where = _context({**entry, **{k: run[k] for k in ("steps",) if k in run}})
                p = make_point(f"{name}: {method} ({where})", "benchmark", run["metrics"])
                # one point per model: a baseline shared by two settings (same FID and MACs) once
                if p is not None and (method, p["fid"], p["trajectory_macs"]) not in seen:
                    seen.add((method, p["fid"], p["trajectory_macs"]))
                    pts.append(dict(p, label=method))
    if len(pts) <= (teacher is not None):
        raise ValueError(f"no evaluated runs under {'/'.join(BENCH_LISTS)}")
    return pts, teacher


def benchmark_points(folder: Path) -> tuple[list[dict[str, Any]], dict[str, dict], list[str]]:
    """``(points, teachers by benchmark, skipped)`` of ``folder/{dipgo,taylor,experts,stack}.json``; a
    missing, unreadable or malformed file is skipped, with a warning logged and its reason returned."""
    points: list[dict[str, Any]] = []
    teachers: dict[str, dict] = {}
    skipped: list[str] = []
    for name in BENCHMARKS:
        f = Path(folder) / f"{name}.json"
        try:
            pts, teacher = bench_points(name, read_json(f))
        except (ArtifactError, ValueError, TypeError, AttributeError, OSError) as e:
            skipped.append(f"{f}: {e}")
            log.warning("Pareto report: benchmark %s skipped (%s)", f, e)
            continue
        points += pts
        if teacher is not None:
            teachers[name] = teacher
    return points, teachers, skipped


# ----------------------------------------------------------------------------- the front

def pareto_front(points: list[dict[str, Any]], x: str, y: str = "fid") -> list[int]:
    """Indices (ascending) of the points no other point dominates in ``(x, y)``, both minimised.

    ``a`` dominates ``b`` when it is no worse on both and better on one: equal points do not dominate
    each other, so ties are all on the front. Points lacking ``x`` or ``y``, and degenerate ones, are
    never on it.
    """
    cand = [i for i, p in enumerate(points) if p.get(x) is not None and p.get(y) is not None
            and not p.get("degenerate")]

    def dominates(a: dict, b: dict) -> bool:
        return a[x] <= b[x] and a[y] <= b[y] and (a[x] < b[x] or a[y] < b[y])

    return [i for i in cand if not any(dominates(points[j], points[i]) for j in cand if j != i)]


def mark_fronts(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points with ``front_macs`` / ``front_latency`` set, each front taken within its source."""
    out = [dict(p, front_macs=False, front_latency=False) for p in points]
    for source in sorted({p["source"] for p in out}):
        idx = [i for i, p in enumerate(out) if p["source"] == source]
        group = [out[i] for i in idx]
        for axis, key in AXES.items():
            for k in pareto_front(group, key):
                out[idx[k]][f"front_{axis}"] = True
    return out


# ----------------------------------------------------------------------------- caption and tables

def _teacher_desc(m: dict) -> str:
    fid = _num(m.get("fid"))
    return (f"FID {fid:.3f}" if fid is not None else "FID ?") + \
        f", features {m.get('feature_extractor', '?')}, {m.get('num_samples', '?')} samples, " \
        f"{m.get('sampler', '?')} {m.get('steps', '?')} steps"


def caption(teacher: Optional[dict], bench_teachers: dict[str, dict]) -> str:
    """What the plot compares, and why the benchmark FIDs are not on this run's scale."""
    text = ("Lower is better on every axis; the step line is the Pareto front (points no other point beats "
            "on both axes), taken separately for this run's models and for the benchmark baselines.")
    if not bench_teachers:
        return text + " No benchmark results found: this run's models only."
    own = teacher or {}
    descs = sorted({_teacher_desc(t) for t in bench_teachers.values()})
    differ = ["teachers"]
    if any(t.get("feature_extractor") != own.get("feature_extractor") for t in bench_teachers.values()):
        differ.append("FID feature networks")
    if any(t.get(k) != own.get(k) for t in bench_teachers.values() for k in ("num_samples", "sampler", "steps")):
        differ.append("sampling protocols")
    return text + (f" The benchmark baselines ({', '.join(f'{n}.json' for n in bench_teachers)}) are measured "
                   f"against the benchmark's own teacher ({'; '.join(descs)}), this run's models against this "
                   f"run's teacher ({_teacher_desc(own) if teacher else 'not evaluated'}). Different "
                   f"{', '.join(differ)}: the benchmark FIDs are NOT comparable with this run's (read each set "
                   f"against its own teacher), and their latencies were timed on the benchmark's machine and load.")


COLUMNS = ("model", "MACs vs teacher", "trajectory MACs (G)", "latency (s/batch)", "speedup", "FID",
           "on front (MACs)", "on front (latency)")


def _cell(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(points: list[dict[str, Any]]) -> str:
    """A markdown table, one row per point: MACs ratio, latency, FID and whether it is on each front."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for p in points:
        macs = None if p["trajectory_macs"] is None else p["trajectory_macs"] / 1e9
        name = p["model"] + (" (degenerate)" if p["degenerate"] else "")
        cells = [name, _cell(p["macs_ratio"], ".3f"), _cell(macs, ".3g"), _cell(p["latency_s"], ".3f"),
                 _cell(p["speedup"], ".2f") + ("x" if p["speedup"] is not None else ""), f"{p['fid']:.3f}",
                 "yes" if p["front_macs"] else "no", "yes" if p["front_latency"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], image: str = FILES["png"]) -> str:
    """The report as markdown: the plot (``image``: a path or a data URI), this run's table, the
    benchmarks' table, the caption and what was skipped."""
    own = [p for p in report["points"] if p["source"] == "pipeline"]
    bench = [p for p in report["points"] if p["source"] == "benchmark"]
    parts = ["# Pareto report: FID vs trajectory MACs and vs latency", "",
             f"![FID vs trajectory MACs and latency]({image})", "", "## This run's models", "",
             table(own) if own else "no evaluated models yet (run the pipeline)"]
    if bench:
        parts += ["", "## Benchmark baselines (FID on the benchmark teacher's scale: not comparable with the "
                  "table above)", "", table(bench)]
    parts += ["", report["caption"]]
    if report["skipped"]:
        parts += ["", "Skipped benchmark results: " + "; ".join(report["skipped"])]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- the plot

STYLES = {  # source -> how its points and front are drawn
    "pipeline": {"marker": "o", "color": "tab:blue", "ls": "-", "label": "this run", "size": 40, "font": 8},
    "benchmark": {"marker": "x", "color": "tab:gray", "ls": "--", "size": 25, "font": 6,
                  "label": "benchmarks (their teacher's FID scale)"},
}
XLABELS = {"macs": "trajectory MACs per sample (log scale)", "latency": "measured latency (s per batch)"}


def _panel(ax, points: list[dict[str, Any]], axis: str) -> None:
    """One panel: every source's points, its front as a step line, the points labelled (this run's
    all; the benchmarks' only on their front, to stay readable)."""
    key = AXES[axis]
    for source, st in STYLES.items():
        pts = [p for p in points if p["source"] == source and p[key] is not None]
        if not pts:
            continue
        ax.scatter([p[key] for p in pts], [p["fid"] for p in pts], marker=st["marker"], c=st["color"],
                   s=st["size"], label=st["label"], zorder=3)
        front = sorted((p for p in pts if p[f"front_{axis}"]), key=lambda p: (p[key], p["fid"]))
        if front:
            ax.step([p[key] for p in front], [p["fid"] for p in front], where="post", color=st["color"],
                    ls=st["ls"], lw=1.2, label=f"{st['label']}: Pareto front", zorder=2)
        for p in pts:
            if source == "pipeline" or p[f"front_{axis}"]:
                ax.annotate(p.get("label", p["model"]), (p[key], p["fid"]), xytext=(4, 3), textcoords="offset points",
                            fontsize=st["font"], color=st["color"] if source != "pipeline" else "black")
    if axis == "macs" and any(p[key] for p in points):
        ax.set_xscale("log")
    fids = [p["fid"] for p in points if p[key] is not None and p["fid"] > 0]
    if fids and max(fids) / min(fids) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(XLABELS[axis])
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no evaluated models yet", ha="center", va="center", transform=ax.transAxes)


def render_png(points: list[dict[str, Any]], text: str, path: Path) -> Path:
    """The two panels (FID vs trajectory MACs with a log x axis, FID vs latency) and the caption,
    written atomically to ``path``."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=90)
    try:
        for ax, axis in zip(axes, AXES):
            _panel(ax, points, axis)
        axes[0].set_title("FID vs trajectory MACs")
        axes[1].set_title("FID vs measured latency")
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(text, 190)), fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- the report

def build_report(root: Path, bench_dir: Optional[Path] = None) -> dict[str, Any]:
    """Every point with its fronts marked, the caption, the skipped benchmark files, the fronts by name."""
    root = Path(root)
    rows = collect(root)
    bench, teachers, skipped = benchmark_points(bench_dir if bench_dir is not None else root / BENCH_DIR)
    points = mark_fronts(pipeline_points(root) + bench)
    teacher = next((r for r in rows if r["model"] == "teacher"), None)
    fronts = {f"{s}/{axis}": [p["model"] for p in points if p["source"] == s and p[f"front_{axis}"]]
              for s in STYLES for axis in AXES}
    return {"points": points, "caption": caption(teacher, teachers), "skipped": skipped, "fronts": fronts}


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``pareto.png``, ``pareto.md`` and ``pareto.json`` (the points, fronts and this run's table) in
    ``out_dir``, each written atomically; the JSON last."""
    out = {k: Path(out_dir) / f for k, f in FILES.items()}
    render_png(report["points"], report["caption"], out["png"])
    with atomic_path(out["md"]) as tmp:
        tmp.write_text(markdown(report))
    own = [p for p in report["points"] if p["source"] == "pipeline"]
    write_json(out["json"], {**report, "table": table(own) if own else ""})
    return out


def artifact_markdown(out_dir: Path) -> str:
    """``pareto.md`` with the plot embedded as a ``data:`` URI (a Prefect markdown artifact renders it)."""
    out = {k: Path(out_dir) / f for k, f in FILES.items()}
    uri = "data:image/png;base64," + base64.b64encode(out["png"].read_bytes()).decode()
    return markdown(read_json(out["json"]), image=uri)


def summary(out_dir: Path) -> Optional[dict[str, str]]:
    """``{"table", "png"}``: this run's Pareto table and the plot's path; None before the report exists."""
    f = Path(out_dir) / FILES["json"]
    if not f.exists() or not (Path(out_dir) / FILES["png"]).exists():
        return None
    return {"table": json.loads(f.read_text()).get("table", ""), "png": str(Path(out_dir) / FILES["png"])}
