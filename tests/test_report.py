"""The ``report`` stage: Pareto fronts, the plot and table, benchmark results read defensively."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from diffprune import pareto
from diffprune.io import write_json

from .conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEACHER = {"fid": 1.2, "trajectory_macs": 8e8, "latency_s": 1.6, "feature_extractor": "featnet-x",
           "sampler": "ddim", "steps": 50, "num_samples": 500, "latency_batch": 64}
MODELS = {
    "teacher": TEACHER,
    "dipgo": {"fid": 1.7, "trajectory_macs": 2.6e8, "macs_ratio_vs_teacher": 0.325, "latency_s": 0.6,
              "speedup_vs_teacher": 2.6},
    "experts": {"fid": 2.4, "trajectory_macs": 4e8, "macs_ratio_vs_teacher": 0.5, "latency_s": 1.1,
                "speedup_vs_teacher": 1.5},
    "finetune": {"fid": 3.0, "trajectory_macs": 4.5e8, "macs_ratio_vs_teacher": 0.56, "latency_s": 0.5,
                 "speedup_vs_teacher": 3.2},
}


def _pt(name: str, x: float | None, fid: float, **kw) -> dict:
    return {"model": name, "source": kw.pop("source", "pipeline"), "trajectory_macs": x, "latency_s": x,
            "fid": fid, "degenerate": kw.pop("degenerate", False), **kw}


def _names(points: list[dict], idx: list[int]) -> list[str]:
    return [points[i]["model"] for i in idx]


def test_front_excludes_dominated_points():
    pts = [_pt("a", 1.0, 5.0), _pt("b", 2.0, 3.0), _pt("c", 3.0, 4.0), _pt("d", 4.0, 1.0), _pt("e", 2.5, 3.0)]
    # c is beaten by b on both axes; e has b's FID at a higher cost
    assert _names(pts, pareto.pareto_front(pts, "trajectory_macs")) == ["a", "b", "d"]


def test_front_keeps_ties_and_a_single_point():
    twins = [_pt("a", 1.0, 2.0), _pt("b", 1.0, 2.0), _pt("c", 1.0, 2.5)]
    assert _names(twins, pareto.pareto_front(twins, "trajectory_macs")) == ["a", "b"]  # equal: neither dominates
    assert pareto.pareto_front([_pt("only", 3.0, 9.0)], "trajectory_macs") == [0]
    assert pareto.pareto_front([], "trajectory_macs") == []


def test_front_skips_unmeasured_and_degenerate_points():
    pts = [_pt("nolatency", None, 0.1), _pt("broken", 0.1, 0.1, degenerate=True), _pt("ok", 5.0, 5.0)]
    assert _names(pts, pareto.pareto_front(pts, "latency_s")) == ["ok"]


def test_fronts_are_taken_within_each_source():
    pts = pareto.mark_fronts([_pt("own", 2.0, 2.0), _pt("bench", 1.0, 1.0, source="benchmark")])
    assert [p["front_macs"] for p in pts] == [True, True]  # the benchmark point does not dominate ours
    assert [p["front_latency"] for p in pts] == [True, True]


def _root(tmp_path: Path, models: dict = MODELS) -> Path:
    root = tmp_path / "proj"
    for name, m in models.items():
        write_json(root / f"models/eval/{name}/metrics.json", m)
    return root


def test_report_writes_a_png_and_one_table_row_per_model(tmp_path: Path):
    from PIL import Image

    root = _root(tmp_path)
    report = pareto.build_report(root, tmp_path / "no-benchmarks")
    out = pareto.write_report(report, root / pareto.REPORT_DIR)
    data = out["png"].read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1] * 0.9  # two panels side by side
    md = out["md"].read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| model")]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted(MODELS)
    by_model = {r.split(" | ")[0][2:]: r.split(" | ") for r in rows}
    # MACs front: teacher (the best FID) and dipgo (the cheapest); latency front adds finetune (fastest)
    assert [c.strip(" |") for c in by_model["dipgo"][-2:]] == ["yes", "yes"]
    assert [c.strip(" |") for c in by_model["experts"][-2:]] == ["no", "no"]
    assert [c.strip(" |") for c in by_model["finetune"][-2:]] == ["no", "yes"]
    doc = json.loads(out["json"].read_text())
    assert doc["fronts"]["pipeline/macs"] == ["teacher", "dipgo"]
    assert set(doc["fronts"]["pipeline/latency"]) == {"teacher", "dipgo", "finetune"}
    assert "No benchmark results found" in doc["caption"] and doc["table"].count("\n") == len(MODELS) + 1


def _bench(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "benchmarks/results/dipgo.json", folder / "dipgo.json")
    (folder / "taylor.json").write_text('{"targets": [{"runs": ')  # truncated
    (folder / "experts.json").write_text(json.dumps([1, 2, 3]))    # valid JSON, not a result


def test_missing_and_malformed_benchmark_results_are_skipped(tmp_path: Path, caplog):
    folder = tmp_path / "bench"
    _bench(folder)
    with caplog.at_level(logging.WARNING, logger="diffprune.pareto"):
        points, teachers, skipped = pareto.benchmark_points(folder)
    assert len(skipped) == 3 and all(any(f"{n}.json" in s for s in skipped) for n in ("taylor", "experts", "stack"))
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 3  # stack.json: missing
    assert list(teachers) == ["dipgo"] and points and all(p["model"].startswith("dipgo: ") for p in points)
    assert all(p["source"] == "benchmark" for p in points)
    (folder / "dipgo.json").unlink()
    assert pareto.benchmark_points(folder)[0] == [] and len(pareto.benchmark_points(folder)[2]) == 4
    assert pareto.benchmark_points(tmp_path / "nowhere")[0] == []


def test_benchmark_points_are_labelled_and_not_on_this_runs_front(tmp_path: Path):
    folder = tmp_path / "bench"
    _bench(folder)
    root = _root(tmp_path)
    report = pareto.build_report(root, folder)
    bench = [p for p in report["points"] if p["source"] == "benchmark"]
    # the dipgo benchmark: a teacher and 4 methods x 5 settings, the baselines shared by two settings once
    assert 10 < len(bench) <= 21 and len({p["model"] for p in bench}) == len(bench)
    # labelled with the run's own steps (fewer-steps: not the base trajectory's), read from the same file
    first = json.loads((folder / "dipgo.json").read_text())["points"][0]
    label = f"dipgo: fewer-steps (steps={first['runs']['fewer-steps']['steps']}, target={first['target']})"
    assert first["runs"]["fewer-steps"]["steps"] != first["steps"] and label in {p["model"] for p in bench}
    assert report["fronts"]["pipeline/macs"] == ["teacher", "dipgo"]  # better benchmark FIDs change nothing
    assert "NOT comparable" in report["caption"] and "teachers" in report["caption"]
    md = pareto.markdown(report)
    assert "## Benchmark baselines" in md and "not comparable" in md
    assert "Skipped benchmark results" in md and "taylor.json" in md


def test_the_stage_writes_its_outputs_atomically(tmp_path: Path, monkeypatch):
    from diffprune.config import load_params
    from diffprune.stages import get_stage

    root = _root(tmp_path)
    _bench(root / pareto.BENCH_DIR)
    out = get_stage("report")(load_params(REPO / "params.yaml"), root)
    folder = root / pareto.REPORT_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["pareto.json", "pareto.md", "pareto.png"]  # no temp files
    assert out["png"] == str(folder / "pareto.png") and out["skipped_benchmarks"] == 3  # stack.json: missing
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(fig, *a, **kw):
        Path(a[0]).write_bytes(b"half a png")  # written, then the save fails
        raise OSError("disk full")

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        get_stage("report")(load_params(REPO / "params.yaml"), root)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old report intact, nothing left


def test_the_artifact_embeds_the_plot(tmp_path: Path):
    root = _root(tmp_path)
    folder = root / pareto.REPORT_DIR
    pareto.write_report(pareto.build_report(root, tmp_path / "none"), folder)
    md = pareto.artifact_markdown(folder)
    uri = re.search(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert uri and base64.b64decode(uri.group(1)) == (folder / "pareto.png").read_bytes()
    s = pareto.summary(folder)
    assert s["png"] == str(folder / "pareto.png") and s["table"].startswith("| model")
    assert pareto.summary(tmp_path / "empty") is None


def test_workspaces_get_the_benchmark_results(tmp_path: Path):
    from diffprune.workspace import copy_benchmarks

    assert copy_benchmarks(REPO, tmp_path) == [f"{n}.json" for n in pareto.BENCHMARKS
                                              if (REPO / pareto.BENCH_DIR / f"{n}.json").exists()]
    assert (tmp_path / pareto.BENCH_DIR / "README.md").is_file()
    assert copy_benchmarks(tmp_path / "nothing-here", tmp_path / "ws") == []
    assert (tmp_path / "ws" / pareto.BENCH_DIR).is_dir()  # the stage's dependency exists all the same


def test_the_pipeline_run_holds_the_report_in_mlflow(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    from diffprune import tracking

    monkeypatch.delenv(tracking.TRACKING_ENV, raising=False)
    root = _root(tmp_path)
    folder = root / pareto.REPORT_DIR
    files = pareto.write_report(pareto.build_report(root, tmp_path / "none"), folder)
    run_id = tracking.log_pipeline_run("exp", list(files.values()), root=root, tags={"git_commit": "abc"})
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "pipeline" and run.data.tags["diffprune.kind"] == "pipeline"
    assert run.data.tags["git_commit"] == "abc"
    logged = {a.path for a in MlflowClient().list_artifacts(run_id, "report")}
    assert logged == {"report/pareto.png", "report/pareto.md", "report/pareto.json"}


def test_the_flow_publishes_the_report_as_an_artifact_and_a_pipeline_run(tmp_path: Path, monkeypatch):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from diffprune import tracking
    from diffprune.flows import pipeline

    monkeypatch.delenv(tracking.TRACKING_ENV, raising=False)
    root = _root(tmp_path)
    log = logging.getLogger("test")
    assert pipeline._publish_report(root, ["report"], "exp", None, log) is None  # no report yet: nothing
    pareto.write_report(pareto.build_report(root, tmp_path / "none"), root / pareto.REPORT_DIR)
    published: list[dict] = []
    monkeypatch.setattr(pipeline, "create_markdown_artifact", lambda **kw: published.append(kw))
    quiet = pipeline._publish_report(root, [], "exp", None, log)  # outside a flow run, nothing ran
    assert published == [] and "mlflow_run_id" not in quiet and quiet["png"].endswith("models/report/pareto.png")
    ctx = SimpleNamespace(flow_run=SimpleNamespace(id="fr-1", name="happy-run"))
    monkeypatch.setattr(pipeline.FlowRunContext, "get", classmethod(lambda cls: ctx))
    out = pipeline._publish_report(root, ["evaluate@dipgo", "report"], "exp", "c0ffee", log)
    (art,) = published
    assert art["key"] == "prune-pipeline-pareto" and "](data:image/png;base64," in art["markdown"]
    assert "| dipgo |" in art["markdown"]
    tags = MlflowClient().get_run(out["mlflow_run_id"]).data.tags
    assert (tags["prefect.flow_run_id"], tags["prefect.flow_run_name"], tags["git_commit"]) == ("fr-1", "happy-run",
                                                                                                "c0ffee")
    assert tags["diffprune.ran"] == "evaluate@dipgo, report"


def test_diffprune_run_ends_with_the_pareto_table_and_the_plot_path(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from diffprune.cli import app
    from diffprune.flows import pipeline

    png = str(tmp_path / "models/report/pareto.png")
    result = {"table": "metrics", "ran": ["report"], "skipped": [], "commit": None,
              "report": {"table": "| model | ... |\n|---|\n| dipgo | ... |", "png": png}}
    monkeypatch.setattr(pipeline, "prune_pipeline", lambda **kw: result)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())  # a run uses ROOT/params.yaml
    out = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    tail = out.output.strip().splitlines()
    assert tail[-1].startswith(f"Pareto plot: {png}") and "| dipgo | ... |" in tail[-2]
