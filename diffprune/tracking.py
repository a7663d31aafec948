"""Experiment tracking and the model registry: the one module of the project that calls MLflow.

- :func:`configure` points MLflow at ``sqlite:///<root>/mlruns.db`` (artifacts in
  ``<root>/mlartifacts``) and turns its telemetry off;
- :func:`register_model` logs a run (redacted, flattened params; metrics; artifact files) and the
  model as a pickle-free pyfunc (*models from code*: :mod:`diffprune.mlflow_model`), registered as a
  new version of a registered model. Idempotent on the model's content hash;
- :func:`promote` moves a registry alias (``champion`` by default) onto a version;
- :func:`resolve`, :func:`load` and :func:`generate` turn ``models:/NAME@alias`` or
  ``models:/NAME/VERSION`` into local folders, a loaded pyfunc, or images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, TypedDict

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from .io import write_json
from .models.checkpoint import verify
from .models.unet import SAMPLERS

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # logged as the pyfunc's code
MODEL_NAME_IN_RUN = "model"
REDACTED = "***REDACTED***"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value

# Names whose values are secrets: token, password, secret, credentials, auth, api_key, *_key ...
# matched on the last component of a flattened key ("hub.hf_token" -> "hf_token").
_SECRET_NAME = re.compile(
    r"(^|[_\-])(tokens?|passwords?|passwd|pwd|secrets?|credentials?|auth|apikey|api[_\-]?key|"
    r"access[_\-]?key|private[_\-]?key)($|[_\-])|(^|[_\-])key$",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,})\b")
# Artifact names the pyfunc reserves (extra_dirs may not use them).
_RESERVED = {"pyfunc", "checkpoint", "model"}

_artifact_root: Path | None = None  # set by configure(); where new experiments store artifacts


class Registered(TypedDict):
    """A registered model version (what :func:`register_model` returns)."""

    name: str
    version: int
    run_id: str
    model_uri: str   # models:/NAME/VERSION
    created: bool    # False: a version with this content hash already existed


# ----------------------------------------------------------------------------- setup

def disable_telemetry() -> None:
    """Turn MLflow's usage telemetry off, for this process and the processes it starts.

    MLflow 3 reads ``MLFLOW_DISABLE_TELEMETRY=true`` (or ``DO_NOT_TRACK=true``; ``DO_NOT_TRACK=1`` and
    ``MLFLOW_ENABLE_TELEMETRY=false`` are ignored by it). Its client starts when ``mlflow`` is first
    imported, so also export the variable before the process starts.
    """
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("DO_NOT_TRACK", "true")
    try:
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()  # re-evaluates the switch: drops the client started at import
    except ImportError:  # an MLflow without telemetry
        pass


def configure(tracking_uri: str | None = None, root: str | Path = ".",
              artifact_root: str | Path | None = None) -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri``; returns the URI in use.

    Args:
        tracking_uri: default ``sqlite:///<root>/mlruns.db``. Exported as ``MLFLOW_TRACKING_URI``, so
            subprocesses (``mlflow models serve``, Prefect workers) inherit it.
        root: the project folder holding the default database and artifact store.
        artifact_root: where experiments created from now on keep their artifacts; default
            ``<root>/mlartifacts``, or the server's choice for an ``http(s)://`` tracking URI.
    """
    global _artifact_root
    disable_telemetry()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep task logs readable
    root = Path(root).resolve()
    if tracking_uri is None:
        root.mkdir(parents=True, exist_ok=True)
        tracking_uri = f"sqlite:///{root / DEFAULT_DB}"
    if artifact_root is not None:
        _artifact_root = Path(artifact_root).resolve()
    elif tracking_uri.startswith(("http://", "https://")):
        _artifact_root = None
    else:
        _artifact_root = root / DEFAULT_ARTIFACTS
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return tracking_uri


def _default_artifact_root() -> Path | None:
    """The configured artifact root; else, for a ``sqlite:///DIR/x.db`` URI, ``DIR/mlartifacts``."""
    if _artifact_root is not None:
        return _artifact_root
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent / DEFAULT_ARTIFACTS
    return None


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created (artifacts under the artifact root) when missing."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = _default_artifact_root()
    location = (root / re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------- params

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings / dataclasses -> ``{"section.key": value}`` (lists stay values)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, Mapping):
        return {prefix: obj} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def is_secret(key: str) -> bool:
    """Whether a (flattened) param name looks like it holds a secret: ``hub.hf_token`` -> True."""
    return bool(_SECRET_NAME.search(key.rsplit(".", 1)[-1]))


