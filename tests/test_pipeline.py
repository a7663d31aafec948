"""End-to-end: the Prefect flow on a tiny config, DVC reproduction, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, make_project

BIN = Path(sys.executable).parent


def test_flow_and_dvc_list_the_same_stages():
    from diffprune.flows.pipeline import PIPELINE
    from diffprune.flows.specs import stage_specs

    # the project's dvc.yaml is the pixel UNet's pipeline: every stage but a latent family's `latents`
    assert [s for s in PIPELINE if s != "latents"] == list(stage_specs(REPO))


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PREFECT_HOME"] = str(root / ".prefect")
    return env


def _cli(*args, cwd: Path, check=False):
    return subprocess.run([str(BIN / "diffprune"), *args], cwd=cwd, capture_output=True, text=True,
                          env=_env(cwd), timeout=300, check=check)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, prefect_harness):
    """Run the whole flow once through Prefect (test harness server) on a tiny config."""
    from diffprune.flows.pipeline import prune_pipeline

    # evaluate.sampler: every param a stage tracks must be in params.yaml (DVC records them from there)
    root = make_project(tmp_path_factory.mktemp("flow") / "proj", {"evaluate": {"sampler": "ddim"}}, code=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "t@t"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=root, check=True)  # the experiments' baseline
    first = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), push=False)
    second = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), push=False)
    return root, first, second


def test_flow_runs_every_stage_then_skips_them(flow_run):
    from diffprune.flows.pipeline import PIPELINE

    root, first, second = flow_run
    stages = [s for s in PIPELINE if s != "latents"]
    assert first["ran"] == stages
    assert second["ran"] == [] and second["skipped"] == stages
    m = json.loads((root / "models/eval/teacher/metrics.json").read_text())
    assert m["fid"] > 0 and m["trajectory_macs"] > 0 and m["params"] > 0
    assert m["feature_extractor"].startswith("featnet")
    assert m["fid_noise"] >= 10 * m["fid_floor"] and "FID noise" in first["table"]  # the scale beside the FID
    assert "teacher" in first["table"] and "FID" in first["table"]
    pruned = json.loads((root / "models/eval/finetune/metrics.json").read_text())
    assert pruned["params"] < m["params"] and pruned["trajectory_macs"] < m["trajectory_macs"]
    assert 0 < pruned["macs_ratio_vs_teacher"] < 1 and "psnr_vs_teacher" in pruned
    assert (root / "models/eval/teacher/grid.png").stat().st_size > 0
    # the report stage: the Pareto plot of every evaluated model, its table returned for `diffprune run`
    png = root / "models/report/pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(first["report"]["png"]) == png.resolve()
    rows = [l for l in first["report"]["table"].splitlines()[2:] if l.startswith("| ")]
    names = [r.split(" | ")[0][2:].removesuffix(" (degenerate)") for r in rows]  # tiny models: degenerate
    assert sorted(names) == ["dipgo", "experts", "finetune", "stack", "teacher"]
    assert Path(second["report"]["png"]) == png.resolve() and "mlflow_run_id" not in second["report"]  # ran nothing


def test_flow_records_every_stage_in_dvc_lock_and_saves_the_run(flow_run):
    from diffprune import versioning

    root, first, second = flow_run
    assert versioning.status(root) == {}, "a stage the flow ran must be clean for dvc status"
    r = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=root, capture_output=True, text=True,
                       env=_env(root))
    assert r.returncode == 0 and "models/eval/teacher/metrics.json" in r.stdout, r.stderr[-1500:]
    plots = subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=root, capture_output=True, text=True,
                           env=_env(root))
    doc = json.loads(plots.stdout)
    assert not doc.get("errors"), doc.get("errors")
    points = doc["data"]["fid_vs_macs"][0]["content"]["data"]["values"]
    assert sorted(v["model"] for v in points) == ["dipgo", "experts", "finetune", "stack", "teacher"]
    assert {"models/dipgo/heatmap.png", "models/intervals/alignment.png", "models/report/pareto.png"} <= set(doc["data"])
    # metrics are kept by git (and so by the experiment commit), cached outputs by DVC
    assert subprocess.run(["git", "check-ignore", "-q", "models/eval/teacher/metrics.json"], cwd=root).returncode == 1
    assert subprocess.run(["git", "check-ignore", "-q", "models/teacher"], cwd=root).returncode == 0
    assert first["experiment"] and second["experiment"] is None  # a run that ran nothing saves nothing
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                          capture_output=True, text=True).stdout.split()
    refs = [r for r in refs if not r.startswith("refs/exps/exec/")]  # DVC's own bookkeeping refs
    assert len(refs) == 1 and refs[0].endswith(first["experiment"])
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", refs[0]], cwd=root, capture_output=True,
                           text=True).stdout.split()
    assert {"dvc.lock", "params.yaml", "models/eval/teacher/metrics.json", "models/registry/teacher.json"} <= set(files)


def test_flow_registers_the_teacher_in_mlflow(flow_run):
    from mlflow import MlflowClient

    from diffprune import tracking

    root, first, _ = flow_run
    tracking.configure(root=root)
    for name in ("tiny-pruned", "tiny-dipgo", "tiny-experts"):
        assert len(MlflowClient().search_model_versions(f"name='{name}'")) == 1, name
    versions = MlflowClient().search_model_versions("name='tiny-teacher'")
    assert len(versions) == 1, "two runs of the same content must register one version"
    v = versions[0]
    assert v.tags.get("content_hash") and v.tags.get("git_commit")
    reg = json.loads((root / "models/registry/teacher.json").read_text())
    assert int(reg["version"]) == int(v.version)
    # one `pipeline` run for the run that ran stages (the second ran none), holding the Pareto report
    exp = MlflowClient().get_experiment_by_name("tiny")
    runs = MlflowClient().search_runs([exp.experiment_id], "attributes.run_name = 'pipeline'")
    assert len(runs) == 1 and runs[0].info.run_id == first["report"]["mlflow_run_id"]
    assert runs[0].data.tags["git_commit"] == first["commit"]
    logged = {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id, "report")}
    assert logged == {"report/pareto.png", "report/pareto.md", "report/pareto.json"}


def test_flow_gates_each_version_it_registered_and_only_then(flow_run):
    """The first run registered five versions: each has the gate's decision in its tags (and the alias
    on it exactly when promoted); the second run registered nothing and decided nothing."""
    from diffprune import gate, registry, tracking

    root, first, second = flow_run
    tracking.configure(root=root)
    names = sorted(d["name"] for d in first["decisions"])
    assert names == ["tiny-dipgo", "tiny-experts", "tiny-pruned", "tiny-stack", "tiny-teacher"] and second["decisions"] == []
    for d in first["decisions"]:
        assert d["decision"] in gate.OUTCOMES and d["reasons"] and d["champion"] is None, d
        assert registry.get_version(d["name"], d["version"]).tags[gate.TAG_DECISION] == d["decision"]
        holder = registry.alias_holder(d["name"], "champion")
        assert (holder is not None and int(holder.version) == d["version"]) is (d["decision"] == "promoted"), d


def test_a_registered_version_names_the_commit_that_reproduces_it(flow_run):
    """The version's tags name the run's experiment commit and a git tag on it; that commit's dvc.lock
    holds the very DVC hashes the version was registered with."""
    from mlflow import MlflowClient

    from diffprune import tracking

    root, first, _ = flow_run
    tracking.configure(root=root)
    v = MlflowClient().get_model_version("tiny-teacher", "1")
    ref = [r for r in subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
                                     cwd=root, capture_output=True, text=True).stdout.splitlines()
           if r.endswith("/" + first["experiment"])]
    assert ref and v.tags["git_commit"] == ref[0].split()[0] == first["commit"], (ref, v.tags)
    assert v.tags["git_dirty"] == "false" and v.tags["diffprune.experiment"] == first["experiment"]
    assert v.tags["diffprune.git_tag"] == "tiny-teacher/v1" and "tiny-teacher/v1" in first["tags"]
    tagged = subprocess.run(["git", "rev-parse", "tiny-teacher/v1^{commit}"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    assert tagged == first["commit"]
    lock = yaml.safe_load(subprocess.run(["git", "show", "tiny-teacher/v1:dvc.lock"], cwd=root, capture_output=True,
                                         text=True).stdout)
    teacher_md5 = {o["path"]: o["md5"] for o in lock["stages"]["teacher"]["outs"]}["models/teacher"]
    assert v.tags["dvc.models/teacher"] == teacher_md5


@pytest.mark.slow  # ~65 s: a third pipeline run; test_freshness.py covers stage-level freshness in `make test`
def test_changed_param_reruns_only_what_depends_on_it(flow_run, prefect_harness):
    from diffprune.flows.pipeline import prune_pipeline

    root, _, _ = flow_run
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["num_samples"] = 30
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    third = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), push=False)
    assert {"data", "teacher", "taylor", "finetune"} <= set(third["skipped"])
    assert {"evaluate@teacher", "evaluate@finetune", "evaluate@dipgo", "evaluate@experts"} <= set(third["ran"])


@pytest.mark.slow  # ~30 s: the whole pipeline through dvc repro; test_freshness.py and test_workspace.py run dvc repro
def test_dvc_repro_reproduces_the_pipeline(tmp_path):
    root = make_project(tmp_path / "proj", code=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    env = _env(root)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=env)
    # the teacher and what it needs (the flow test above covers every stage through Prefect)
    r = subprocess.run([str(BIN / "dvc"), "repro", "teacher"], cwd=root, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"data", "teacher"} <= set(lock["stages"])
    assert (root / "models/teacher/model.safetensors").exists()
    r = subprocess.run([str(BIN / "dvc"), "status", "teacher"], cwd=root, capture_output=True, text=True,
                       env=env)
    assert "up to date" in r.stdout.lower()


def test_cli_bad_param_is_one_line_and_nonzero(tmp_path):
    root = make_project(tmp_path / "proj", {"teacher": {"lr": "fast"}})
    r = _cli("stage", "teacher", cwd=root)
    assert r.returncode == 2
    assert "teacher.lr = 'fast'" in r.stderr and "Traceback" not in r.stderr
    assert not (root / "models").exists()


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    root = make_project(tmp_path / "proj")
    r = _cli("sample", str(root / "nope"), "-n", "2", "-o", str(root / "g.png"), cwd=root)
    assert r.returncode == 2 and "not a diffprune checkpoint" in r.stderr
    assert not (root / "g.png").exists()


def test_cli_unknown_stage(tmp_path):
    root = make_project(tmp_path / "proj")
    r = _cli("stage", "bogus", cwd=root)
    assert r.returncode == 2 and "unknown stage 'bogus'" in r.stderr
