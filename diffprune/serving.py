"""Verify, promote, load and serve registered diffprune models (the read side of the registry).

Every path that reads a registered version goes through :func:`verify_model` first: its flavour must
be a python_function model *from code* (diffprune's :mod:`diffprune.mlflow_model`, nothing pickled, no
extra code paths) and its files must match the SHA-256 tags written at registration
(:mod:`diffprune.registry`). MLflow's pickle deserialization stays off for everything loaded here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model

from .io import sha256_file, sha256_tree
from .models.checkpoint import verify
from .tracking import disable_pickle

DEGENERATE_TAG = "diffprune.degenerate"  # the evaluation's verdict, tagged by the register stage (stages/core.py)
from .registry import (MODEL_CODE, PYFUNC_LOADER, RegistryError, TAG_ARTIFACT, TAG_CODE, TAG_FORMAT, check_alias, get_version, model_version)


# ----------------------------------------------------------------------------- verify, promote, load

def _label(mv: ModelVersion) -> str:
    return f"models:/{mv.name}/{mv.version}"


def _refuse(label: str, why: str) -> RegistryError:
    return RegistryError(f"{label}: not a diffprune model ({why}); refusing to load it")


def _inside(root: Path, rel: str) -> Path | None:
    p = (root / rel).resolve()
    return p if root.resolve() in p.parents else None


def _check_flavour(label: str, local: Path) -> dict:
    """The python_function flavour of a model-from-code file, nothing pickled, no code paths."""
    try:
        flavors = Model.load(str(local / "MLmodel")).flavors
    except Exception as e:  # a missing or malformed MLmodel
        raise _refuse(label, f"unreadable MLmodel: {type(e).__name__}") from e
    pf = flavors.get("python_function") or {}
    if set(flavors) != {"python_function"} or pf.get("loader_module") != PYFUNC_LOADER:
        raise _refuse(label, f"flavours {sorted(flavors)}, loader {pf.get('loader_module')!r}")
    if "python_model" in pf:
        raise _refuse(label, "a cloudpickled python_model")
    if pf.get("code") or Path(str(pf.get("model_code_path", ""))).name != MODEL_CODE.name:
        raise _refuse(label, f"model code {pf.get('model_code_path')!r}, code paths {pf.get('code')!r}")
    return pf


def verify_model(mv: ModelVersion, local: Path) -> None:
    """Refuse (RegistryError, one line) a downloaded version that is not a diffprune model.

    Checked: the flavour (python_function, loader ``mlflow.pyfunc.loaders.code_model``, model-from-code file
    ``mlflow_model.py``, no pickle, no code paths), then the SHA-256 of that file and of every
    artifact against the tags written at registration, and the checkpoint's own weight hash.
    """
    label = _label(mv)
    pf = _check_flavour(label, local)
    tags = mv.tags or {}
    if TAG_CODE not in tags or TAG_FORMAT not in tags:
        raise _refuse(label, f"no {TAG_CODE} / {TAG_FORMAT} tags from diffprune's registration")
    if sha256_file(local / MODEL_CODE.name) != tags[TAG_CODE]:
        raise _refuse(label, f"{MODEL_CODE.name} differs from the one registered")
    declared = {k: _inside(local, str(v.get("path", ""))) for k, v in (pf.get("artifacts") or {}).items()}
    expected = {k.removeprefix(TAG_ARTIFACT): v for k, v in tags.items() if k.startswith(TAG_ARTIFACT)}
    if set(declared) != set(expected):
        raise _refuse(label, f"artifacts {sorted(declared)}, registered {sorted(expected)}")
    for k, path in declared.items():
        if path is None or not path.exists() or sha256_tree(path) != expected[k]:
            raise _refuse(label, f"artifact {k!r} differs from the one registered")
    if "checkpoint" in declared:
        verify(declared["checkpoint"])


def _download(mv: ModelVersion, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                     dst_path=str(dst)))
    if local.resolve() != dst.resolve():
        raise RegistryError(f"models:/{mv.name}/{mv.version}: downloaded to {local}, expected {dst}")


def resolve(uri: str, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Download and verify (:func:`verify_model`) the model at ``uri``; returns local paths: ``model``
    (the MLflow model folder), ``checkpoint``, ``pyfunc`` and every extra artifact, by name.

    With ``cache_dir`` the model goes to ``cache_dir/NAME/VERSION`` and is reused from there (and
    verified again); otherwise to a fresh temporary folder.
    """
    mv = model_version(uri)
    if cache_dir is not None:
        dst = Path(cache_dir) / mv.name / str(mv.version)
    else:
        dst = Path(tempfile.mkdtemp(prefix=f"diffprune-{mv.name}-"))
    marker = dst / ".complete"
    if not marker.exists():
        _download(mv, dst)
        marker.write_text(f"models:/{mv.name}/{mv.version}\n")
    verify_model(mv, dst)
    flavor = Model.load(str(dst / "MLmodel")).flavors["python_function"]
    return {"model": dst} | {k: dst / v["path"] for k, v in flavor.get("artifacts", {}).items()}


