"""Faults injected on purpose: kills, exceptions, corrupt files, hostile config values."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffprune.config import ConfigError, load_params
from diffprune.locks import stage_lock
from diffprune.stages import safe_subpath

from .conftest import REPO, make_project

BIN = Path(sys.executable).parent
LONG = {"teacher": {"steps": 60, "checkpoint_every": 5, "batch_size": 8}}


def _weights(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / "models/teacher/model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from diffprune.stages.core import run_data, run_teacher

    root = make_project(tmp_path_factory.mktemp("ref") / "proj", LONG)
    p = load_params(root / "params.yaml")
    run_data(p, root)
    run_teacher(p, root, progress=False)
    return _weights(root)


def test_sigkill_mid_training_resumes_and_matches(tmp_path, uninterrupted):
    root = make_project(tmp_path / "proj", LONG)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([str(BIN / "diffprune"), "stage", "data"], cwd=root, env=env, check=True, capture_output=True)
    proc = subprocess.Popen([str(BIN / "diffprune"), "stage", "teacher"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((root / ".work").glob("teacher-*/step-00000010")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run must be killed mid-training for this test to mean anything"
    assert not (root / "models/teacher").exists(), "a killed run must leave no half-written teacher"
    done = sorted(int(p.name.split("-")[1]) for p in (root / ".work").glob("teacher-*/step-*"))
    assert done and max(done) < 60
    r = subprocess.run([str(BIN / "diffprune"), "-v", "stage", "teacher"], cwd=root, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming teacher from step {max(done)}" in r.stderr
    assert _same(_weights(root), uninterrupted)


def test_prefect_retries_an_injected_failure_and_resumes(tmp_path, uninterrupted, monkeypatch, prefect_harness):
    from prefect import flow

    import diffprune.tasks.stages as tasks
    from diffprune.stages.core import run_data

    root = make_project(tmp_path / "proj", LONG)
    run_data(load_params(root / "params.yaml"), root)
    calls = {"n": 0}

    def failing_reporter(name):
        def report(done, total):
            calls["n"] += 1
            if calls["n"] == 3:  # after the checkpoint at step 15
                raise TimeoutError("injected transient fault")  # transient: retried (a bug would not be)
        return report

    monkeypatch.setattr(tasks, "_progress_reporter", failing_reporter)
    task = tasks.run_stage.with_options(retry_delay_seconds=0)

    @flow
    def one():
        return task("teacher", str(root / "params.yaml"), str(root))

    one()
    # 12 checkpoints in an uninterrupted run; the retry resumed at 15, so 3 + 9 reports were made
    assert calls["n"] == 3 + 9
    assert _same(_weights(root), uninterrupted)


def test_output_paths_cannot_escape_the_project(tmp_path):
    assert safe_subpath(tmp_path, "models/eval/x") == (tmp_path / "models/eval/x").resolve()
    for bad in ("../outside", "models/../../x", "/etc/passwd"):
        with pytest.raises(ConfigError, match="escapes the project folder"):
            safe_subpath(tmp_path, bad)


def test_unknown_target_is_refused(tmp_path):
    from diffprune.stages.core import get_target

    with pytest.raises(ConfigError, match="unknown model '../../etc'"):
        get_target("../../etc")


def test_servers_bind_to_loopback():
    mk = (REPO / "Makefile").read_text()
    ui = mk[mk.index("\nui:"):mk.index("\nui-stop:")]
    assert ui.count("--host 127.0.0.1") == 2 and "0.0.0.0" not in mk


# ----------------------------------------------------------------------------- fuzzed params

_SCHEMA = {
    "teacher.lr": float, "teacher.steps": int, "teacher.batch_size": int, "teacher.ema_decay": float,
    "taylor.ratio": float, "taylor.importance": str, "taylor.threshold": float, "dipgo.target_ratio": float,
    "data.source": str, "data.image_size": int, "evaluate.steps": int, "evaluate.sampler": str,
    "router.budget": float, "finetune.fraction": float, "project.device": str, "intervals.k": int,
}
_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.just(""), st.just(-0.5),
                    st.just(1.5), st.just("bogus"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(_SCHEMA)), value=_values)
def test_fuzzed_params_load_or_fail_naming_the_key(tmp_path, key, value):
    section, name = key.split(".")
    try:
        p = load_params(None, {section: {name: value}})
    except ConfigError as e:
        assert key in str(e), str(e)
        return
    got = getattr(p.section(section), name)
    assert got == value or (isinstance(value, int) and got == float(value))


@pytest.mark.parametrize("override", [
    {"teacher": {"steps": -1}},
    {"taylor": {"ratio": 1.2}},
    {"taylor": {"importance": "vibes"}},
    {"data": {"source": ""}},
    {"dipgo": {"target_ratio": 0}},
])
def test_cli_refuses_bad_params_and_writes_nothing(tmp_path, override):
    root = make_project(tmp_path / "proj", override)
    r = subprocess.run([str(BIN / "diffprune"), "stage", "data"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 2
    (section, vals), = override.items()
    (name, _), = vals.items()
    assert f"{section}.{name}" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]


@pytest.mark.slow  # ~60 s: two whole CLI runs; `make test` keeps the per-stage lock test in test_hostile.py
def test_two_runs_at_once_with_the_same_config_compute_each_stage_once(tmp_path):
    """Both runs finish; every stage is computed by exactly one of them and reused by the other (on the
    spine's stages: the property is per stage, and the whole pipeline twice at once takes minutes)."""
    only = ["data", "features", "teacher", "evaluate@teacher"]
    root = make_project(tmp_path / "proj", code=True)
    procs = []
    for i in range(2):
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / f"prefect{i}")}
        procs.append(subprocess.Popen([str(BIN / "diffprune"), "run", "--no-push", "--only", "evaluate@teacher"],
                                      cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]

    def listed(out: str, label: str) -> set[str]:
        line = next(l for l in out.splitlines() if l.startswith(label))
        return {s.strip() for s in line.split(":", 1)[1].split(",") if s.strip() not in ("", "-")}

    ran = [listed(o[0], "ran:") for o in outs]
    assert ran[0] | ran[1] == set(only)
    assert not ran[0] & ran[1], f"stages computed twice: {ran[0] & ran[1]}"


def test_a_run_of_another_config_is_refused_while_one_is_live(tmp_path, prefect_api):
    """A second config never overwrites a live run's outputs: it is refused, and the first finishes."""
    import json

    root = make_project(tmp_path / "proj", code=True)
    other = yaml.safe_load((root / "params.yaml").read_text())
    other["teacher"]["steps"] = 7
    (root / "other.yaml").write_text(yaml.safe_dump(other))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect-a"),
           **prefect_api}
    with stage_lock(root, "evaluate@teacher"):  # run A waits on it, claiming the workspace, until B is done
        a = subprocess.Popen([str(BIN / "diffprune"), "run", "--no-push", "--only", "evaluate@teacher"], cwd=root,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        claim = root / ".work/locks/workspace.json"
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None:
            if claim.exists() and a.pid in json.loads(claim.read_text())["pids"]:
                break
            time.sleep(0.1)
        assert a.poll() is None, "run A must still be running when B starts"
        env_b = {**env, "PREFECT_HOME": str(tmp_path / "prefect-b")}
        b = subprocess.run([str(BIN / "diffprune"), "run", "--no-push", "--params", "other.yaml"], cwd=root,
                           env=env_b, capture_output=True, text=True, timeout=300)
        assert a.poll() is None, "run A must still hold the workspace when B has been refused"
    out_a = a.communicate(timeout=600)
    assert b.returncode == 2 and "in use by run(s)" in b.stderr, b.stderr[-1500:]
    assert a.returncode == 0, out_a[1][-1500:]
    meta = json.loads((root / "models/teacher/config.json").read_text())["meta"]
    assert meta["training_options"]["steps"] == 6, "the teacher on disk is run A's"
    assert json.loads(claim.read_text())["pids"] == []


def test_timestep_grid_larger_than_the_schedule_is_refused(tmp_path, tiny_unet, tiny_scheduler):
    from diffprune.models.checkpoint import save_model
    from diffprune.stages import get_stage

    root = make_project(tmp_path / "proj", {"intervals": {"grid": 5000}})
    save_model(tiny_unet, root / "models/teacher", scheduler_config=dict(tiny_scheduler.config))
    with pytest.raises(ConfigError, match="intervals.grid = 5000"):
        get_stage("intervals")(load_params(root / "params.yaml"), root, progress=False)
    assert not (root / "models/intervals").exists()


def test_training_progress_reaches_the_task_log_as_lines_every_five_percent(monkeypatch):
    import diffprune.tasks.stages as tasks

    lines: list[str] = []

    class Logger:
        def info(self, fmt, *args):
            lines.append(fmt % args)

    monkeypatch.setattr(tasks, "get_run_logger", lambda: Logger())
    monkeypatch.setattr(tasks, "create_progress_artifact", lambda **kw: "id")
    monkeypatch.setattr(tasks, "update_progress_artifact", lambda *a, **kw: None)
    report = tasks._progress_reporter("teacher")
    for done in range(1, 1001):
        report(done, 1000)
    assert len(lines) == 20 and lines[0] == "teacher: 50/1000 (5%)" and lines[-1] == "teacher: 1000/1000 (100%)"
    coarse: list[str] = []
    monkeypatch.setattr(tasks, "get_run_logger", lambda: type("L", (), {"info": lambda s, f, *a: coarse.append(f % a)})())
    report = tasks._progress_reporter("finetune")
    for done in (200, 400, 600, 800, 1000):  # one report per checkpoint: each one logged
        report(done, 1000)
    assert len(coarse) == 5