def redact_value(value: str) -> str:
    """Mask credentials inside a value: ``https://user:pw@host`` and Hub/GitHub/API tokens."""
    value = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
    return _SECRET_VALUE.sub(REDACTED, value)


def loggable_params(params: Any) -> dict[str, str]:
    """Flattened, redacted, stringified params, each within MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in flatten(params).items():
        if is_secret(key):
            out[key] = REDACTED
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = redact_value(text)
        out[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return out


def loggable_metrics(metrics: Any) -> dict[str, float]:
    """Flattened numeric metrics; a non-numeric value raises ``ValueError`` naming it."""
    out: dict[str, float] = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"metric {key} = {value!r}: expected a number")
        out[key] = float(value)
    return out


def _safe_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): REDACTED if is_secret(str(k)) else redact_value(str(v)) for k, v in tags.items()}


def git_commit(cwd: str | Path | None = None) -> tuple[str, bool | None]:
    """``(HEAD commit, dirty)`` of the repository holding this package (else ``cwd``).

    ``("unknown", None)`` outside git.
    """
    for where in (Path(__file__).resolve().parent, Path(cwd or ".").resolve()):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True)
            if head.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True)
            return head.stdout.strip(), (bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)
        except OSError:  # git not installed
            break
    return "unknown", None


# ----------------------------------------------------------------------------- registry

def find_version(name: str, content_hash: str) -> ModelVersion | None:
    """The newest READY version of registered model ``name`` tagged with ``content_hash``."""
    escaped = name.replace("'", "\\'")
    try:
        versions = MlflowClient().search_model_versions(f"name = '{escaped}'")
    except MlflowException:
        return None
    hits = [v for v in versions if v.tags.get("content_hash") == content_hash and v.status == "READY"]
    return max(hits, key=lambda v: int(v.version)) if hits else None


def _signature(model_dir: Path) -> ModelSignature:
    from .models.checkpoint import read_config

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


def register_model(
    *,
    name: str,
    model_dir: Path,
    params: Any,
    metrics: Mapping[str, Any],
    artifacts: list[Path],
    tags: Mapping[str, Any],
    experiment: str,
    content_hash: str,
    extra_dirs: Mapping[str, Path] | None = None,
    kind: str = "unet",
    sampler: str = "ddim",
    steps: int = 50,
    batch_size: int = 256,
) -> Registered:
    """Log a run with the model and register it as a new version of ``name`` (idempotent).

    When a version of ``name`` tagged ``content_hash`` already exists nothing is logged and that
    version is returned (``created=False``).

    Args:
        name: registered model name.
        model_dir: the checkpoint folder (:func:`~diffprune.models.checkpoint.save_model`); logged
            as the pyfunc artifact ``checkpoint``.
        params: the resolved config (nested mapping or dataclass); logged flattened
            (``teacher.lr``), secret-looking names and credentials in values redacted.
        metrics: numbers (nested allowed), logged flattened.
        artifacts: files or folders logged with the run (sample grid, metrics JSON, ...).
        tags: run and version tags, e.g. the DVC hashes of the inputs (``{"dvc.data": "….dir"}``).
        experiment: experiment name (created when missing).
        content_hash: identity of the model (e.g. ``sha256_tree(model_dir)`` or a DVC hash).
        extra_dirs: more pyfunc artifacts by name (a skip-schedule JSON, a folder of experts).
        kind: the :data:`diffprune.targets.KINDS` entry that rebuilds the denoiser.
        sampler, steps, batch_size: the served model's sampling defaults (``steps`` per request).
    """
    from .mlflow_model import CHECKPOINT_ARTIFACT, SPEC_ARTIFACT, SPEC_FORMAT
    from .targets import KINDS

    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: expected one of {sorted(KINDS)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler = {sampler!r}: expected one of {sorted(SAMPLERS)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps = {steps}, batch_size = {batch_size}: both must be >= 1")
    if not content_hash:
        raise ValueError(f"content_hash = {content_hash!r}: must not be empty")
    extra = {k: Path(v) for k, v in (extra_dirs or {}).items()}
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise ValueError(f"extra_dirs names {clash}: reserved (reserved: {sorted(_RESERVED)})")
    model_dir = Path(model_dir)
    verify(model_dir)  # refuse a corrupted checkpoint before logging anything
    for p in [*artifacts, *extra.values()]:
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: artifact to log not found")

    existing = find_version(name, content_hash)
    if existing is not None:
        return {"name": name, "version": int(existing.version), "run_id": existing.run_id or "",
                "model_uri": f"models:/{name}/{existing.version}", "created": False}

    commit, dirty = git_commit()
    version_tags = _safe_tags(tags) | {"git_commit": commit, "content_hash": content_hash, "kind": kind}
    if dirty is not None:
        version_tags["git_dirty"] = str(dirty).lower()
    experiment_id = ensure_experiment(experiment)
    with tempfile.TemporaryDirectory(prefix="diffprune-pyfunc-") as tmp, mlflow.start_run(
        experiment_id=experiment_id, run_name=f"{name}-{content_hash[:12]}", tags=version_tags,
        nested=mlflow.active_run() is not None,
    ) as run:
        mlflow.log_params(loggable_params(params))
        if metrics:
            mlflow.log_metrics(loggable_metrics(metrics))
        for p in map(Path, artifacts):
            if p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=p.name)
            else:
                mlflow.log_artifact(str(p))
        spec = write_json(Path(tmp) / "pyfunc.json", {
            "format": SPEC_FORMAT, "kind": kind, "sampler": sampler, "steps": int(steps),
            "batch_size": int(batch_size),
        })
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(MODEL_CODE),
            artifacts={SPEC_ARTIFACT: str(spec), CHECKPOINT_ARTIFACT: str(model_dir)}
            | {k: str(v) for k, v in extra.items()},
            signature=_signature(model_dir),
            # the model's own step count: a skip schedule only runs with the steps it was made for
            input_example=pd.DataFrame({"num_images": [1], "seed": [0], "steps": [int(steps)]}),
            pip_requirements=_requirements(),
            model_config={"device": "auto"},
        )
        version = mlflow.register_model(info.model_uri, name, tags=version_tags)
    return {"name": name, "version": int(version.version), "run_id": run.info.run_id,
            "model_uri": f"models:/{name}/{version.version}", "created": True}


def promote(name: str, version: int | str, alias: str = "champion") -> dict[str, Any]:
    """Point registry alias ``alias`` of ``name`` at ``version``; returns ``{..., model_uri}``."""
    client = MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise ValueError(f"model {name!r} version {version!r}: not in the registry ({e.message})") from e
    client.set_registered_model_alias(name, alias, str(version))
    return {"name": name, "version": int(version), "alias": alias, "model_uri": f"models:/{name}@{alias}"}


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))$")


def model_version(uri: str) -> ModelVersion:
    """The registry entry of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    m = _MODEL_URI.match(uri)
    if m is None:
        raise ValueError(f"model uri = {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    client = MlflowClient()
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException as e:
        raise ValueError(f"model uri = {uri!r}: not in the registry ({e.message})") from e


def resolve(uri: str, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Download the model at ``uri``; returns local paths: ``model`` (the MLflow model folder),
    ``checkpoint``, ``pyfunc`` and every extra artifact, by name.

    With ``cache_dir`` the model goes to ``cache_dir/NAME/VERSION`` and is reused from there
    (registered versions never change); otherwise to a fresh temporary folder. The checkpoint's
    content hash is verified.
    """
    mv = model_version(uri)
    if cache_dir is not None:
        dst = Path(cache_dir) / mv.name / str(mv.version)
    else:
        dst = Path(tempfile.mkdtemp(prefix=f"diffprune-{re.sub(r'[^A-Za-z0-9_.-]+', '_', mv.name)}-"))
    marker = dst / ".complete"
    if not marker.exists():
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                         dst_path=str(dst)))
        if local.resolve() != dst.resolve():
            raise RuntimeError(f"{uri}: downloaded to {local}, expected {dst}")
        marker.write_text(f"models:/{mv.name}/{mv.version}\n")
    flavor = Model.load(str(dst / "MLmodel")).flavors["python_function"]
    paths = {"model": dst} | {k: dst / v["path"] for k, v in flavor.get("artifacts", {}).items()}
    if "checkpoint" in paths:
        verify(paths["checkpoint"])
    return paths


def load(uri: str, device: str = "auto") -> mlflow.pyfunc.PyFuncModel:
    """Load the pyfunc at ``uri`` (``models:/…``, ``runs:/…`` or a folder) on ``device``."""
    return mlflow.pyfunc.load_model(uri, model_config={"device": device})


def generate(uri: str, num_images: int, seed: int = 0, steps: int | None = None,
             device: str = "auto") -> np.ndarray:
    """Sample ``num_images`` images from the model at ``uri``: ``(N, H, W, C)`` uint8."""
    request: dict[str, list[int]] = {"num_images": [num_images], "seed": [seed]}
    if steps is not None:
        request["steps"] = [steps]
    images = load(uri, device=device).predict(pd.DataFrame(request))
    return np.asarray(images)


def artifact_uri_of(run_id: str) -> str:
    """Where the run ``run_id`` keeps its artifacts (for links in reports)."""
    return MlflowClient().get_run(run_id).info.artifact_uri
