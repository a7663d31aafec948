"""Data and model versioning with DVC: the one module of the project that runs ``dvc``.

The Prefect flow produces the outputs that ``dvc.yaml`` declares; this module records them
(``dvc commit -f``: their hashes into ``dvc.lock``; ``dvc push``: to the default remote), records a
finished run in git (:func:`record_run`: a commit in a ``diffprune init`` workspace, a DVC experiment
elsewhere), tags registered versions on it (:func:`tag_version`) and pushes both (:func:`push_run`).
Commands run as subprocesses of the ``dvc`` next to the running interpreter, analytics off, except
``status`` and ``commit``, which go to DVC's API in a child process that stays (:mod:`.dvc_api`); a failing
one raises :class:`VersioningError` naming it and the end of its error output. Typical use:
``ensure_repo(root)``, ``configure_remote(root, root / ".dvc-remote")``, ``commit_and_push(root)``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence, TypedDict

import yaml

LOCK_FILE = "dvc.lock"
WORKSPACE_SOURCES = ".diffprune/sources.json"  # written by `diffprune init` only: marks a workspace


class VersioningError(RuntimeError):
    """A ``dvc`` (or ``git``) command failed, or the repository is not set up for DVC."""


class CommitResult(TypedDict):
    """What :func:`commit_and_push` did: the recorded hashes and where they were pushed."""

    hashes: dict[str, str]    # out path (relative to the repo root) -> md5 ("….dir" for folders)
    remote: str | None        # the default remote pushed to; None when none is configured
    pushed: bool


def _dvc_command() -> list[str]:
    """The ``dvc`` of this environment: next to ``sys.executable``, else ``python -m dvc``."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _env() -> dict[str, str]:
    from .env import DEFAULTS

    return {**DEFAULTS, **os.environ}


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_dvc(root: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``dvc ARGS`` in ``root``; raise :class:`VersioningError` when it fails and ``check``."""
    cmd = [*_dvc_command(), *args]
    proc = subprocess.run(cmd, cwd=Path(root), env=_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise VersioningError(
            f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    return proc


def _api(root: str | Path, op: str, targets: list[str]) -> Any:
    """``dvc status --json`` / ``dvc commit --force`` through DVC's API in a child process that stays
    (:mod:`diffprune.dvc_api`: 20-50x faster than a command each); failures as :func:`run_dvc`'s."""
    from . import dvc_api

    ok, result = dvc_api.call(root, op, targets, _env())
    if not ok:
        command = " ".join(["status", "--json"] if op == "status" else ["commit", "--force"])
        raise VersioningError(f"`dvc {' '.join([command, *targets])}` failed in {root}:\n{result}")
    if op == "status":
        return result or {}
    return result


def _git_toplevel(root: Path) -> Path | None:
    """The top folder of the git work tree holding ``root``; None outside git."""
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 and proc.stdout.strip() else None


def ensure_repo(root: str | Path) -> Path:
    """Make ``root`` (which must be inside a git work tree) a DVC repository; returns ``root``.

    Runs ``dvc init`` only when ``root/.dvc`` is missing (``--subdir`` when ``root`` is below the
    git top folder), and turns analytics off in the local (untracked) config. Idempotent.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise VersioningError(f"{root}: not a directory")
    top = _git_toplevel(root)
    if top is None:
        raise VersioningError(f"{root}: not inside a git repository (run `git init` first)")
    if not (root / ".dvc").is_dir():
        run_dvc(root, "init", "--quiet", *(["--subdir"] if top != root else []))
    run_dvc(root, "config", "--local", "core.analytics", "false")
    return root


def configure_remote(root: str | Path, remote_dir: str | Path, name: str = "local") -> str:
    """Set the local folder ``remote_dir`` as the default remote ``name`` (in ``.dvc/config.local``).

    The setting is machine-local (not committed), so every clone chooses its own storage.
    Returns the remote's name.
    """
    if not name or any(c.isspace() for c in name):
        raise VersioningError(f"remote name = {name!r}: must be a non-empty word")
    remote = Path(remote_dir).resolve()
    remote.mkdir(parents=True, exist_ok=True)
    run_dvc(root, "remote", "add", "--local", "--default", "--force", name, str(remote))
    return name


def configure_relative_remote(root: str | Path, folder: str, name: str = "local") -> str:
    """Make ``root/folder`` the default remote ``name`` in the committed ``.dvc/config``, by a path
    relative to it: a moved workspace keeps its remote; a clone has its own (empty) one until it is
    given the original's (``dvc remote add -d --local NAME PATH``)."""
    (Path(root) / folder).mkdir(parents=True, exist_ok=True)
    run_dvc(root, "remote", "add", "--default", "--force", name, folder)  # DVC stores it relative to .dvc/
    return name


def default_remote(root: str | Path) -> str | None:
    """The name of the default remote, or None when there is none."""
    proc = run_dvc(root, "config", "core.remote", check=False)
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def default_remote_url(root: str | Path) -> tuple[str, str] | None:
    """The default remote's ``(name, url)`` in DVC's merged config (a folder as DVC resolves it); None
    when there is none, or outside a DVC repository."""
    proc = run_dvc(root, "config", "--list", check=False)
    values = dict(line.partition("=")[::2] for line in proc.stdout.splitlines() if "=" in line)  # local wins
    name = values.get("core.remote", "").strip()
    return (name, values.get(f"remote.{name}.url", "").strip()) if proc.returncode == 0 and name else None


def commit_and_push(root: str | Path, stages: Sequence[str] | None = None, *,
                    push: bool = True) -> CommitResult:
    """Record the current outputs of ``stages`` (all when None) in ``dvc.lock`` and push them.

    ``dvc commit -f`` hashes the outputs the flow just wrote (no stage is re-run), then
    ``dvc push`` uploads them to the default remote when one is configured and ``push`` is set.
    """
    targets = list(stages or [])
    _api(root, "commit", targets)
    remote = default_remote(root)
    pushed = False
    if push and remote is not None:
        run_dvc(root, "push", *targets)
        pushed = True
    return {"hashes": stage_hashes(root, targets or None), "remote": remote, "pushed": pushed}


def stage_hashes(root: str | Path, stages: Sequence[str] | None = None) -> dict[str, str]:
    """Out path -> md5 recorded in ``root/dvc.lock`` (for ``stages`` only, when given).

    Folder outputs have DVC's ``"<md5>.dir"`` hashes. Paths are as written in ``dvc.lock``
    (relative to the repository root).
    """
    lock = Path(root) / LOCK_FILE
    if not lock.exists():
        raise VersioningError(f"{lock}: not found (run `dvc repro` or commit_and_push first)")
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as e:
        raise VersioningError(f"{lock}: not valid YAML: {e}") from e
    recorded: dict[str, Any] = doc.get("stages") or {}
    if stages is not None:
        unknown = [s for s in stages if s not in recorded]
        if unknown:
            raise VersioningError(f"stages {unknown}: not in {lock} (recorded: {sorted(recorded)})")
    hashes: dict[str, str] = {}
    for name, stage in recorded.items():
        if stages is not None and name not in stages:
            continue
        for out in stage.get("outs") or []:
            digest = out.get("md5") or out.get("etag") or out.get("checksum")
            if digest:
                hashes[str(out["path"])] = str(digest)
    return hashes


def status(root: str | Path, targets: Sequence[str] = (), *, cloud: bool = False) -> dict[str, Any]:
    """``dvc status --json [TARGETS]`` as a dict: empty when everything (or each target) is up to date.

    With ``cloud``, compares the cache with the default remote instead (``dvc status -c``).
    """
    if not cloud:
        return _api(root, "status", list(targets))
    args = ["status", "--json", "--cloud", *targets]
    out = run_dvc(root, *args).stdout.strip()
    start = out.find("{")
    try:
        return json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError as e:
        raise VersioningError(f"`dvc {' '.join(args)}` printed unparseable JSON: {_tail(out, 5)}") from e


def describe(entries: Any) -> str:
    """One line from a stage's ``dvc status --json`` entries: ``deps models/teacher modified; ...``."""
    parts: list[str] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, dict):
            parts.append(str(entry))
            continue
        for kind, changes in entry.items():
            what = kind.replace("changed ", "")
            items = changes.items() if isinstance(changes, dict) else [(changes, "")]
            parts += [f"{what} {path} {_change(change)}".strip() for path, change in items]
    return "; ".join(parts) or "not recorded in dvc.lock"


