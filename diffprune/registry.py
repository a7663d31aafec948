"""The model registry: register diffprune models (verify, promote, load, serve: :mod:`diffprune.serving`).

With :mod:`diffprune.tracking` (setup, params, runs) this is the only module that calls MLflow (the
promotion gate, :mod:`diffprune.gate`, reads and tags versions through :func:`alias_holder` and co.).

- :func:`register_model` logs a run and the model as a pickle-free pyfunc (*models from code*:
  :mod:`diffprune.mlflow_model`), registered as a new version of a registered model. Idempotent on
  the model's :func:`model_content_hash` (weights + architecture + scheduler config; never timings, paths);
- every version carries tags written at registration: the pyfunc format, the SHA-256 of its
  model-from-code file and of each artifact. :func:`verify_model` checks a downloaded version against
  them and its flavour (python_function from code, nothing pickled, no extra code paths); :func:`promote`,
  :func:`resolve`, :func:`load`, :func:`generate` and :func:`serve_command` refuse a version that fails;
- MLflow's pickle deserialization is turned off (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) for
  everything loaded here and in the processes started from here;
- registry lookups never build filter strings from user text: names are checked against
  :data:`NAME_PATTERN` before any call, versions are searched by a hex-checked hash tag and matched
  on the name in Python.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, TypedDict

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from .io import sha256_file, sha256_tree, write_json
from .models.checkpoint import CONFIG, FORMAT as CHECKPOINT_FORMAT, read_config, verify
from .models.unet import SAMPLERS
from .tracking import (MODEL_NAME_IN_RUN, ensure_experiment, git_commit, loggable_metrics,
                       loggable_params, safe_tags)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # logged as the pyfunc's code
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ALIAS_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,99}$")
HASH_PATTERN = re.compile(r"^[0-9a-f]{16,128}$")
TAG_CONTENT = "content_hash"
TAG_FORMAT = "diffprune.format"         # the pyfunc spec format (diffprune-pyfunc/1)
TAG_CODE = "diffprune.code_sha256"      # SHA-256 of the logged model-from-code file
TAG_ARTIFACT = "diffprune.sha256."      # + artifact name: sha256_tree of that artifact
PYFUNC_LOADER = "mlflow.pyfunc.loaders.code_model"  # a model-from-code pyfunc
# Artifact names the pyfunc reserves (extra_dirs may not use them).
_RESERVED = {"pyfunc", "checkpoint", "model"}
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")


class RegistryError(ValueError):
    """A registry lookup failed, or a version is not a diffprune model."""


class Registered(TypedDict):
    """A registered model version (what :func:`register_model` returns)."""

    name: str
    version: int
    run_id: str
    model_uri: str   # models:/NAME/VERSION
    created: bool    # False: a version with this content hash already existed


# ----------------------------------------------------------------------------- checks

def check_name(name: str) -> str:
    """``name`` when it is a safe registered-model name (:data:`NAME_PATTERN`); else RegistryError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RegistryError(f"model name = {name!r}: expected 1-100 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def check_alias(alias: str) -> str:
    """``alias`` when it is a safe registry alias (:data:`ALIAS_PATTERN`); else RegistryError."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.match(alias) or alias.lower() == "latest":
        raise RegistryError(f"alias = {alias!r}: expected letters, digits, '_' or '-', starting with a letter "
                            "or '_' (not 'latest')")
    return alias


def check_version(version: int | str) -> str:
    """The version as a string of digits (>= 1); else RegistryError."""
    text = str(version)
    if not text.isdigit() or int(text) < 1:
        raise RegistryError(f"model version = {version!r}: expected an integer >= 1")
    return str(int(text))


def check_hash(content_hash: str) -> str:
    """``content_hash`` when it is 16-128 lowercase hex digits; else ValueError."""
    if not isinstance(content_hash, str) or not HASH_PATTERN.match(content_hash):
        raise ValueError(f"content_hash = {content_hash!r}: expected 16-128 lowercase hex digits")
    return content_hash


# ----------------------------------------------------------------------------- content hash

def _file_identity(path: Path) -> str:
    """SHA-256 of a file; a checkpoint's ``config.json`` without its ``meta`` (timings, sources)."""
    if path.name == CONFIG:
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and doc.get("format") == CHECKPOINT_FORMAT:
            doc.pop("meta", None)
            return _sha256_text(json.dumps(doc, sort_keys=True, default=str))
    return sha256_file(path)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_content_hash(paths: Mapping[str, str | Path]) -> str:
    """Identity of a model made of named artifacts (``{"model": ckpt_dir, "schedule": json}``).

    Covers what the model computes: each file's bytes, by its name relative to its artifact, except
    a checkpoint's ``config.json``, hashed without ``meta`` (training time, sources, keys). So two
    checkpoints with the same weights, architecture and scheduler config have the same hash wherever
    they lie and however long they took. 64 hex digits.
    """
    parts: dict[str, dict[str, str]] = {}
    for name, p in sorted(paths.items()):
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: artifact {name!r} not found")
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        parts[name] = {(q.name if q == p else q.relative_to(p).as_posix()): _file_identity(q) for q in files}
    return _sha256_text(json.dumps(parts, sort_keys=True))


# ----------------------------------------------------------------------------- lookups

def _search_by_hash(content_hash: str) -> Iterator[ModelVersion]:
    """Every model version tagged ``content_hash`` (hex-checked, so the filter is not user text)."""
    client, token = MlflowClient(), None
    while True:
        page = client.search_model_versions(f"tags.{TAG_CONTENT} = '{check_hash(content_hash)}'",
                                            max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def find_version(name: str, content_hash: str) -> ModelVersion | None:
    """The newest READY version of registered model ``name`` tagged with ``content_hash``."""
    check_name(name)
    try:
        hits = [v for v in _search_by_hash(content_hash) if v.name == name and v.status == "READY"]
    except MlflowException:
        return None
    return max(hits, key=lambda v: int(v.version)) if hits else None


def _first_line(e: MlflowException) -> str:
    return str(e.message).strip().splitlines()[0] if str(e.message).strip() else type(e).__name__


def get_version(name: str, version: int | str) -> ModelVersion:
    """The registry entry of ``name`` version ``version``; RegistryError when absent."""
    check_name(name)
    try:
        return MlflowClient().get_model_version(name, check_version(version))
    except MlflowException as e:
        raise RegistryError(f"model {name!r} version {version!r}: not in the registry ({_first_line(e)})") from e


def missing_version(record: Mapping[str, Any]) -> str | None:
    """Why the version a ``models/registry/TARGET.json`` record names is not in the registry MLflow
    points at (absent, or another run's version of that number after the store was replaced); None
    when it is there."""
    try:
        found = get_version(record["name"], record["version"])
    except (RegistryError, KeyError, TypeError) as e:
        return str(e)
    if record.get("run_id") and found.run_id != record["run_id"]:
        return (f"model {record['name']!r} version {record['version']} is run {found.run_id} in the registry, "
                f"not the recorded run {record['run_id']}")
    return None


def tag_version_commit(name: str, version: int | str, commit: str, git_tag: str | None,
                       experiment: str | None = None) -> None:
    """Write the run's commit into a version's tags (``git_commit``; ``git_dirty`` false: the commit holds
    the run's inputs) with the git tag and the DVC experiment naming it."""
    if not re.fullmatch(r"[0-9a-f]{40,64}", commit or ""):
        raise ValueError(f"commit = {commit!r}: expected a git commit id")
    client = MlflowClient()
    tags = {"git_commit": commit, "git_dirty": "false", "diffprune.git_tag": git_tag or "",  # "": no valid tag name
            **({"diffprune.experiment": experiment} if experiment else {})}
    for key, value in tags.items():
        client.set_model_version_tag(check_name(name), check_version(version), key, value)


def alias_holder(name: str, alias: str) -> ModelVersion | None:
    """The version alias ``alias`` of ``name`` points at; None when the alias (or the model) is unset."""
    try:
        return MlflowClient().get_model_version_by_alias(check_name(name), check_alias(alias))
    except MlflowException as e:  # no such model / alias; anything else (an unreachable store) propagates
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def run_metrics(mv: ModelVersion) -> dict[str, float]:
    """The metrics logged with the run that registered ``mv`` (flattened names: ``fid``, ``cost.macs``)."""
    return dict(MlflowClient().get_run(mv.run_id).data.metrics) if mv.run_id else {}


def set_version_tags(name: str, version: int | str, tags: Mapping[str, Any]) -> None:
    """Write ``tags`` (values redacted, as strings) on version ``version`` of ``name``."""
    client = MlflowClient()
    for key, value in safe_tags(tags).items():
        client.set_model_version_tag(check_name(name), check_version(version), key, value)


def model_version(uri: str) -> ModelVersion:
    """The registry entry of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    m = _MODEL_URI.match(uri) if isinstance(uri, str) else None
    if m is None:
        raise RegistryError(f"model uri = {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    check_name(m["name"])
    if m["version"]:
        return get_version(m["name"], m["version"])
    try:
        return MlflowClient().get_model_version_by_alias(m["name"], check_alias(m["alias"]))
    except MlflowException as e:
        raise RegistryError(f"model uri = {uri!r}: not in the registry ({_first_line(e)})") from e


# ----------------------------------------------------------------------------- register

def _signature(model_dir: Path) -> ModelSignature:
    base = read_config(model_dir)["base_config"]
    size = base["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c = int(base["in_channels"])
    inputs = Schema([
        ColSpec("long", "num_images"),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "steps", required=False),
    ])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "diffusers", "safetensors", "numpy", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _checked_extras(kind: str, sampler: str, steps: int, batch_size: int,
                    extra_dirs: Mapping[str, Path] | None) -> dict[str, Path]:
    """Step 1: refuse bad arguments before anything is logged; returns the extra artifacts."""
    from .targets import KINDS

    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: expected one of {sorted(KINDS)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler = {sampler!r}: expected one of {sorted(SAMPLERS)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps = {steps}, batch_size = {batch_size}: both must be >= 1")
    extra = {k: Path(v) for k, v in (extra_dirs or {}).items()}
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise ValueError(f"extra_dirs names {clash}: reserved (reserved: {sorted(_RESERVED)})")
    bad = [k for k in extra if not ALIAS_PATTERN.match(k)]
    if bad:
        raise ValueError(f"extra_dirs names {bad}: expected letters, digits, '_' or '-'")
    return extra


def _check_inputs(model_dir: Path, artifacts: list[Path], extra: Mapping[str, Path]) -> None:
    """Step 2: the checkpoint verifies and every file to log exists."""
    verify(model_dir)  # refuse a corrupted checkpoint before logging anything
    for p in [*artifacts, *extra.values()]:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: artifact to log not found")


def _registered(version: ModelVersion, run_id: str | None, created: bool) -> Registered:
    return {"name": version.name, "version": int(version.version), "run_id": run_id or "",
            "model_uri": f"models:/{version.name}/{version.version}", "created": created}


def _version_tags(tags: Mapping[str, Any], content: str, kind: str, root: Path | None) -> dict[str, str]:
    """Step 3: run and version tags: the caller's (redacted), the state of the run's git repository
    (``root``'s, else the package's; a run that records itself replaces it with its commit), the identity."""
    from .mlflow_model import SPEC_FORMAT

    commit, dirty = git_commit(root)
    out = safe_tags(tags) | {"git_commit": commit, TAG_CONTENT: content, "kind": kind, TAG_FORMAT: SPEC_FORMAT}
    if dirty is not None:
        out["git_dirty"] = str(dirty).lower()
    return out


def _pyfunc_artifacts(tmp: Path, model_dir: Path, extra: Mapping[str, Path], spec: dict) -> dict[str, Path]:
    """Step 4: the pyfunc's artifacts by name: its spec (written to ``tmp``), checkpoint, extras."""
    from .mlflow_model import CHECKPOINT_ARTIFACT, SPEC_ARTIFACT, SPEC_FORMAT

    spec_file = write_json(tmp / "pyfunc.json", {"format": SPEC_FORMAT, **spec})
    return {SPEC_ARTIFACT: spec_file, CHECKPOINT_ARTIFACT: model_dir, **extra}


def _integrity_tags(artifacts: Mapping[str, Path]) -> dict[str, str]:
    """The tags :func:`verify_model` checks: the code file's and each artifact's SHA-256."""
    return {TAG_CODE: sha256_file(MODEL_CODE)} | {f"{TAG_ARTIFACT}{k}": sha256_tree(v) for k, v in artifacts.items()}


def _log_run(params: Any, metrics: Mapping[str, Any], artifacts: list[Path]) -> None:
    """Step 5: the run's params (flattened, redacted), metrics and files."""
    mlflow.log_params(loggable_params(params))
    if metrics:
        mlflow.log_metrics(loggable_metrics(metrics))
    for p in map(Path, artifacts):
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=p.name)
        else:
            mlflow.log_artifact(str(p))


def _log_pyfunc(model_dir: Path, pyfunc_artifacts: Mapping[str, Path], steps: int) -> str:
    """Step 6: log the model-from-code pyfunc; returns its model URI."""
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(MODEL_CODE),
        artifacts={k: str(v) for k, v in pyfunc_artifacts.items()},
        signature=_signature(model_dir),
        # the model's own step count: a skip schedule only runs with the steps it was made for
        input_example=pd.DataFrame({"num_images": [1], "seed": [0], "steps": [int(steps)]}),
        pip_requirements=_requirements(),
        model_config={"device": "auto"},
    )
    return info.model_uri


