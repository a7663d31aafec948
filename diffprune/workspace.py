"""Workspaces for your own data: ``diffprune init DIR --data PATH`` (issue 19).

A workspace is a self-contained git + DVC repository holding a ``params.yaml`` (the project's, with
the ``data:`` section filled for the image folder) and a ``dvc.yaml`` (the project's stages) — but not
the package's source. The project's ``dvc.yaml`` lists a stage's code as source paths
(``diffprune/models``, ...); in a workspace each stage instead depends on one generated file,
``.diffprune/code/STAGE.json``, holding the SHA-256 of the *installed* package files behind those same
paths (``.diffprune/sources.json`` keeps the mapping). A change in the installed package changes the
file, so DVC (and the flow, which asks DVC) sees the stage as stale.

The files are refreshed before freshness is judged, by both tools:

* ``dvc repro``: the workspace's first stage ``code`` (``diffprune code-hash``, ``always_changed``)
  rewrites them, and every other stage depends on its file; an unchanged hash leaves them clean.
* ``diffprune run``: the flow calls :func:`refresh_code_hashes` before it asks ``dvc status``; ``code``
  is not one of its stages (it runs the refresh itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, load_params
from .versioning import WORKSPACE_SOURCES

CODE_DIR = ".diffprune/code"          # STAGE.json: hashes of the installed code each stage runs
SOURCES = WORKSPACE_SOURCES          # STAGE -> the package source paths of the project's dvc.yaml
PACKAGE = "diffprune"
REMOTE = ".dvc-remote"                # the workspace's default DVC remote (a folder inside it, git-ignored)
GITIGNORE = "# diffprune workspace: run state, the MLflow store, a local DVC remote, dvc plots show's output\n" \
            ".work/\nmlruns.db\nmlartifacts/\n.dvc-remote/\ndvc_plots/\n"
CODE_STAGE = {
    "cmd": "diffprune code-hash",
    "always_changed": True,  # rerun by every `dvc repro`; an unchanged hash leaves the stages after it clean
    "deps": [SOURCES],
    "outs": [{CODE_DIR: {"cache": False}}],
}
DVC_HEADER = """\
# The diffprune pipeline of this workspace (made by `diffprune init`): the project's stages, each
# running the same library function as the Prefect task of the same name (`diffprune stage NAME`).
# The code a stage runs is the INSTALLED diffprune package: instead of its source paths, a stage
# depends on .diffprune/code/STAGE.json, the SHA-256 of those package files (paths in
# .diffprune/sources.json), rewritten by the first stage `code` on every `dvc repro` and by
# `diffprune run` before it asks DVC what changed. `dvc.lock` is the one record of what is up to date.
"""


class WorkspaceError(ConfigError):
    """Bad input to ``diffprune init`` (the destination, the data folder) or a broken installation."""


def package_dir() -> Path:
    """The folder of the installed ``diffprune`` package (what the stages run)."""
    import diffprune

    return Path(diffprune.__file__).resolve().parent


def template_dir() -> Path:
    """The project checkout holding the installed package, with its ``dvc.yaml`` and ``params.yaml``."""
    top = package_dir().parent
    for name in ("dvc.yaml", "params.yaml"):
        if not (top / name).is_file():
            raise WorkspaceError(f"{top / name}: not found; diffprune init needs the project's {name} next to "
                                 f"the installed package (install diffprune from a source checkout)")
    return top


# --- the data folder -------------------------------------------------------------------------------

def scan_images(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted as the ``data`` stage reads them)."""
    from .data import IMAGE_EXTS

    path = Path(folder)
    if not path.exists():
        raise WorkspaceError(f"--data {folder}: no such folder")
    if not path.is_dir():
        raise WorkspaceError(f"--data {folder}: not a folder (expected a folder of images)")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if len(files) < 2:
        raise WorkspaceError(f"--data {folder}: {len(files)} image(s) found, needs at least 2 "
                             f"({', '.join(sorted(IMAGE_EXTS))}, in the folder or its sub-folders)")
    return files