def _change(change: Any) -> str:
    if isinstance(change, dict):  # params: {"modified": "evaluate.steps"} or {"evaluate.steps": "modified"}
        return ", ".join(f"{k} {v}" for k, v in change.items())
    return str(change)


def commit_stage(root: str | Path, name: str) -> None:
    """Record stage ``name``'s current deps, params and outs in ``dvc.lock`` (``dvc commit -f NAME``)."""
    _api(root, "commit", [name])


def push_missing(root: str | Path, stages: Sequence[str] = ()) -> list[str]:
    """Push what the default remote lacks of ``stages``' outputs (all when empty); returns the paths
    it lacked (``[]`` when the remote has everything, or there is no default remote)."""
    if default_remote(root) is None:
        return []
    missing = sorted(status(root, stages, cloud=True))
    if missing:
        run_dvc(root, "push", *stages)
    return missing


def save_experiment(root: str | Path, include: Sequence[str] = (), stages: Sequence[str] = ()) -> str | None:
    """``dvc exp save [STAGES]``: commit code, params, ``dvc.lock`` and the untracked files ``include``
    (the metrics, which git does not ignore) as a DVC experiment; returns its name. None outside git or
    before the repository's first commit (an experiment needs a baseline commit). ``stages`` limits
    DVC's caching to them (all when empty, which fails while another stage's outputs are absent)."""
    root = Path(root).resolve()
    if _git_toplevel(root) is None or git(root, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode:
        return None
    present = [p for p in include if (root / p).exists()]
    args = [a for p in present for a in ("--include-untracked", p)]
    out = run_dvc(root, "exp", "save", "--force", *args, *stages).stdout
    words = [w.strip("'\".") for w in out.split() if w.strip("'\".")]
    return words[-1] if words else None


# ----------------------------------------------------------------------------- a run as a commit

class RunRecord(TypedDict):
    """Where a pipeline run was recorded (:func:`record_run`)."""

    commit: str | None       # the git commit holding the run's code, params, dvc.lock and metrics
    experiment: str | None   # the DVC experiment's name (source checkouts), None for a workspace commit
    mode: str                # "commit" (a workspace's branch), "experiment" (dvc exp save) or "none"


@functools.lru_cache(maxsize=64)
def _identity(root: str) -> tuple[str, ...]:
    """``git -c`` options for diffprune's identity when git knows no user in ``root``; else none."""
    known = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).returncode == 0
    return () if known else ("-c", "user.name=diffprune", "-c", "user.email=diffprune@localhost")


