"""Training through Hugging Face accelerate: mixed precision, and several processes on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO
from .ddp_train import tiny_run

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N`` on this CPU machine (each process asks
    accelerate for the CPU, so the group is a gloo one); one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HOME": str(cwd / "hf"),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_trains_finite_differs_from_fp32_and_resumes_identically(tmp_path):
    fp32 = tiny_run(tmp_path / "fp32")
    bf16 = tiny_run(tmp_path / "bf16", mixed_precision="bf16")
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items()), "the weights stay fp32 (autocast only)"
    assert not _same(bf16, fp32), "bf16 autocast must change the arithmetic"
    tiny_run(tmp_path / "cut", mixed_precision="bf16", stop_after=2)
    assert _same(tiny_run(tmp_path / "cut", mixed_precision="bf16"), bf16), "a resumed bf16 run = an uninterrupted one"


def test_fp16_on_cpu_is_refused_in_one_line():
    from diffprune.config import ConfigError, ProjectConfig

    with pytest.raises(ConfigError, match=r"^project.mixed_precision = 'fp16': needs a CUDA device[^\n]*$"):
        ProjectConfig(device="cpu", mixed_precision="fp16")
    assert ProjectConfig(mixed_precision=False).mixed_precision == "no", "YAML's bare `no` is a boolean"


@pytest.mark.slow  # ~35 s on 2 cores: two processes each import torch and diffusers
def test_two_processes_match_one_on_the_same_global_batch_and_only_rank_0_writes(tmp_path):
    ref = tiny_run(tmp_path / "one")
    r = _launch([str(REPO / "tests" / "ddp_train.py"), str(tmp_path / "ddp" / "work"), str(tmp_path / "two.st")],
                tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    two = load_file(str(tmp_path / "two.st"))
    assert two.keys() == ref.keys()
    diff = max((two[k] - ref[k]).abs().max().item() for k in ref)
    print(f"2 processes vs 1: max weight difference {diff:.2e}")
    assert diff < 1e-4, f"2 processes differ from 1 by up to {diff:.2e}"
    assert sorted(p.name for p in (tmp_path / "ddp").glob("saved-by-rank-*")) == ["saved-by-rank-0"]
    shards = [(tmp_path / "ddp" / f"batches-rank-{r}").read_text().split() for r in (0, 1)]
    assert shards == [["4"] * 4, ["3"] * 4], "each process trains on its own shard of the global batch of 7"
    assert sorted(p.name for p in (tmp_path / "ddp" / "work").iterdir()) == ["step-00000002", "step-00000004"]


@pytest.mark.slow  # ~40 s on 2 cores
def test_teacher_stage_under_accelerate_launch_trains_on_both_and_writes_once(tmp_path):
    import json

    from safetensors.torch import load_file

    from diffprune.config import load_params
    from diffprune.stages.core import run_data, run_teacher

    from .conftest import make_project

    roots = [make_project(tmp_path / name) for name in ("one", "two")]
    for root in roots:
        run_data(load_params(root / "params.yaml"), root)
    run_teacher(load_params(roots[0] / "params.yaml"), roots[0], progress=False)
    r = _launch(["-m", "diffprune.cli", "stage", "teacher"], roots[1])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert sorted(x.get("rank", 0) for x in lines) == [0, 1] and {"teacher", "seconds"} <= next(
        x for x in lines if "rank" not in x).keys(), r.stdout
    one, two = (load_file(str(root / "models/teacher/model.safetensors")) for root in roots)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff < 1e-4, f"the 2-process teacher differs from the 1-process one by up to {diff:.2e}"


def test_only_training_stages_run_under_several_processes(tmp_path, monkeypatch):
    from diffprune.cli import _run_stage_once
    from diffprune.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"^stage 'evaluate@teacher' runs in one process: launch it without"):
        _run_stage_once("evaluate@teacher", tmp_path, lambda: {})
    assert _run_stage_once("teacher", tmp_path, lambda: {"ran": True}) == {"ran": True}
    assert not (tmp_path / ".work" / "locks").exists(), "a non-main process takes no stage lock"
