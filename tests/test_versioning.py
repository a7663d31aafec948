"""DVC glue: init, local remote, commit of flow-written outputs, push, hashes, status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffprune import versioning
from diffprune.versioning import VersioningError

DVC_YAML = """\
stages:
  make:
    cmd: {python} -c "import pathlib; p = pathlib.Path('out'); p.mkdir(exist_ok=True); (p / 'a.txt').write_text('v1')"
    outs:
      - out
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    return root


def test_commit_push_hashes_status(repo: Path, tmp_path: Path) -> None:
    versioning.ensure_repo(repo)
    versioning.ensure_repo(repo)  # idempotent
    assert (repo / ".dvc").is_dir()
    assert versioning.default_remote(repo) is None
    remote = tmp_path / "remote"
    assert versioning.configure_remote(repo, remote) == "local"
    assert versioning.default_remote(repo) == "local"
    assert "local" in (repo / ".dvc" / "config.local").read_text()  # machine-local, not committed

    versioning.run_dvc(repo, "repro", "--quiet")
    first = versioning.stage_hashes(repo)
    assert list(first) == ["out"] and first["out"].endswith(".dir")

    # The flow rewrites the output outside `dvc repro`: status sees it, commit records it.
    (repo / "out" / "a.txt").write_text("v2")
    assert versioning.status(repo) != {}
    result = versioning.commit_and_push(repo, ["make"])
    assert result["pushed"] and result["remote"] == "local"
    assert result["hashes"] == versioning.stage_hashes(repo, ["make"])
    assert result["hashes"]["out"] != first["out"]
    assert (repo / "dvc.lock").exists()
    assert any(p.is_file() for p in remote.rglob("*"))  # objects reached the remote
    assert versioning.status(repo) == {}
    assert versioning.status(repo, cloud=True) == {}


def test_subdir_without_remote_commits_only(repo: Path) -> None:
    project = repo / "project"  # a DVC project below the git top folder
    project.mkdir()
    (repo / "dvc.yaml").rename(project / "dvc.yaml")
    versioning.ensure_repo(project)
    assert (project / ".dvc").is_dir() and not (repo / ".dvc").exists()
    versioning.run_dvc(project, "repro", "--quiet")
    result = versioning.commit_and_push(project)
    assert result == {"hashes": versioning.stage_hashes(project), "remote": None, "pushed": False}
    assert list(result["hashes"]) == ["out"]


def test_errors_name_the_command(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(VersioningError, match="not inside a git repository"):
        versioning.ensure_repo(tmp_path)  # tmp_path itself is no git repo
    versioning.ensure_repo(repo)
    with pytest.raises(VersioningError, match=r"`dvc commit --force nosuchstage` failed(.|\n)*nosuchstage' does not exist"):
        versioning.commit_and_push(repo, ["nosuchstage"])
    with pytest.raises(VersioningError, match="dvc.lock: not found"):
        versioning.stage_hashes(repo)


def test_a_recorded_run_and_its_version_tags_are_pushed_to_the_git_remote(tmp_path: Path) -> None:
    """A workspace's run commit (the branch) and its NAME/vVERSION tags reach a bare git remote."""
    ws, remote = tmp_path / "ws", tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    (ws / ".diffprune").mkdir()
    (ws / versioning.WORKSPACE_SOURCES).write_text("{}\n")
    assert versioning.push_run(ws, {"commit": None, "experiment": None, "mode": "commit"}, []) is None  # no remote
    subprocess.run(["git", "remote", "add", "origin", str(remote)], cwd=ws, check=True)
    (ws / "metrics.json").write_text('{"fid": 1.0}\n')
    record = versioning.record_run(ws, [], [], "diffprune run: evaluate")
    assert record["mode"] == "commit" and record["commit"]
    assert versioning.tag_version(ws, "tiny-teacher", 3, record["commit"]) == "tiny-teacher/v3"
    assert versioning.tag_version(ws, "a..b", 1, record["commit"]) is None  # no valid git tag: none made
    assert versioning.push_run(ws, record, ["tiny-teacher/v3"]) == "origin"
    pushed = subprocess.run(["git", "rev-parse", "tiny-teacher/v3^{commit}"], cwd=remote, capture_output=True,
                            text=True).stdout.strip()
    assert pushed == record["commit"]
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True).stdout == ""


def _cli_status(root: Path, *targets: str) -> dict:
    import json

    out = versioning.run_dvc(root, "status", "--json", *targets).stdout
    return json.loads(out[out.find("{"):]) if "{" in out else {}


def test_status_and_commit_through_the_api_answer_as_the_commands_do(repo: Path) -> None:
    """One child per root answers every call (the same pid), as `dvc status --json` / `dvc commit`
    would; a child that died is replaced by a fresh one."""
    import os
    import signal

    from diffprune import dvc_api

    versioning.ensure_repo(repo)
    versioning.run_dvc(repo, "repro", "--quiet")
    (repo / "out" / "a.txt").write_text("v2")
    dirty = versioning.status(repo, ["make"])
    assert dirty == _cli_status(repo, "make") and dirty["make"] and versioning.status(repo) == _cli_status(repo)
    child = dvc_api._CHILDREN[f"{os.getpid()}:{repo.resolve()}"][0]
    versioning.commit_stage(repo, "make")
    assert versioning.status(repo) == {} == _cli_status(repo)  # the command sees what the API recorded
    assert dvc_api._CHILDREN[f"{os.getpid()}:{repo.resolve()}"][0].pid == child.pid  # one process served all three
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (repo / "out" / "a.txt").write_text("v3")
    assert versioning.status(repo, ["make"]) == _cli_status(repo, "make") != {}  # a fresh child
    assert dvc_api._CHILDREN[f"{os.getpid()}:{repo.resolve()}"][0].pid != child.pid


def test_a_child_that_dies_mid_request_is_an_error_with_its_last_words(repo: Path, monkeypatch) -> None:
    from diffprune import dvc_api

    versioning.ensure_repo(repo)
    dies = "import sys; sys.stdin.readline(); print('out of memory, say', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(dvc_api, "COMMAND", [sys.executable, "-c", dies])
    monkeypatch.setattr(dvc_api, "_CHILDREN", {})
    with pytest.raises(VersioningError, match=r"`dvc commit --force make` failed in .*\n.*ended \(exit 3\): out of memory"):
        versioning.commit_stage(repo, "make")
    assert dvc_api._CHILDREN == {}  # the next call starts a fresh child
