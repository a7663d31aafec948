"""Operator commands: `diffprune doctor` (what the machine has and lacks, with fixes) and
`diffprune runs` (the recent runs in MLflow)."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffprune import doctor, tracking
from diffprune.cli import app

from .conftest import make_project

CHECK_NAMES = [name for name, _, _ in doctor.CHECKS]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No shared registry, no Prefect server or profile, an empty HF cache; MLflow's globals restored."""
    for var in (tracking.TRACKING_ENV, "PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
                "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(tracking, "_artifact_root", None)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def _lines(output: str) -> dict[str, str]:
    """doctor's report: check name -> its line (``status  name  found  -> fix``)."""
    out = {}
    for line in output.strip().splitlines()[:-1]:
        out[line[8:20].strip()] = line
    return out


# ----------------------------------------------------------------------------- doctor

def test_doctor_here_is_ready_and_names_the_missing_gpu_with_its_fix(tmp_path):
    proj = make_project(tmp_path / "proj")
    t0 = time.monotonic()
    result = _cli("doctor", "--root", str(proj))
    assert time.monotonic() - t0 < 30
    assert result.exit_code == 0, result.output
    lines = _lines(result.stdout)
    assert list(lines) == CHECK_NAMES
    assert result.stdout.strip().splitlines()[-1] == "ready: nothing required is missing"
    if torch.cuda.is_available():
        assert lines["gpu"].startswith("ok") and "GiB" in lines["gpu"]
    else:
        assert lines["gpu"].startswith("missing") and "no CUDA GPU" in lines["gpu"]
        assert "-> none needed: every stage runs on the CPU" in lines["gpu"]
    assert lines["inception"].startswith("missing") and "feature net" in lines["inception"]
    assert lines["mlflow"].startswith("ok") and f"sqlite:///{proj / 'mlruns.db'}" in lines["mlflow"]
    assert lines["prefect"].startswith("ok") and "ephemeral server" in lines["prefect"]
    assert lines["dvc remote"].startswith("missing") and "-> diffprune init" in lines["dvc remote"]
    assert lines["disk"].startswith("ok") and "GiB free" in lines["disk"]
    assert not (proj / "mlruns.db").exists()  # the doctor creates nothing


def test_doctor_json_parses_and_has_every_check(tmp_path):
    result = _cli("doctor", "--json", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ready"] is True
    assert [c["name"] for c in doc["checks"]] == CHECK_NAMES
    assert {c["status"] for c in doc["checks"]} <= {doctor.OK, doctor.WARN, doctor.MISSING, doctor.FAIL}
    assert all(c["fix"] for c in doc["checks"] if c["status"] != doctor.OK)
    assert {c["name"] for c in doc["checks"] if c["required"]} == {"mlflow", "disk"}
    bad = _cli("doctor", "--root", str(tmp_path / "nowhere"))  # its own bad input: one line, exit 2
    assert bad.exit_code == 2 and bad.stderr.strip() == f"error: --root {tmp_path / 'nowhere'}: no such folder"


@pytest.mark.parametrize("uri", ["foo://x", "mlruns.db", "sqlite:///{tmp}/a-file/mlruns.db", "sqlite:///{tmp}/a-file"])
def test_an_unusable_tracking_uri_fails_the_doctor_with_exit_1(uri, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("not a database")
    monkeypatch.setenv(tracking.TRACKING_ENV, uri.format(tmp=tmp_path))
    result = _cli("doctor", "--root", str(tmp_path))
    assert result.exit_code == 1, result.output
    line = _lines(result.stdout)["mlflow"]
    assert line.startswith("fail") and f"-> unset {tracking.TRACKING_ENV}" in line
    assert result.stdout.strip().splitlines()[-1] == "not ready: mlflow must be fixed"
    doc = json.loads(_cli("doctor", "--json", "--root", str(tmp_path)).stdout)
    assert doc["ready"] is False


def test_a_shared_sqlite_registry_that_is_usable_passes(monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.TRACKING_ENV, f"sqlite:///{tmp_path / 'shared' / 'mlruns.db'}")
    check = doctor.check_tracking(tmp_path / "proj")
    assert check.status == doctor.OK and "$DIFFPRUNE_TRACKING_URI" in check.found
    assert "created by the first run" in check.found


def test_disk_below_the_floor_fails_and_below_the_warning_warns(monkeypatch, tmp_path):
    usage = type("Usage", (), {"free": int(0.5 * 2**30), "total": 2**40, "used": 0})
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda _: usage)
    assert doctor.check_disk(tmp_path).status == doctor.FAIL
    assert _cli("doctor", "--root", str(tmp_path)).exit_code == 1
    usage.free = 5 * 2**30
    assert doctor.check_disk(tmp_path).status == doctor.WARN
    assert _cli("doctor", "--root", str(tmp_path)).exit_code == 0


def test_configured_inception_weights_are_required_to_exist(tmp_path):
    weights = tmp_path / "w" / doctor.INCEPTION_FILE
    proj = make_project(tmp_path / "proj", {"evaluate": {"inception_weights": str(weights)}})
    check = doctor.check_inception(proj)
    assert check.status == doctor.FAIL and check.required and str(weights) in check.fix
    assert _cli("doctor", "--root", str(proj)).exit_code == 1
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    check = doctor.check_inception(proj)
    assert check.status == doctor.OK and "Inception-v3" in check.found


def test_clip_weights_are_found_in_the_hf_cache(tmp_path):
    assert doctor.check_clip(tmp_path).status == doctor.MISSING
    snap = tmp_path / "hf-cache" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert doctor.check_clip(tmp_path).status == doctor.MISSING  # a config without weights is not enough
    (snap / "model.safetensors").write_bytes(b"x")
    check = doctor.check_clip(tmp_path)
    assert check.status == doctor.OK and "openai/clip-vit-large-patch14" in check.found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_api_url_is_probed_with_a_short_timeout(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_free_port()}/api")  # nothing listens
    t0 = time.monotonic()
    check = doctor.check_prefect(Path("."))
    assert time.monotonic() - t0 < doctor.TIMEOUT_S + 1
    assert check.status == doctor.MISSING and "unreachable" in check.found and "make ui" in check.fix

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_port}/api")
        assert doctor.check_prefect(Path(".")).status == doctor.OK
    finally:
        server.shutdown()


def test_prefect_api_url_from_the_active_profile(monkeypatch, tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "local"\n[profiles.local]\n'
                                        'PREFECT_API_URL = "http://x.invalid/api"\n')
    assert doctor.prefect_api_url() == ("http://x.invalid/api", f"profile 'local' in {home / 'profiles.toml'}")


def test_dvc_remote_of_a_workspace_is_reported(tmp_path):
    from diffprune import versioning

    assert doctor.check_dvc(tmp_path).status == doctor.MISSING
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    versioning.ensure_repo(tmp_path)
    versioning.configure_remote(tmp_path, tmp_path / ".dvc-remote")
    check = doctor.check_dvc(tmp_path)
    assert check.status == doctor.OK and str(tmp_path / ".dvc-remote") in check.found


# ----------------------------------------------------------------------------- runs

def _log_runs(proj: Path, n: int) -> list[str]:
    import mlflow

    tracking.configure(root=proj)
    ids = []
    for i in range(n):
        with mlflow.start_run(experiment_id=tracking.ensure_experiment("tiny"), tags={"target": f"model{i}"}) as run:
            mlflow.log_metrics({"fid": 10.0 + i, "macs_ratio_vs_teacher": 0.5 + i / 10})
            time.sleep(0.05)  # distinct start times and a measurable duration
        ids.append(run.info.run_id)
    mlflow.set_tracking_uri(None)
    return ids


def test_runs_lists_the_logged_runs_newest_first(tmp_path):
    proj = make_project(tmp_path / "proj")  # register.experiment: tiny
    first, second = _log_runs(proj, 2)
    result = _cli("runs", "--root", str(proj))
    assert result.exit_code == 0, result.output
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| started (UTC) | run id | model | status")
    assert second in table[2] and first in table[3] and len(table) == 4
    assert "model1" in table[2] and "FINISHED" in table[2] and "11.000" in table[2] and "0.600" in table[2]
    doc = json.loads(_cli("runs", "--json", "--root", str(proj)).stdout)
    assert doc["experiment"] == "tiny" and doc["tracking_uri"] == f"sqlite:///{proj / 'mlruns.db'}"
    rows = doc["runs"]
    assert [r["run_id"] for r in rows] == [second, first]
    assert rows[0]["start"] >= rows[1]["start"] and all(r["duration_s"] >= 0.05 for r in rows)
    assert [(r["model"], r["fid"], r["macs_ratio"]) for r in rows] == [("model1", 11.0, 0.6), ("model0", 10.0, 0.5)]
    limited = json.loads(_cli("runs", "--json", "--limit", "1", "--root", str(proj)).stdout)["runs"]
    assert [r["run_id"] for r in limited] == [second]


def test_runs_says_no_runs_and_creates_nothing(tmp_path):
    proj = make_project(tmp_path / "proj")
    result = _cli("runs", "--root", str(proj))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("no runs in MLflow experiment 'tiny'")
    assert not (proj / "mlruns.db").exists()
    _log_runs(proj, 1)
    result = _cli("runs", "--root", str(proj), "--experiment", "other")
    assert result.exit_code == 0 and result.stdout.startswith("no runs in MLflow experiment 'other'")


def test_runs_with_a_bad_tracking_uri_is_one_line_exit_2(monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.TRACKING_ENV, "foo://x")
    result = _cli("runs", "--root", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "DIFFPRUNE_TRACKING_URI" in result.stderr