def _first_image(files: list[Path]) -> tuple[int, int]:
    """``(channels, side)`` of the first image: 1 for grey modes, else 3; its shorter side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(files[0]) as im:
            mode, (w, h) = im.mode, im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise WorkspaceError(f"--data: cannot read image {files[0]} ({type(e).__name__}: {e})") from e
    return (1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3), min(w, h)


def supported_size(side: int, levels: int) -> int:
    """``side`` rounded down to a multiple of ``2 ** (levels - 1)`` (each U-Net level halves the image),
    within the allowed 4..1024."""
    step = max(4, 2 ** max(levels - 1, 0))
    return max(step, min(1024, side) // step * step)


BUILTIN = "digits"  # the bundled dataset (scikit-learn's 8x8 digits): ``diffprune init DIR --data digits``


def data_section(folder: str | Path, levels: int) -> dict[str, Any]:
    """The ``data:`` values for ``folder``: its absolute path, channels and a supported image size
    (for :data:`BUILTIN`, the project's own digits values)."""
    if str(folder) == BUILTIN and not Path(folder).exists():
        return {"source": BUILTIN}
    files = scan_images(folder)
    channels, side = _first_image(files)
    return {"source": str(Path(folder).resolve()), "channels": channels, "image_size": supported_size(side, levels)}


# --- params.yaml and dvc.yaml ----------------------------------------------------------------------

def _set_value(line: str, value: str) -> str:
    """``  key: old   # comment`` -> ``  key: VALUE   # comment`` (the comment kept, aligned if it fits)."""
    m = re.match(r"^(\s+[\w-]+:)(\s*)([^#]*?)(\s*)(#.*)?$", line)
    if not m:
        return line
    head = f"{m.group(1)} {value}"
    if not m.group(5):
        return head
    column = len(m.group(1)) + len(m.group(2)) + len(m.group(3)) + len(m.group(4))
    return head + " " * max(1, column - len(head)) + m.group(5)


def workspace_params(text: str, data: dict[str, Any]) -> str:
    """The project's params.yaml ``text`` with the ``data:`` section's keys in ``data`` set (comments kept)."""
    out, section = [], None
    for line in text.splitlines():
        top = re.match(r"^([\w-]+):", line)
        if top:
            section = top.group(1)
        key = re.match(r"^\s+([\w-]+):", line)
        if section == "data" and key and key.group(1) in data:
            line = _set_value(line, json.dumps(data[key.group(1)]))
        out.append(line)
    return "\n".join(out) + "\n"


def _split_deps(deps: list[Any], code_file: str) -> tuple[list[Any], list[str]]:
    """``deps`` with the package source paths replaced by ``code_file`` (where the first one was)."""
    kept: list[Any] = []
    sources = [d for d in deps if isinstance(d, str) and (d == PACKAGE or d.startswith(PACKAGE + "/"))]
    for d in deps:
        if d in sources:
            if code_file not in kept:
                kept.append(code_file)
        else:
            kept.append(d)
    return kept, sources


def workspace_stages(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The project's parsed ``dvc.yaml`` -> the workspace's (a ``code`` stage first, each stage's source
    deps replaced by its code file) and the sources of each stage (``foreach`` stages: one entry)."""
    stages: dict[str, Any] = {"code": CODE_STAGE}
    sources: dict[str, list[str]] = {}
    for name, st in doc["stages"].items():
        st = json.loads(json.dumps(st))  # a copy
        body = st["do"] if "foreach" in st else st
        body["deps"], found = _split_deps(body.get("deps") or [], f"{CODE_DIR}/{name}.json")
        if found:
            sources[name] = found
        stages[name] = st
    return {"stages": stages, **({"plots": doc["plots"]} if doc.get("plots") else {})}, sources


# --- code hashes -----------------------------------------------------------------------------------

def _source_files(package: Path, source: str) -> list[Path]:
    """The files behind the dvc.yaml source path ``source`` (``diffprune/...``) in ``package``."""
    path = package.joinpath(*source.split("/")[1:])
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and p.suffix not in (".pyc", ".pyo"))
    return []


def code_hash(sources: list[str], package: Path | None = None) -> dict[str, Any]:
    """``{"sources", "sha256", "files"}``: the SHA-256 of every package file behind ``sources`` (paths
    relative to the package's parent, so the install location does not count); ``"missing"`` for a
    source path the installed package lacks."""
    package = package or package_dir()
    files: dict[str, str] = {}
    for source in sources:
        found = _source_files(package, source)
        if not found:
            files[source] = "missing"
        for f in found:
            rel = f"{PACKAGE}/{f.relative_to(package).as_posix()}"
            files[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    blob = "".join(f"{k}\0{v}\n" for k, v in sorted(files.items()))
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return {"sources": sources, "sha256": digest, "files": dict(sorted(files.items()))}


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def record_code_stage(root: str | Path) -> bool:
    """Record the workspace's ``code`` stage in ``dvc.lock`` when its files differ from the record (the
    flow refreshes the hashes itself and never runs it), so a clone's ``dvc status`` lists it only as
    DVC lists every ``always_changed`` stage; returns whether it was recorded."""
    from . import versioning

    if not (Path(root) / SOURCES).is_file():
        return False
    entries = versioning.status(root, ["code"]).get("code") or []
    if not any(isinstance(e, dict) for e in entries):  # nothing but "always changed"
        return False
    versioning.commit_stage(root, "code")
    return True


def refresh_code_hashes(root: str | Path, package: Path | None = None) -> list[str]:
    """Rewrite ``root/.diffprune/code/STAGE.json`` for the installed package (``package``: another
    package folder); returns the stages whose file changed. Nothing to do outside a workspace."""
    root = Path(root)
    mapping = root / SOURCES
    if not mapping.is_file():
        return []
    try:
        sources: dict[str, list[str]] = json.loads(mapping.read_text())
    except json.JSONDecodeError as e:
        raise WorkspaceError(f"{mapping}: not valid JSON ({e}); recreate the workspace with diffprune init") from e
    changed = []
    for name, paths in sorted(sources.items()):
        text = json.dumps(code_hash(paths, package), indent=1) + "\n"
        if _write_if_changed(root / CODE_DIR / f"{name}.json", text):
            changed.append(name)
    return changed


# --- diffprune init --------------------------------------------------------------------------------

def _check_dest(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise WorkspaceError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise WorkspaceError(f"{dest}: not empty; diffprune init needs a new or empty folder")
    if not dest.parent.is_dir():
        raise WorkspaceError(f"{dest.parent}: no such folder (the workspace's parent must exist)")


def _valid_params(text: str, data: dict[str, Any], levels: int, where: Path) -> str:
    """The workspace params text, its image size halved while the config refuses it (evaluation memory)."""
    step = max(4, 2 ** max(levels - 1, 0))
    while True:
        out = workspace_params(text, data)
        (where / "params.yaml").write_text(out)
        try:
            load_params(where / "params.yaml")
            return out
        except ConfigError as e:
            if data["image_size"] <= step or "image_size" not in str(e):
                raise WorkspaceError(f"params.yaml for --data {data['source']}: {e}") from e
            data["image_size"] = max(step, data["image_size"] // 2 // step * step)


def _write_files(tmp: Path, data_path: Path, preset: str | None = None) -> dict[str, Any]:
    """params.yaml, dvc.yaml, .gitignore, the code hashes (and the schema) into ``tmp``; the data values."""
    from .families import family_dvc, preset_params

    top = template_dir()
    params_text = (top / "params.yaml").read_text()
    if preset:
        params_text = preset_params(top, params_text, preset)
    levels = len((yaml.safe_load(params_text).get("teacher") or {}).get("block_out_channels") or [1, 1, 1])
    data = data_section(data_path, levels)
    if (top / "params.schema.json").is_file():
        shutil.copy(top / "params.schema.json", tmp / "params.schema.json")
    else:
        params_text = "\n".join(l for l in params_text.splitlines() if "$schema=" not in l)
    if data == {"source": BUILTIN}:  # the bundled digits: the project's params as they are
        (tmp / "params.yaml").write_text(params_text)
        loaded = load_params(tmp / "params.yaml").data
        data.update(source=loaded.source, channels=loaded.channels, image_size=loaded.image_size)
    else:
        _valid_params(params_text, data, levels, tmp)
    family = load_params(tmp / "params.yaml").teacher.family
    stages, sources = workspace_stages(family_dvc(yaml.safe_load((top / "dvc.yaml").read_text()), family))
    (tmp / "dvc.yaml").write_text(DVC_HEADER + yaml.safe_dump(stages, sort_keys=False, width=110))
    (tmp / ".gitignore").write_text(GITIGNORE)
    copy_benchmarks(top, tmp)
    (tmp / SOURCES).parent.mkdir(parents=True, exist_ok=True)
    (tmp / SOURCES).write_text(json.dumps(sources, indent=1) + "\n")
    refresh_code_hashes(tmp)
    return data


BENCH_README = """\
The benchmark results the `report` stage draws beside this workspace's models (their own marker and
Pareto front: their FIDs are on the benchmark teacher's scale), copied by `diffprune init` from the
project's benchmarks/results/. Replace them with newer ones (`make bench` in a checkout) to update it.
"""


def copy_benchmarks(top: Path, dest: Path) -> list[str]:
    """Copy the project's benchmark results that the ``report`` stage reads (``benchmarks/results/
    {dipgo,taylor,experts}.json``, those present) into the workspace ``dest``, with a README, so the
    stage's ``benchmarks/results`` dependency exists there; returns the names copied."""
    from .pareto import BENCH_DIR, BENCHMARKS

    folder = dest / BENCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(BENCH_README)
    copied = []
    for name in BENCHMARKS:
        src = top / BENCH_DIR / f"{name}.json"
        if src.is_file():
            shutil.copy(src, folder / src.name)
            copied.append(src.name)
    return copied


def _git(root: Path, *args: str) -> None:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WorkspaceError(f"`git {' '.join(args)}` failed in {root}: {(proc.stderr or proc.stdout).strip()}")


def _first_commit(root: Path, name: str) -> None:
    """Commit the new workspace (a baseline for ``dvc exp save``), as the user when git knows them."""
    known = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).returncode == 0
    who = [] if known else ["-c", "user.name=diffprune", "-c", "user.email=diffprune@localhost"]
    _git(root, "add", "-A")
    _git(root, *who, "commit", "-q", "-m", f"diffprune init: the workspace {name}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def init_workspace(dest: str | Path, data: str | Path, preset: str | None = None) -> str:
    """Create the workspace ``dest`` for the image folder ``data`` (see the module doc), with the params
    of ``presets/PRESET.yaml`` when given: built in a temporary sibling folder and renamed into place,
    so a failure leaves nothing behind. Returns a summary."""
    from . import versioning

    if shutil.which("git") is None:
        raise WorkspaceError("git: not found on PATH (a workspace is a git + DVC repository)")
    dest = Path(dest).absolute()
    _check_dest(dest)
    if Path(data).is_dir() and Path(data).resolve() in dest.resolve().parents:
        raise WorkspaceError(f"{dest}: inside --data {data}; its outputs (PNG grids) would become training images")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.init-", dir=dest.parent))
    try:
        values = _write_files(tmp, Path(data), preset)
        _git(tmp, "init", "-q")
        versioning.ensure_repo(tmp)
        versioning.configure_relative_remote(tmp, REMOTE)
        _first_commit(tmp, dest.name)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp made it private
        if dest.is_dir():
            dest.rmdir()  # empty (checked); a file created there meanwhile makes this fail, tmp removed
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (f"workspace {dest}: data {values['source']} ({values['channels']} channel(s), image_size "
            f"{values['image_size']}); next: cd {dest} && diffprune run   (or dvc repro)")