def git(root: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` in ``root`` as the user (diffprune's identity when git knows none)."""
    proc = subprocess.run(["git", *_identity(str(Path(root).resolve())), *args], cwd=Path(root), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise VersioningError(f"`git {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n"
                              f"{_tail(proc.stderr or proc.stdout)}")
    return proc


def is_workspace(root: str | Path) -> bool:
    """A workspace made by ``diffprune init`` (its git repository is diffprune's to commit to)."""
    top = _git_toplevel(Path(root).resolve())
    return top == Path(root).resolve() and (Path(root) / WORKSPACE_SOURCES).is_file()


def commit_workspace(root: str | Path, message: str) -> str:
    """Commit everything git does not ignore in the workspace ``root`` (params, dvc.lock, metrics, code
    hashes: the run's whole record) on its current branch; returns HEAD (unchanged when nothing changed)."""
    git(root, "add", "-A", "--", ".")
    if git(root, "diff", "--cached", "--quiet", check=False).returncode:
        git(root, "commit", "-q", "--no-verify", "-m", message)
    return git(root, "rev-parse", "HEAD").stdout.strip()


def experiment_commit(root: str | Path, name: str) -> str | None:
    """The commit of the DVC experiment ``name`` (its ``refs/exps/...`` ref), None when not found."""
    refs = git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout.split("\n")
    hits = [line.split()[0] for line in refs if line.strip() and line.split()[1].endswith("/" + name)]
    return hits[0] if hits else None


def record_run(root: str | Path, include: Sequence[str], stages: Sequence[str], message: str) -> RunRecord:
    """Record a finished run as a git commit: in a workspace a commit on its branch (``git status``
    is clean afterwards), elsewhere a DVC experiment (``dvc exp save``, leaving the branch alone)."""
    root = Path(root).resolve()
    if _git_toplevel(root) is None:
        return {"commit": None, "experiment": None, "mode": "none"}
    if is_workspace(root):
        return {"commit": commit_workspace(root, message), "experiment": None, "mode": "commit"}
    name = save_experiment(root, [LOCK_FILE, *include], stages)  # dvc.lock too while git does not track it
    return {"commit": experiment_commit(root, name) if name else None, "experiment": name,
            "mode": "experiment" if name else "none"}


def tag_version(root: str | Path, name: str, version: int | str, commit: str) -> str | None:
    """The git tag ``NAME/vVERSION`` on ``commit`` (``git checkout TAG`` + ``dvc pull`` restores the
    inputs of that registered version); an existing tag is kept (the version's first run). None when
    the name makes no valid git tag."""
    tag = f"{name}/v{int(version)}"
    if git(root, "check-ref-format", f"refs/tags/{tag}", check=False).returncode:
        return None
    if git(root, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).returncode:
        git(root, "tag", tag, commit)
    return tag


def git_remote(root: str | Path) -> str | None:
    """The git remote a run is pushed to: ``origin``, else the only one; None when there is none."""
    names = git(root, "remote", check=False).stdout.split() if _git_toplevel(Path(root)) else []
    return "origin" if "origin" in names else (names[0] if len(names) == 1 else None)


def push_run(root: str | Path, record: RunRecord, tags: Sequence[str]) -> str | None:
    """Push a recorded run to the git remote (``dvc exp push`` for an experiment, the branch and the
    tags for a workspace commit); returns the remote, None when there is none."""
    remote = git_remote(root)
    if remote is None or record["mode"] == "none":
        return None
    if record["mode"] == "experiment":
        run_dvc(root, "exp", "push", remote, str(record["experiment"]))
    else:
        git(root, "push", "-q", remote, "HEAD")
    if tags:
        git(root, "push", "-q", remote, *[f"refs/tags/{t}" for t in tags])
    return remote


def written_by_run(path: str, managed: Sequence[str] = ()) -> bool:
    """Whether ``path`` (relative to the repository) is a file a run writes itself: ``dvc.lock``, the
    ``.gitignore`` files DVC maintains, or one of (or a file under one of) the ``managed`` outputs."""
    return (path == LOCK_FILE or Path(path).name == ".gitignore"
            or any(path == m or path.startswith(m.rstrip("/") + "/") for m in managed))


def changed_paths(root: str | Path, untracked: bool = False) -> list[str]:
    """Paths ``git status`` reports under ``root`` (tracked changes; with ``untracked``, new files too)."""
    proc = git(root, "status", "--porcelain", f"--untracked-files={'all' if untracked else 'no'}", "--", ".",
               check=False)
    return [line[3:].strip().strip('"') for line in proc.stdout.splitlines() if line.strip()] if not proc.returncode else []


def dirty_paths(root: str | Path, managed: Sequence[str] = ()) -> list[str]:
    """Tracked files changed against HEAD other than what a run writes itself (:func:`written_by_run`):
    what makes a run's inputs uncommitted."""
    return [p for p in changed_paths(root) if not written_by_run(p, managed)]


def ensure_dvc(root: str | Path) -> Path:
    """:func:`ensure_repo` inside a git work tree; elsewhere a DVC repository without git (``--no-scm``)."""
    root = Path(root).resolve()
    if _git_toplevel(root) is not None:
        return ensure_repo(root)
    if not (root / ".dvc").is_dir():
        run_dvc(root, "init", "--quiet", "--no-scm")
        run_dvc(root, "config", "--local", "core.analytics", "false")
    return root
