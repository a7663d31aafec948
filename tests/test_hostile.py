"""Hostile inputs (issue 12): a pickled model in the registry, identical weights with other metadata,
quotes in model names, inputs that used to end in tracebacks, and two DVC stages at once."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from diffprune import registry, serving, tracking
from diffprune.cli import MAX_IMAGES, MAX_STEPS, app
from diffprune.config import ConfigError, DataConfig, TeacherConfig
from diffprune.io import ArtifactError
from diffprune.models.checkpoint import save_model
from diffprune.models.unet import build_scheduler, build_unet

from .conftest import REPO, make_project

NAME = "tiny-teacher"
EVIL = "evil-teacher"


class Evil(mlflow.pyfunc.PythonModel):
    """A cloudpickled pyfunc whose loading writes a marker file (stands for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def load_context(self, context: Any) -> None:
        Path(self.marker).write_text("ran")

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        return model_input


def _checkpoint(path: Path, seed: int = 0, meta: dict | None = None) -> Path:
    torch.manual_seed(seed)
    teacher = TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False], norm_num_groups=4)
    model = build_unet(teacher, DataConfig(image_size=8))
    return save_model(model, path, scheduler_config=dict(build_scheduler(TeacherConfig()).config), meta=meta)


def _register(root: Path, ckpt: Path, name: str = NAME, **kw: Any) -> registry.Registered:
    return registry.register_model(name=name, model_dir=ckpt, params={"teacher": {"lr": 1e-3}}, metrics={"fid": 1.0},
                                   artifacts=[], tags={}, experiment="hostile", steps=2, **kw)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sqlite registry with a diffprune model (version 1 of NAME) and a cloudpickled one (EVIL)."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "marker"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
            mp.delenv(var, raising=False)
        mp.setattr(tracking, "_artifact_root", None)
        tracking.configure(root=root)
        good = _register(root, _checkpoint(root / "ckpt"))
        with mlflow.start_run(experiment_id=tracking.ensure_experiment("hostile")):
            mlflow.pyfunc.log_model(name="model", python_model=Evil(str(marker)), registered_model_name=EVIL)
        yield {"root": root, "marker": marker, "good": good}
        mlflow.set_tracking_uri(None)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _one_line_error(result: Any, code: int = 2) -> str:
    """The CLI failed with ``code`` and one ``error:`` line on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------------- 1. no unpickling

def test_pickled_model_is_refused_by_promote_sample_and_serve(reg: dict[str, Any], tmp_path: Path) -> None:
    root, marker = reg["root"], reg["marker"]
    line = _one_line_error(_cli("promote", EVIL, "1", "--root", str(root)))
    assert f"models:/{EVIL}/1: not a diffprune model" in line
    with pytest.raises(Exception):
        MlflowClient().get_model_version_by_alias(EVIL, "champion")
    MlflowClient().set_registered_model_alias(EVIL, "champion", "1")  # set behind diffprune's back
    out = tmp_path / "grid.png"
    line = _one_line_error(_cli("sample", f"models:/{EVIL}@champion", "-o", str(out), "--root", str(root)))
    assert "not a diffprune model" in line
    _one_line_error(_cli("serve", f"models:/{EVIL}@champion", "--root", str(root)))
    assert not marker.exists() and not out.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    with pytest.raises(Exception, match="pickle"):  # MLflow itself refuses, too
        mlflow.pyfunc.load_model(f"models:/{EVIL}/1")
    assert not marker.exists()


def test_tampered_code_or_artifacts_are_refused(reg: dict[str, Any], tmp_path: Path) -> None:
    mv = registry.get_version(NAME, 1)
    local = tmp_path / "copy"
    serving._download(mv, local)
    serving.verify_model(mv, local)  # the registered copy verifies
    code = local / "mlflow_model.py"
    code.write_text(code.read_text() + "\nopen('pwned', 'w')\n")
    with pytest.raises(registry.RegistryError, match="mlflow_model.py differs"):
        serving.verify_model(mv, local)
    serving._download(mv, local2 := tmp_path / "copy2")
    (local2 / "artifacts" / "pyfunc.json").write_text("{}")
    with pytest.raises(registry.RegistryError, match="artifact 'pyfunc' differs"):
        serving.verify_model(mv, local2)


def test_good_model_promotes_and_samples(reg: dict[str, Any], tmp_path: Path) -> None:
    root = reg["root"]
    result = _cli("promote", NAME, "1", "--root", str(root))
    assert result.exit_code == 0, result.output
    out = tmp_path / "grid.png"
    result = _cli("sample", f"models:/{NAME}@champion", "-n", "2", "--steps", "2", "-o", str(out), "--root", str(root))
    assert result.exit_code == 0, result.output
    assert out.exists()


# ----------------------------------------------------------------------------- 2. content hash

def test_same_weights_other_meta_register_one_version(reg: dict[str, Any], tmp_path: Path) -> None:
    a = _checkpoint(tmp_path / "a", meta={"train_seconds": 1.5, "source": "/here"})
    b = _checkpoint(tmp_path / "elsewhere" / "b", meta={"train_seconds": 99.0, "source": "/there"})
    c = _checkpoint(tmp_path / "c", seed=1, meta={"train_seconds": 1.5, "source": "/here"})
    assert (a / "config.json").read_bytes() != (b / "config.json").read_bytes()
    assert registry.model_content_hash({"model": a}) == registry.model_content_hash({"model": b})
    assert registry.model_content_hash({"model": a}) != registry.model_content_hash({"model": c})
    first, second = _register(reg["root"], a, name="same-weights"), _register(reg["root"], b, name="same-weights")
    assert first["created"] and not second["created"] and second["version"] == first["version"] == 1
    assert _register(reg["root"], c, name="same-weights")["version"] == 2


# ----------------------------------------------------------------------------- 3. names

@pytest.mark.parametrize("name", ["x' OR name LIKE '%", "a/b", "", "-lead", "x" * 101, "a b", "näme"])
def test_bad_model_names_are_refused_up_front(reg: dict[str, Any], name: str) -> None:
    with pytest.raises(registry.RegistryError, match="model name = "):
        registry.find_version(name, "0" * 64)
    with pytest.raises(registry.RegistryError, match="model name = "):
        _register(reg["root"], reg["root"] / "ckpt", name=name)
    with pytest.raises(registry.RegistryError, match="model name = "):
        serving.promote(name, 1)
    if name:
        assert _cli("promote", name, "1", "--root", str(reg["root"])).exit_code == 2


def test_lookup_matches_the_name_exactly(reg: dict[str, Any]) -> None:
    content = registry.model_content_hash({"model": reg["root"] / "ckpt"})
    assert int(registry.find_version(NAME, content).version) == 1
    assert registry.find_version("tiny-teache", content) is None  # no prefix / LIKE match
    with pytest.raises(ValueError, match="content_hash = "):
        registry.find_version(NAME, "abc' OR 1=1")


# ----------------------------------------------------------------------------- 7. one line, exit 2

def test_unknown_version_and_alias(reg: dict[str, Any], tmp_path: Path) -> None:
    root = str(reg["root"])
    assert "version 99" in _one_line_error(_cli("promote", NAME, "99", "--root", root))
    assert "not in the registry" in _one_line_error(_cli("sample", f"models:/{NAME}@nosuch", "--root", root))
    assert "not in the registry" in _one_line_error(_cli("sample", f"models:/{NAME}/42", "--root", root))
    assert "expected models:/NAME" in _one_line_error(_cli("sample", "models:/a/b/c", "--root", root))


def test_sample_bounds(reg: dict[str, Any]) -> None:
    ckpt = str(reg["root"] / "ckpt")
    assert f"<= {MAX_IMAGES}" in _one_line_error(_cli("sample", ckpt, "-n", str(10**7)))
    assert f"<= {MAX_STEPS}" in _one_line_error(_cli("sample", ckpt, "--steps", "5000"))
    assert "-n = 0" in _one_line_error(_cli("sample", ckpt, "-n", "0"))


def test_read_only_output_folder(reg: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: stand in for the refusal a read-only folder gives
        import diffprune.io as dio

        def refuse(*_: Any, **kw: Any) -> str:
            raise PermissionError(13, "Permission denied", str(kw.get("dir", ro)))

        monkeypatch.setattr(dio.tempfile, "mkdtemp", refuse)
    else:
        ro.chmod(0o500)
    line = _one_line_error(_cli("sample", str(reg["root"] / "ckpt"), "-n", "1", "--steps", "1", "-o", str(ro / "g.png")))
    assert str(ro) in line and "Permission denied" in line
    assert not (ro / "g.png").exists()


def test_truncated_metrics_in_report_and_debug_traceback(tmp_path: Path) -> None:
    f = tmp_path / "models" / "eval" / "teacher" / "metrics.json"
    f.parent.mkdir(parents=True)
    f.write_text('{"fid": 1.')
    assert str(f) in _one_line_error(_cli("report", "--root", str(tmp_path)))
    result = _cli("--debug", "report", "--root", str(tmp_path))
    assert result.exit_code != 0 and isinstance(result.exception, ArtifactError)  # raised: the traceback shows


def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG header claiming ``side x side`` pixels (PIL refuses > 2 * MAX_IMAGE_PIXELS on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=i * 40).save(images / f"ok{i}.png")
    bomb = _bomb_png(images / "zz-bomb.png")
    proj = make_project(tmp_path / "proj", {"data": {"source": str(images)}})
    line = _one_line_error(_cli("stage", "data", "--params", str(proj / "params.yaml"), "--root", str(proj)))
    assert str(bomb) in line and "pixels" in line
    assert not (proj / "data" / "dataset").exists()


# ----------------------------------------------------------------------------- 7. retries

def test_only_transient_errors_are_retried() -> None:
    import errno
    import sqlite3

    from diffprune.tasks.stages import is_transient

    for exc in (ConfigError("x"), ArtifactError("x"), ValueError("x"), NotImplementedError("x"), RuntimeError("x"),
                PermissionError(13, "denied"), FileNotFoundError(2, "missing"), KeyError("k")):
        assert not is_transient(exc), exc
    locked = RuntimeError("registry write failed")
    locked.__cause__ = sqlite3.OperationalError("database is locked")
    for exc in (ConnectionResetError(), TimeoutError(), OSError(errno.EBUSY, "busy"), locked,
                sqlite3.OperationalError("database is locked")):
        assert is_transient(exc), exc


# ----------------------------------------------------------------------------- 8. stage lock

def test_stage_lock_is_the_flows_lock_and_never_leaves_the_project(tmp_path: Path) -> None:
    from diffprune.config import ConfigError
    from diffprune.flows.pipeline import _lock
    from diffprune.locks import stage_lock

    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("teacher", "evaluate@teacher"):
        assert stage_lock(proj, name).lock_file == _lock(proj, name).lock_file
    # 9. a .work symlinked outside the project: no lock (nor anything else) is written through it
    outside = tmp_path / "outside"
    outside.mkdir()
    other = tmp_path / "proj2"
    other.mkdir()
    (other / ".work").symlink_to(outside)
    with pytest.raises(ConfigError, match="escapes the project"):
        stage_lock(other, "teacher")
    assert not any(outside.rglob("*"))


def test_two_stage_commands_at_once_compute_once(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "proj")
    args = ["--params", str(proj / "params.yaml"), "--root", str(proj)]
    assert _cli("stage", "data", *args).exit_code == 0
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffprune.cli", "stage", "teacher", *args]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=proj)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    docs = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted("skipped" in d for d in docs) == [False, True], docs
    assert (proj / "models" / "teacher" / "model.safetensors").exists()
