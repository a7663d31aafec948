"""One freshness record: ``dvc.lock`` decides what the flow skips, and a failed closing step is redone.

Small runs (the ``data`` stage, or ``data`` + ``teacher`` through ``dvc repro``) on the tiny config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffprune import versioning
from diffprune.config import ConfigError
from diffprune.versioning import VersioningError

from .conftest import make_project

BIN = Path(sys.executable).parent


@pytest.fixture
def harness(prefect_harness):
    """The session's Prefect test server (tests/conftest.py)."""


def _flow(root: Path, only: list[str], push: bool = False, params: Path | None = None) -> dict:
    from diffprune.flows.pipeline import prune_pipeline

    return prune_pipeline(params_path=str(params or root / "params.yaml"), root=str(root), only=only, push=push)


# every param a stage tracks must be in params.yaml (DVC records them from there)
COMPLETE = {"evaluate": {"sampler": "ddim"}}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "proj", COMPLETE, code=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_a_stage_dvc_reproduced_is_skipped_by_the_flow(repo: Path, harness) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True, env=env)
    r = subprocess.run([str(BIN / "dvc"), "repro", "data"], cwd=repo, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = _flow(repo, ["data"])
    assert out["ran"] == [] and out["skipped"] == ["data"]


def test_a_stage_the_flow_ran_is_clean_for_dvc(repo: Path, harness) -> None:
    out = _flow(repo, ["data"])
    assert out["ran"] == ["data"]
    assert versioning.status(repo, ["data"]) == {}
    assert "data/dataset" in versioning.stage_hashes(repo, ["data"])
    # dataset.params.json is kept by git (cache: false), the dataset by DVC's cache
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/dataset"], cwd=repo).returncode
    kept = subprocess.run(["git", "check-ignore", "-q", "data/dataset.params.json"], cwd=repo).returncode
    assert ignored == 0 and kept == 1
    # a changed param makes DVC, and so the flow, run it again
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("max_images: 240", "max_images: 200"))
    assert _flow(repo, ["data"])["ran"] == ["data"]


def test_params_other_than_the_roots_are_refused(repo: Path, harness) -> None:
    other = repo / "other.yaml"
    other.write_text((repo / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=r"--params .*other.yaml: a run must use .*params.yaml"):
        _flow(repo, ["data"], params=other)
    assert not (repo / "data" / "dataset").exists() and not (repo / "dvc.lock").exists()


def test_a_failed_commit_is_redone_by_the_next_run(repo: Path, harness, monkeypatch) -> None:
    def broken(root, name):
        raise VersioningError(f"`dvc commit --force --quiet {name}` failed (injected)")

    with monkeypatch.context() as m:
        m.setattr(versioning, "commit_stage", broken)
        with pytest.raises(Exception, match="injected"):
            _flow(repo, ["data"])
    assert versioning.status(repo, ["data"]) != {}
    out = _flow(repo, ["data"])
    assert out["ran"] == ["data"] and versioning.status(repo, ["data"]) == {}


def test_a_failed_push_is_redone_by_the_next_run(repo: Path, tmp_path: Path, harness, monkeypatch) -> None:
    versioning.ensure_repo(repo)
    versioning.configure_remote(repo, tmp_path / "remote")
    real = versioning.run_dvc

    def no_push(root, *args, **kw):
        if args and args[0] == "push":
            raise VersioningError("`dvc push` failed (injected)")
        return real(root, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(versioning, "run_dvc", no_push)
        with pytest.raises(Exception, match="injected"):
            _flow(repo, ["data"], push=True)
    assert versioning.status(repo, ["data"], cloud=True) != {}
    out = _flow(repo, ["data"], push=True)
    assert out["ran"] == [] and out["skipped"] == ["data"] and "data/dataset" in out["pushed"]
    assert versioning.status(repo, ["data"], cloud=True) == {}


def test_a_folder_without_the_code_is_refused_up_front(tmp_path: Path, harness) -> None:
    root = make_project(tmp_path / "bare")
    with pytest.raises(ConfigError, match=r"deps \[.*diffprune/.*\] are missing"):
        _flow(root, ["data"])
    assert not (root / "data").exists()


def test_a_tracked_param_left_to_its_default_is_refused_up_front(tmp_path: Path, harness) -> None:
    root = make_project(tmp_path / "proj", code=True)
    doc = yaml.safe_load((root / "params.yaml").read_text())
    del doc["evaluate"]["sampler"]  # a tracked param left out (to its default)
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"params.yaml lacks evaluate.sampler, which dvc.yaml's stages track"):
        _flow(root, ["dipgo"])
    assert not (root / "data").exists()
