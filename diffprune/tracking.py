"""Experiment tracking: with :mod:`diffprune.registry`, the only modules of the project that call MLflow.

- :func:`configure` points MLflow at ``sqlite:///<root>/mlruns.db`` (artifacts in
  ``<root>/mlartifacts``), turns its telemetry and its pickle deserialization off;
- :func:`resolve_uri` / :func:`store_problem`: the store a run uses and whether it could write there
  (``diffprune doctor``); :func:`recent_runs`: an experiment's newest runs (``diffprune runs``);
- :func:`log_pipeline_run`: a flow run's own run ``pipeline`` (the Pareto report's files);
- :func:`loggable_params` / :func:`loggable_metrics`: flattened, redacted values for a run;
- the registry (:func:`register_model`, :func:`promote`, :func:`resolve`, :func:`load`,
  :func:`generate`) is :mod:`diffprune.registry`, also reachable here as ``tracking.NAME``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .config import ConfigError
from .env import quiet_defaults

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
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
_artifact_root: Path | None = None  # set by configure(); where new experiments store artifacts


# ----------------------------------------------------------------------------- setup

def disable_telemetry() -> None:
    """Turn MLflow's usage telemetry off, for this process and the processes it starts.

    MLflow 3 reads ``MLFLOW_DISABLE_TELEMETRY=true`` (or ``DO_NOT_TRACK=true``; ``DO_NOT_TRACK=1`` and
    ``MLFLOW_ENABLE_TELEMETRY=false`` are ignored by it). Its client starts when ``mlflow`` is first
    imported, so also export the variable before the process starts.
    """
    quiet_defaults()  # MLFLOW_DISABLE_TELEMETRY=true unless the user set it (diffprune/env.py)
    try:
        from mlflow.telemetry import set_telemetry_client

        set_telemetry_client()  # re-evaluates the switch: drops the client started at import
    except ImportError:  # an MLflow without telemetry
        pass


def disable_pickle() -> None:
    """Turn MLflow's pickle deserialization off, for this process and the processes it starts.

    MLflow 3 reads ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` (default true) on every load: with
    ``false`` it refuses a cloudpickled pyfunc (and other pickled flavours) instead of running it.
    """
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


TRACKING_ENV = "DIFFPRUNE_TRACKING_URI"  # the registry every run points at, when not the root's own


_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def _checked_uri(uri: str) -> str:
    """``$DIFFPRUNE_TRACKING_URI`` when it names a tracking store MLflow can use; else ConfigError."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in _SCHEMES:
        raise ConfigError(f"{TRACKING_ENV} = {uri[:200]!r}: expected a tracking store URI "
                          f"({', '.join(s + '://' for s in _SCHEMES)})")
    return uri


def resolve_uri(root: str | Path = ".") -> str:
    """The tracking URI a run in ``root`` logs to (as :func:`configure` chooses it, creating nothing):
    ``$DIFFPRUNE_TRACKING_URI`` when set (checked), else ``sqlite:///<root>/mlruns.db``."""
    if os.environ.get(TRACKING_ENV):
        return _checked_uri(os.environ[TRACKING_ENV])
    return f"sqlite:///{Path(root).resolve() / DEFAULT_DB}"


def local_store(uri: str) -> Path | None:
    """The file (``sqlite:///PATH``) or folder (``file://PATH``) of a local tracking store; None otherwise."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return None


def store_problem(uri: str) -> str | None:
    """Why a run could not write to the local tracking store ``uri`` now (not an SQLite file, read-only,
    a parent that is no writable folder); None when it could, or when the store is not local."""
    path = local_store(uri)
    if path is None:
        return None
    if path.exists():
        if uri.startswith("sqlite:") and (not path.is_file() or not _looks_like_sqlite(path)):
            return f"{path}: not an SQLite database"
        folder = path.parent if path.is_file() else path
        writable = os.access(path, os.W_OK) and os.access(folder, os.W_OK | os.X_OK)
        return None if writable else f"{path}: not writable"
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: cannot be created ({parent} is not a writable folder)"
    return None


def _looks_like_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(16)
    return head in (b"", b"SQLite format 3\x00")  # an empty file is a new database to SQLite


def configure(tracking_uri: str | None = None, root: str | Path = ".",
              artifact_root: str | Path | None = None) -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri``; returns the URI in use.

    Args:
        tracking_uri: default ``$DIFFPRUNE_TRACKING_URI`` when set (a registry shared by clones and
            workspaces), else ``sqlite:///<root>/mlruns.db``. Exported as ``MLFLOW_TRACKING_URI``, so
            subprocesses (``mlflow models serve``, Prefect workers) inherit it.
        root: the project folder holding the default database and artifact store.
        artifact_root: where experiments created from now on keep their artifacts; default
            ``<root>/mlartifacts``, or the server's choice for an ``http(s)://`` tracking URI.
    """
    global _artifact_root
    disable_telemetry()
    disable_pickle()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep task logs readable
    root = Path(root).resolve()
    if tracking_uri is None:
        tracking_uri = resolve_uri(root)
        if not os.environ.get(TRACKING_ENV):
            root.mkdir(parents=True, exist_ok=True)
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
    root = _default_artifact_root()
    if exp is not None:
        _check_location(name, exp.artifact_location, root)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = (root / re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _check_location(name: str, location: str, root: Path | None) -> None:
    """Refuse to log into an experiment whose local artifact folder is gone (a moved or copied
    workspace: its ``mlruns.db`` still names the old place), instead of writing there anew."""
    if not location.startswith("file:"):
        return
    where = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if not where.is_dir() and root is not None and root not in where.parents:
        raise ConfigError(f"MLflow experiment {name!r} keeps its artifacts in {where}, which does not exist "
                          f"(was the workspace moved or copied from there?): move them back, or point "
                          f"{TRACKING_ENV} at a registry of this place")


# ----------------------------------------------------------------------------- runs

RUN_METRICS = {"fid": "fid", "macs_ratio": "macs_ratio_vs_teacher"}  # what `diffprune runs` shows


def recent_runs(experiment: str, root: str | Path = ".", limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` runs of ``experiment`` in the registry a run in ``root`` uses, newest first:
    ``run_id``, ``name``, ``model`` (the stage's target), ``start`` (ISO, UTC), ``status``,
    ``duration_s`` (None while running), :data:`RUN_METRICS` (None when not logged), ``git_commit``.
    ``[]`` when the experiment, or the workspace's own database, does not exist (nothing is created)."""
    uri = resolve_uri(root)
    path = local_store(uri)
    if path is not None and not path.exists():
        return []
    configure(uri, root=root)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC", "attributes.run_id"],
                              max_results=limit)
    return [_run_row(r) for r in runs]