def promote(name: str, version: int | str, alias: str = "champion") -> dict[str, Any]:
    """Point registry alias ``alias`` of ``name`` at ``version``, once that version verifies as a
    diffprune model (:func:`verify_model`); returns ``{name, version, alias, model_uri}``."""
    check_alias(alias)
    mv = get_version(name, version)
    if reason := (mv.tags or {}).get(DEGENERATE_TAG):
        raise RegistryError(f"models:/{name}/{mv.version} is marked degenerate by its evaluation ({reason}): "
                            "promotion refused")
    with tempfile.TemporaryDirectory(prefix="diffprune-promote-") as tmp:
        _download(mv, Path(tmp))
        verify_model(mv, Path(tmp))
    MlflowClient().set_registered_model_alias(name, alias, str(mv.version))
    return {"name": name, "version": int(mv.version), "alias": alias, "model_uri": f"models:/{name}@{alias}"}


def load(uri: str | Path, device: str = "auto") -> mlflow.pyfunc.PyFuncModel:
    """Load the pyfunc at ``uri`` (``models:/…``, verified; or a local model folder, flavour-checked)
    on ``device``, with MLflow's pickle deserialization off."""
    disable_pickle()
    text = str(uri)
    if text.startswith("models:/"):
        local = resolve(text)["model"]
    else:
        local = Path(text)
        _check_flavour(str(local), local)
    return mlflow.pyfunc.load_model(str(local), model_config={"device": device})


def generate(uri: str, num_images: int, seed: int = 0, steps: int | None = None,
             device: str = "auto") -> np.ndarray:
    """Sample ``num_images`` images from the model at ``uri``: ``(N, H, W, C)`` uint8."""
    request: dict[str, list[int]] = {"num_images": [num_images], "seed": [seed]}
    if steps is not None:
        request["steps"] = [steps]
    return np.asarray(load(uri, device=device).predict(pd.DataFrame(request)))


def serve_command(uri: str, cache_dir: str | Path, port: int) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of ``mlflow models serve`` for the verified local copy of ``uri`` on
    127.0.0.1:``port``, pickle deserialization off."""
    local = resolve(uri, cache_dir=cache_dir)["model"]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    exe = str(mlflow_bin) if mlflow_bin.exists() else (shutil.which("mlflow") or "mlflow")
    env = dict(os.environ) | {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    return [exe, "models", "serve", "--env-manager", "local", "-m", str(local), "-h", "127.0.0.1",
            "-p", str(int(port))], env


def artifact_uri_of(run_id: str) -> str:
    """Where the run ``run_id`` keeps its artifacts (for links in reports)."""
    return MlflowClient().get_run(run_id).info.artifact_uri