def register_model(*, name: str, model_dir: Path, params: Any, metrics: Mapping[str, Any], artifacts: list[Path],
                   tags: Mapping[str, Any], experiment: str, content_hash: str | None = None,
                   extra_dirs: Mapping[str, Path] | None = None, kind: str = "unet", sampler: str = "ddim",
                   steps: int = 50, batch_size: int = 256, root: Path | None = None) -> Registered:
    """Log a run with the model and register it as a new version of ``name`` (idempotent).

    When a version of ``name`` tagged ``content_hash`` already exists nothing is logged and that
    version is returned (``created=False``).

    Args:
        name: registered model name (:data:`NAME_PATTERN`).
        model_dir: the checkpoint folder; logged as the pyfunc artifact ``checkpoint``.
        params: the resolved config; logged flattened (``teacher.lr``), secrets redacted.
        metrics: numbers (nested allowed), logged flattened.
        artifacts: files or folders logged with the run (sample grid, metrics JSON, ...).
        tags: run and version tags, e.g. the DVC hashes of the inputs (``{"dvc.data": "….dir"}``).
        experiment: experiment name (created when missing).
        content_hash: identity of the model, hex; default :func:`model_content_hash` of the model's artifacts.
        extra_dirs: more pyfunc artifacts by name (a skip-schedule JSON, a folder of experts).
        kind: the :data:`diffprune.targets.KINDS` entry that rebuilds the denoiser.
        sampler, steps, batch_size: the served model's sampling defaults (``steps`` per request).
        root: the project the model comes from: its git commit (and whether its inputs were
            uncommitted) is tagged; default the package's own repository.
    """
    check_name(name)
    extra = _checked_extras(kind, sampler, steps, batch_size, extra_dirs)
    model_dir = Path(model_dir)
    _check_inputs(model_dir, artifacts, extra)
    content = check_hash(content_hash if content_hash is not None else model_content_hash({"model": model_dir, **extra}))
    existing = find_version(name, content)
    if existing is not None:
        return _registered(existing, existing.run_id, created=False)
    version_tags = _version_tags(tags, content, kind, root)
    with tempfile.TemporaryDirectory(prefix="diffprune-pyfunc-") as tmp, mlflow.start_run(
        experiment_id=ensure_experiment(experiment), run_name=f"{name}-{content[:12]}", tags=version_tags,
        nested=mlflow.active_run() is not None,
    ) as run:
        _log_run(params, metrics, artifacts)
        spec = {"kind": kind, "sampler": sampler, "steps": int(steps), "batch_size": int(batch_size)}
        pyfunc_artifacts = _pyfunc_artifacts(Path(tmp), model_dir, extra, spec)
        model_uri = _log_pyfunc(model_dir, pyfunc_artifacts, steps)
        version = mlflow.register_model(model_uri, name, tags=version_tags | _integrity_tags(pyfunc_artifacts))
    return _registered(version, run.info.run_id, created=True)