PIPELINE_RUN = "pipeline"  # the run name of a flow run's own MLflow run (its Pareto report)


def log_pipeline_run(experiment: str, artifacts: list[Path], *, root: str | Path = ".",
                     tags: Mapping[str, Any] | None = None, artifact_path: str = "report") -> str:
    """One MLflow run for a pipeline (flow) run, beside the registered models' runs: named
    :data:`PIPELINE_RUN`, tagged ``diffprune.kind=pipeline``, the git commit (the caller's ``tags``
    win: the run's own record) and ``tags``; ``artifacts`` logged under ``artifact_path``. Returns its id."""
    configure(root=root)
    commit, _ = git_commit(root)
    run_tags = safe_tags({"diffprune.kind": PIPELINE_RUN, "git_commit": commit, **(tags or {})})
    with mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=PIPELINE_RUN, tags=run_tags,
                          nested=mlflow.active_run() is not None) as run:
        for f in map(Path, artifacts):
            if f.is_file():
                mlflow.log_artifact(str(f), artifact_path=artifact_path)
    return run.info.run_id


def _run_row(run: Any) -> dict[str, Any]:
    import datetime

    info, data = run.info, run.data
    start = datetime.datetime.fromtimestamp(info.start_time / 1000, datetime.timezone.utc) if info.start_time else None
    ended = info.end_time is not None and info.start_time is not None
    return {"run_id": info.run_id, "name": info.run_name, "model": data.tags.get("target") or info.run_name,
            "start": start.isoformat(timespec="seconds") if start else None, "status": info.status,
            "duration_s": round((info.end_time - info.start_time) / 1000, 3) if ended else None,
            **{k: data.metrics.get(m) for k, m in RUN_METRICS.items()}, "git_commit": data.tags.get("git_commit")}


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


def safe_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as strings, secret-looking names and credentials in values redacted."""
    return {str(k): REDACTED if is_secret(str(k)) else redact_value(str(v)) for k, v in tags.items()}


def git_commit(cwd: str | Path | None = None) -> tuple[str, bool | None]:
    """``(HEAD commit, dirty)`` of the git repository holding ``cwd`` (a project), else of the one
    holding this package; ``("unknown", None)`` outside git.

    For a project, ``dirty`` counts only uncommitted changes to its inputs: not the files a run writes
    itself (``dvc.lock``, the metrics and reports ``dvc.yaml`` declares, DVC's ``.gitignore`` files).
    """
    places = ([Path(cwd).resolve()] if cwd is not None else []) + [Path(__file__).resolve().parent]
    for where in places:
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True)
        except OSError:  # git not installed
            break
        if head.returncode == 0:
            return head.stdout.strip(), _dirty(where, project=where == places[0] and cwd is not None)
    return "unknown", None


def _dirty(where: Path, project: bool) -> bool | None:
    from .versioning import dirty_paths

    managed: list[str] = []
    if project and (where / "dvc.yaml").is_file():
        from .flows.specs import stage_specs

        managed = [o for spec in stage_specs(where).values() for o in spec["uncached"]]
    try:
        return bool(dirty_paths(where, managed))
    except OSError:
        return None


# ----------------------------------------------------------------------------- registry

# The registry API lives in diffprune.registry; ``tracking.register_model`` etc. keep working.
_REGISTRY_API = {"Registered", "RegistryError", "register_model", "find_version", "model_content_hash",
                 "model_version"}
_SERVING_API = {"promote", "resolve", "verify_model", "load", "generate", "artifact_uri_of"}


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_API:
        from . import registry

        return getattr(registry, name)
    if name in _SERVING_API:
        from . import serving

        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
