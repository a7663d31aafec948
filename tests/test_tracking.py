"""MLflow glue: idempotent registration, redaction, aliases, and a pickle-free pyfunc that
samples the same images as the library in a fresh process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from diffprune import tracking
from diffprune.config import DataConfig, TeacherConfig
from diffprune.io import sha256_tree
from diffprune.models.checkpoint import load_model, load_scheduler_config, save_model
from diffprune.models.unet import build_scheduler, build_unet, sampling_scheduler
from diffprune.sampling import ModelDenoiser, sample

NAME = "tiny-unet"
SECRET = "hf_" + "a" * 34

PARAMS = {
    "teacher": {"lr": 1e-3, "block_out_channels": [8, 16, 16]},
    "hub": {"hf_token": SECRET, "url": "https://alice:pa55word@example.org/data", "api_key": "k-123"},
    "data": {"source": f"owner/name?token={SECRET}"},
}


def _tiny_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    teacher = TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False], norm_num_groups=4)
    model = build_unet(teacher, DataConfig(image_size=8))
    return save_model(model, path, scheduler_config=dict(build_scheduler(TeacherConfig()).config))


def _register(ckpt: Path, root: Path, **overrides: Any) -> tracking.Registered:
    (root / "metrics.json").write_text(json.dumps({"fid": 12.5}))
    kwargs: dict[str, Any] = dict(
        name=NAME, model_dir=ckpt, params=PARAMS, metrics={"fid": 12.5, "cost": {"macs": 3e6}},
        artifacts=[root / "metrics.json"], tags={"dvc.models/teacher": "0123abcd.dir"},
        experiment="diffprune-test", content_hash=sha256_tree(ckpt), steps=2,
    )
    return tracking.register_model(**(kwargs | overrides))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sqlite registry in a temp folder with versions 1 (model a) and 2 (model b + a schedule)."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
            mp.delenv(var, raising=False)  # configure() sets them; restored after the module
        mp.setattr(tracking, "_artifact_root", None)
        uri = tracking.configure(root=root)
        a, b = _tiny_checkpoint(root / "a", seed=0), _tiny_checkpoint(root / "b", seed=1)
        (root / "schedule.json").write_text(json.dumps({"keep": [[1, 0], [1, 1]]}))
        first = _register(a, root)
        again = _register(a, root, tags={"other": "x"})
        second = _register(b, root, extra_dirs={"schedule": root / "schedule.json"})
        yield {"root": root, "uri": uri, "a": a, "b": b, "first": first, "again": again, "second": second}
        mlflow.set_tracking_uri(None)


def test_configure_defaults(registry: dict[str, Any]) -> None:
    root = registry["root"]
    assert registry["uri"] == f"sqlite:///{root / 'mlruns.db'}"
    assert os.environ["MLFLOW_TRACKING_URI"] == registry["uri"]  # inherited by subprocesses
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"  # no model is unpickled
    exp = MlflowClient().get_experiment_by_name("diffprune-test")
    assert exp.artifact_location.startswith((root / "mlartifacts").as_uri())


def test_register_is_idempotent_on_content_hash(registry: dict[str, Any]) -> None:
    first, again, second = registry["first"], registry["again"], registry["second"]
    assert first == {"name": NAME, "version": 1, "run_id": first["run_id"], "model_uri": f"models:/{NAME}/1",
                     "created": True}
    assert again == first | {"created": False}
    assert second["version"] == 2 and second["created"] and second["run_id"] != first["run_id"]
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2
    exp = client.get_experiment_by_name("diffprune-test")
    assert len(client.search_runs([exp.experiment_id])) == 2  # the repeat logged no run

    tags = client.get_model_version(NAME, "1").tags
    assert tags["content_hash"] == sha256_tree(registry["a"])
    assert tags["git_commit"] and tags["kind"] == "unet"
    assert tags["dvc.models/teacher"] == "0123abcd.dir"
    assert client.get_run(first["run_id"]).data.metrics == {"fid": 12.5, "cost.macs": 3e6}


def test_secrets_are_redacted(registry: dict[str, Any]) -> None:
    run = MlflowClient().get_run(registry["first"]["run_id"])
    params = run.data.params
    assert params["teacher.lr"] == "0.001" and params["teacher.block_out_channels"] == "[8, 16, 16]"
    assert params["hub.hf_token"] == tracking.REDACTED
    assert params["hub.api_key"] == tracking.REDACTED
    assert params["hub.url"] == f"https://{tracking.REDACTED}@example.org/data"
    logged = json.dumps([run.data.params, run.data.tags])
    for secret in (SECRET, "pa55word", "k-123"):
        assert secret not in logged


def test_champion_loads_in_fresh_process_and_matches_library(registry: dict[str, Any], tmp_path: Path) -> None:
    assert tracking.promote(NAME, 1) == {"name": NAME, "version": 1, "alias": "champion",
                                         "model_uri": f"models:/{NAME}@champion"}
    out = tmp_path / "images.npy"
    code = (
        "import sys, numpy, mlflow.pyfunc\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1], model_config={'device': 'cpu'})\n"
        "numpy.save(sys.argv[2], m.predict({'num_images': 2, 'seed': 3, 'steps': 2}))\n"
    )
    env = os.environ | {"MLFLOW_TRACKING_URI": registry["uri"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, f"models:/{NAME}@champion", str(out)],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(out)
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8

    ckpt = registry["a"]
    scheduler = sampling_scheduler(load_scheduler_config(ckpt), "ddim")
    x = sample(ModelDenoiser(load_model(ckpt)), scheduler, num_images=2, sample_shape=(1, 8, 8), steps=2, seed=3)
    expected = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, expected)


def test_resolve_downloads_verified_folders(registry: dict[str, Any], tmp_path: Path) -> None:
    paths = tracking.resolve(f"models:/{NAME}/2", cache_dir=tmp_path)
    assert set(paths) == {"model", "checkpoint", "pyfunc", "schedule"}
    assert sha256_tree(paths["checkpoint"]) == sha256_tree(registry["b"])
    assert json.loads(paths["pyfunc"].read_text())["kind"] == "unet"
    assert json.loads(paths["schedule"].read_text()) == {"keep": [[1, 0], [1, 1]]}
    assert tracking.resolve(f"models:/{NAME}/2", cache_dir=tmp_path) == paths  # reused from the cache


def test_generate_defaults_and_validation(registry: dict[str, Any]) -> None:
    images = tracking.generate(f"models:/{NAME}/2", num_images=3, seed=1, device="cpu")  # steps from pyfunc.json
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    model = tracking.load(f"models:/{NAME}/2", device="cpu")
    with pytest.raises(Exception, match="num_images"):
        model.predict({"num_images": 0})


def test_errors_show_the_bad_value(registry: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="version '7'"):
        tracking.promote(NAME, "7")
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION"):
        tracking.resolve("runs:/abc/model")
    with pytest.raises(ValueError, match="kind = 'nope'"):
        _register(registry["a"], registry["root"], kind="nope", content_hash="new")
    with pytest.raises(ValueError, match="reserved"):
        _register(registry["a"], registry["root"], extra_dirs={"checkpoint": registry["a"]}, content_hash="new")
    with pytest.raises(ValueError, match="metric note = 'text'"):
        tracking.loggable_metrics({"note": "text"})


@pytest.mark.parametrize("key, secret", [
    ("hub.hf_token", True), ("token", True), ("db.password", True), ("aws_secret_access_key", True),
    ("openai.api_key", True), ("API-KEY", True), ("auth", True), ("credentials", True),
    ("teacher.lr", False), ("data.source", False), ("keyframes", False), ("monkey", False),
    ("evaluate.steps", False), ("tokenizer_name", False),
])
def test_is_secret(key: str, secret: bool) -> None:
    assert tracking.is_secret(key) is secret


def test_flatten_nested_and_dataclasses() -> None:
    flat = tracking.flatten({"teacher": TeacherConfig(), "a": {"b": {"c": 1}}, "d": [1, 2]})
    assert flat["teacher.lr"] == TeacherConfig().lr and flat["a.b.c"] == 1 and flat["d"] == [1, 2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve(registry: dict[str, Any]) -> None:
    """``mlflow models serve --env-manager local -m models:/NAME@champion`` answers requests."""
    tracking.promote(NAME, 1)
    port = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = os.environ | {"MLFLOW_TRACKING_URI": registry["uri"], "PATH": bindir + os.pathsep + os.environ["PATH"]}
    server = subprocess.Popen(
        [str(Path(bindir) / "mlflow"), "models", "serve", "--env-manager", "local", "-m",
         f"models:/{NAME}@champion", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow models serve did not come up")
                time.sleep(1)
        body = json.dumps({"dataframe_records": [{"num_images": 2, "seed": 0, "steps": 2}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        predictions = np.array(json.load(urllib.request.urlopen(req, timeout=60))["predictions"])
        assert predictions.shape == (2, 8, 8, 1)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_moved_workspace_says_its_registry_points_at_the_old_place(tmp_path):
    import shutil

    import mlflow

    from diffprune import tracking
    from diffprune.config import ConfigError

    old = tmp_path / "old"
    tracking.configure(root=old)
    with mlflow.start_run(experiment_id=tracking.ensure_experiment("moved")):
        mlflow.log_text("x", "x.txt")  # the experiment's artifacts now live under old/mlartifacts
    shutil.move(old, tmp_path / "new")
    tracking.configure(root=tmp_path / "new")
    with pytest.raises(ConfigError, match=r"old/mlartifacts/moved.*does not exist"):
        tracking.ensure_experiment("moved")


@pytest.mark.parametrize("uri", ["foo://x", "mlruns.db", "javascript:alert(1)"])
def test_a_bad_shared_registry_uri_is_refused_naming_it(uri, monkeypatch, tmp_path):
    from diffprune import tracking
    from diffprune.config import ConfigError

    monkeypatch.setenv(tracking.TRACKING_ENV, uri)
    with pytest.raises(ConfigError, match="DIFFPRUNE_TRACKING_URI"):
        tracking.configure(root=tmp_path)
    monkeypatch.setenv(tracking.TRACKING_ENV, f"sqlite:///{tmp_path / 'shared.db'}")
    assert tracking.configure(root=tmp_path / "elsewhere") == f"sqlite:///{tmp_path / 'shared.db'}"
