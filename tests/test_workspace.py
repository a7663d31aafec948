"""``diffprune init DIR --data PATH``: a self-contained workspace for your own image folder (issue 19).

One workspace (outside the source tree) on a generated RGB image folder is shared by the module: it
is created through the CLI, given the tiny settings, run by ``diffprune run`` (stages data, features,
teacher, evaluate@teacher), then checked with DVC: clean after the run, stale after a code change,
and ``dvc repro`` works in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffprune import versioning
from diffprune.cli import app
from diffprune.workspace import CODE_DIR, SOURCES, package_dir, refresh_code_hashes, supported_size

from .conftest import REPO, TINY_PARAMS
from .rgb_folder import make_rgb_folder

BIN = Path(sys.executable).parent
ONLY = ["data", "features", "teacher", "evaluate@teacher", "register@teacher"]
TINY_SECTIONS = ("teacher", "evaluate", "taylor", "finetune", "dipgo", "intervals", "experts", "router",
                 "prune_experts")


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp / "prefect")}


def _cli(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "diffprune"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rgb_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=80)  # 240 16x16 RGB PNGs


@pytest.fixture(scope="module")
def initialized(tmp_path_factory: pytest.TempPathFactory, images: Path) -> dict:
    """``diffprune init ws --data shapes`` (the CLI, run from the workspace's parent)."""
    tmp = tmp_path_factory.mktemp("ws")
    assert REPO not in tmp.parents
    r = _cli(["init", "ws", "--data", str(images)], tmp, _env(tmp))
    assert r.returncode == 0, r.stdout + r.stderr
    ws = tmp / "ws"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout
    return {"ws": ws, "tmp": tmp, "out": r.stdout, "git_status": status}


@pytest.fixture(scope="module")
def ran(initialized: dict, prefect_api: dict) -> dict:
    """The workspace on the tiny settings (its RGB data section kept), run by ``diffprune run --only``."""
    ws, tmp = initialized["ws"], initialized["tmp"]
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section in TINY_SECTIONS:
        params[section] = dict(TINY_PARAMS[section])
    params["data"].update(max_images=240, ref_fraction=0.25)
    params["evaluate"]["feature_epochs"] = 20  # 2 (digits) leaves the RGB feature net short of the FID calibration
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = _cli(["run", "--root", "ws", "--only", ",".join(ONLY)], tmp, {**_env(tmp), **prefect_api},
             timeout=600)  # pushes to ws/.dvc-remote
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {**initialized, "run": r.stdout}


def test_init_writes_a_self_contained_workspace(initialized: dict, images: Path) -> None:
    ws = initialized["ws"]
    assert "image_size 16" in initialized["out"]
    for f in ("params.yaml", "dvc.yaml", ".gitignore", ".dvc/config", SOURCES, f"{CODE_DIR}/teacher.json"):
        assert (ws / f).is_file(), f
    assert not [p for p in ws.parent.iterdir() if p.name.startswith(".ws.init-")]  # the temp folder renamed
    assert initialized["git_status"] == ""  # everything committed by init
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["data"]["source"] == str(images.resolve())
    assert (params["data"]["channels"], params["data"]["image_size"]) == (3, 16)
    assert "# side of the square images" in (ws / "params.yaml").read_text()  # the project's comments kept
    assert {".work/", "mlruns.db", "mlartifacts/", ".dvc-remote/"} <= set((ws / ".gitignore").read_text().split())
    # every stage: no package source path, its code file instead; the `code` stage first
    doc = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert next(iter(doc)) == "code" and doc["code"]["always_changed"] is True
    project = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(doc) == {"code", *project}
    for name in project:
        deps = (doc[name].get("do") or doc[name])["deps"]
        assert f"{CODE_DIR}/{name}.json" in deps and not [d for d in deps if d.startswith("diffprune")], name
    sources = json.loads((ws / SOURCES).read_text())
    assert "diffprune/stages/taylor.py" in sources["finetune"] and "diffprune/tracking.py" in sources["register"]
    recorded = json.loads((ws / CODE_DIR / "teacher.json").read_text())
    assert recorded["files"]["diffprune/models/unet.py"] != "missing" and len(recorded["sha256"]) == 64


def _write_image(p: Path, payload: bytes | None = None) -> None:
    from PIL import Image

    p.parent.mkdir(parents=True, exist_ok=True)
    if payload is None:
        Image.new("RGB", (8, 8)).save(p)
    else:
        p.write_bytes(payload)


def _bad_case(case: str, tmp: Path) -> tuple[list[str], str]:
    """CLI args for a bad-input ``case`` and a fragment of the expected error line."""
    good = tmp / "good"
    for i in range(2):
        _write_image(good / f"{i}.png")
    if case == "dest not empty":
        (tmp / "ws").mkdir()
        (tmp / "ws" / "notes.txt").write_text("mine")
        return ["init", str(tmp / "ws"), "--data", str(good)], "not empty"
    if case == "dest a file":
        (tmp / "ws").write_text("a file")
        return ["init", str(tmp / "ws"), "--data", str(good)], "not a folder"
    if case == "dest inside data":
        return ["init", str(good / "ws"), "--data", str(good)], "inside --data"
    if case == "data missing":
        return ["init", str(tmp / "ws"), "--data", str(tmp / "nowhere")], "no such folder"
    if case == "data a file":
        return ["init", str(tmp / "ws"), "--data", str(good / "0.png")], "not a folder"
    if case == "no images":
        (tmp / "txt").mkdir()
        (tmp / "txt" / "a.txt").write_text("hello")
        return ["init", str(tmp / "ws"), "--data", str(tmp / "txt")], "0 image(s) found"
    if case == "one image":
        _write_image(tmp / "one" / "a.png")
        return ["init", str(tmp / "ws"), "--data", str(tmp / "one")], "1 image(s) found"
    assert case == "corrupt image"
    _write_image(tmp / "bad" / "a.png", b"not a png")
    _write_image(tmp / "bad" / "b.png")
    return ["init", str(tmp / "ws"), "--data", str(tmp / "bad")], "cannot read image"


@pytest.mark.parametrize("case", ["dest not empty", "dest a file", "dest inside data", "data missing", "data a file", "no images",
                                  "one image", "corrupt image"])
def test_init_refuses_bad_input(tmp_path: Path, case: str) -> None:
    args, expected = _bad_case(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_supported_sizes() -> None:
    assert [supported_size(s, 3) for s in (3, 8, 16, 28, 30, 33, 5000)] == [4, 8, 16, 28, 28, 32, 1024]
    assert supported_size(30, 4) == 24


def test_diffprune_run_in_the_workspace_is_clean_for_dvc(ran: dict) -> None:
    ws = ran["ws"]
    assert f"ran: {', '.join(ONLY)}" in ran["run"]
    assert json.loads((ws / "models/eval/teacher/metrics.json").read_text())
    assert versioning.status(ws, ONLY) == {}
    assert set(versioning.stage_hashes(ws, ONLY)) >= {"data/dataset", "models/teacher", "models/features"}


def test_a_code_change_makes_its_stages_stale(ran: dict, tmp_path: Path) -> None:
    ws = ran["ws"]
    f = ws / CODE_DIR / "features.json"
    recorded = json.loads(f.read_text())
    f.write_text(json.dumps({**recorded, "sha256": "0" * 64}, indent=1) + "\n")  # as a package change would
    stale = versioning.status(ws, ONLY)
    assert set(stale) == {"features"}
    assert f"{CODE_DIR}/features.json" in versioning.describe(stale["features"])
    assert refresh_code_hashes(ws) == ["features"] and versioning.status(ws, ONLY) == {}  # the flow's refresh
    # a change in the installed package's files changes the hashes of the stages that run them
    changed = tmp_path / "diffprune"
    shutil.copytree(package_dir(), changed, ignore=shutil.ignore_patterns("__pycache__"))
    with (changed / "models" / "unet.py").open("a") as out:
        out.write("\n# changed\n")
    assert set(refresh_code_hashes(ws, changed)) >= {"data", "features", "teacher", "evaluate"}
    assert set(versioning.status(ws, ONLY)) == set(ONLY)
    refresh_code_hashes(ws)
    assert versioning.status(ws, ONLY) == {}


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_a_run_is_a_commit_of_the_workspace_and_its_versions_are_tagged(ran: dict) -> None:
    ws = ran["ws"]
    assert _git("status", "--porcelain", cwd=ws) == "", "a run leaves the workspace committed"
    assert _git("log", "-1", "--format=%s", cwd=ws).startswith("diffprune run: data, features")
    reg = json.loads((ws / "models/registry/teacher.json").read_text())
    tag = f"{reg['name']}/v{reg['version']}"
    assert _git("rev-parse", f"{tag}^{{commit}}", cwd=ws) == _git("rev-parse", "HEAD", cwd=ws)
    assert {"dvc.lock", "models/eval/teacher/metrics.json", "models/registry/teacher.json"} <= set(
        _git("ls-tree", "-r", "--name-only", "HEAD", cwd=ws).split())


def test_a_clone_after_dvc_pull_is_up_to_date_and_a_missing_registry_is_noticed(
        ran: dict, tmp_path: Path, prefect_harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """git clone + dvc pull: clean for DVC, every stage skipped by the flow against the original's
    registry; against a registry without the recorded version (the clone's own, as after a deleted
    mlruns.db) only register@teacher runs."""
    from diffprune.flows.pipeline import prune_pipeline
    from diffprune.tracking import TRACKING_ENV

    ws, clone = ran["ws"], tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    dvc = [str(BIN / "dvc")]
    env = _env(tmp_path)
    subprocess.run([*dvc, "remote", "add", "-d", "--local", "-f", "local", str(ws / ".dvc-remote")], cwd=clone,
                   check=True, env=env)
    pulled = subprocess.run([*dvc, "pull", *ONLY], cwd=clone, capture_output=True, text=True, env=env, timeout=300)
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]
    assert versioning.status(clone, ONLY) == {}
    assert versioning.status(clone, ["code"]) == {"code": ["always changed"]}  # recorded; DVC lists it still
    monkeypatch.setenv(TRACKING_ENV, f"sqlite:///{ws / 'mlruns.db'}")
    out = prune_pipeline(params_path=str(clone / "params.yaml"), root=str(clone), only=ONLY, push=False)
    assert out["ran"] == [] and out["skipped"] == ONLY
    monkeypatch.delenv(TRACKING_ENV)
    out = prune_pipeline(params_path=str(clone / "params.yaml"), root=str(clone), only=ONLY, push=False)
    assert out["ran"] == ["register@teacher"]
    assert _git("status", "--porcelain", cwd=clone) == ""


def test_a_run_stopped_before_its_commit_is_recorded_by_the_next(ran: dict, prefect_harness) -> None:
    """Stages recorded in dvc.lock, then the run stopped before its commit and tags: the next run,
    with every stage fresh, commits what was left and tags the version; the one after does nothing."""
    from mlflow import MlflowClient

    from diffprune import tracking
    from diffprune.flows.pipeline import prune_pipeline

    ws = ran["ws"]
    reg = json.loads((ws / "models/registry/teacher.json").read_text())
    tag, tree = f"{reg['name']}/v{reg['version']}", _git("rev-parse", "HEAD^{tree}", cwd=ws)
    _git("tag", "-d", tag, cwd=ws)
    _git("reset", "-q", "--soft", "HEAD~1", cwd=ws)  # the run's commit undone, its files left as written
    tracking.configure(root=ws)
    MlflowClient().delete_model_version_tag(reg["name"], str(reg["version"]), "diffprune.git_tag")
    out = prune_pipeline(params_path=str(ws / "params.yaml"), root=str(ws), only=ONLY, push=False)
    assert out["ran"] == [] and out["tags"] == [tag]
    assert _git("status", "--porcelain", cwd=ws) == "" and _git("rev-parse", "HEAD^{tree}", cwd=ws) == tree
    assert _git("rev-parse", f"{tag}^{{commit}}", cwd=ws) == _git("rev-parse", "HEAD", cwd=ws)
    tracking.configure(root=ws)
    assert MlflowClient().get_model_version(reg["name"], str(reg["version"])).tags["diffprune.git_tag"] == tag
    again = prune_pipeline(params_path=str(ws / "params.yaml"), root=str(ws), only=ONLY, push=False)
    assert again["ran"] == [] and again["commit"] is None and again["tags"] == []


def test_dvc_repro_in_the_workspace(ran: dict) -> None:
    ws = ran["ws"]
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(text.replace("feature_epochs: 20", "feature_epochs: 16"))
    r = subprocess.run([str(BIN / "dvc"), "repro", "features"], cwd=ws, env=_env(ran["tmp"]), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Running stage 'code'" in r.stdout and "Running stage 'features'" in r.stdout
    assert "Running stage 'data'" not in r.stdout  # its code hash unchanged: still up to date
    assert versioning.status(ws, ["data", "features", "teacher"]) == {}
    assert set(versioning.status(ws, ONLY)) == {"evaluate@teacher"}  # it depends on the new features
