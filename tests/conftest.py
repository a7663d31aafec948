"""Shared fixtures: tiny seeded models and a tiny pipeline config in a temporary project folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from diffprune.env import quiet_defaults

quiet_defaults()
# one thread count for this process and the CLI subprocesses, so float reductions match bit for bit;
# under pytest-xdist (`make test`: a worker per core) one thread each: two workers of two OpenMP threads
# on 2 cores took 5x as long in the torch-heavy tests (test_experts_budget: 36 s -> 190 s)
if "PYTEST_XDIST_WORKER" in os.environ:  # not setdefault: the controller process set it to 2 before us
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]

# The longest test files (measured on 2 cores, whole-file seconds, longest first). `make test` hands
# whole files to the xdist workers in collection order (--dist loadfile --no-loadscope-reorder): the
# long ones go first, so that no worker is left idle while the other runs a long file at the end
# (by default xdist orders files by test count, which put test_workspace.py last: the whole suite took
# 633 s that way and 552 s this way, on the same commit and machine).
LONGEST_FIRST = ("test_pipeline.py", "test_workspace.py", "test_reliability.py", "test_dask.py", "test_freshness.py",
                 "test_stack.py", "test_sd_family.py", "test_ldm_family.py", "test_tracking.py", "test_hostile.py",
                 "test_experts_budget.py", "test_experts.py", "test_dit_family.py", "test_graph.py",
                 "test_registries.py", "test_versioning.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order

TINY_TEACHER = {
    "block_out_channels": [8, 16, 16],
    "attention": [False, True, False],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "steps": 6,
    "batch_size": 16,
    "checkpoint_every": 3,
    "warmup_steps": 1,
}

TINY_PARAMS = {
    "project": {"device": "cpu", "seed": 0, "mixed_precision": "no"},
    "data": {"source": "digits", "image_size": 8, "max_images": 240, "ref_fraction": 0.25},
    "teacher": TINY_TEACHER,
    "evaluate": {"sampler": "ddim", "steps": 4, "num_samples": 40, "batch_size": 40, "seeds": [0], "grid_size": 16,
                 "latency_batch": 4, "latency_repeats": 1, "feature_epochs": 2, "min_feature_accuracy": 0.0,
                 "inception_weights": None},
    "register": {"model_name": "tiny-teacher", "experiment": "tiny"},
    "taylor": {"importance": "diff-pruning", "ratio": 0.3, "threshold": 0.05, "batch_size": 16, "max_timesteps": 20,
               "seed": 0},
    "finetune": {"fraction": 0.5, "batch_size": 16, "checkpoint_every": 2, "model_name": "tiny-pruned",
                 "lr": 0.001, "warmup_steps": 0, "ema_decay": 0.9, "seed": 0},
    "dipgo": {"target_ratio": 0.5, "steps": 3, "batch_size": 2, "pool_size": 4, "dim": 8, "model_name": "tiny-dipgo",
              "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0001, "alpha_s": 1.0, "loss": "ssim", "tolerance": 0.1,
              "warmup_steps": 0,
              "seed": 0},
    "intervals": {"grid": 6, "k": 2, "batches": 1, "batch_size": 8, "min_size": 1, "seed": 0},
    "experts": {"fraction": 0.5, "batch_size": 8, "checkpoint_every": 2, "lr": 0.001, "ema_decay": 0.9,
                "min_width": 0.25, "depth_drop_prob": 0.2, "seed": 0},
    "router": {"budget": 0.7, "steps": 2, "batch_size": 4, "hidden": 8, "lr": 0.01, "resource_weight": 2.0,
               "temperature": 0.5, "seed": 0},
    "prune_experts": {"fraction": 0.34, "batch_size": 8, "checkpoint_every": 2, "lr": 0.0005, "ema_decay": 0.9,
                      "model_name": "tiny-experts", "seed": 0},
    # two nets, two skip ratios: the pipeline's stack stage in seconds (tests/test_stack.py tries every net)
    "stack": {"budget": 0.5, "nets": ["teacher", "diff-pruning"], "skip_ratios": [1.0, 0.5], "min_steps": 2,
              "validation_samples": 8, "model_name": "tiny-stack"},
}


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (every flow test shares it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> dict[str, str]:
    """Environment for a CLI subprocess to run its flow on the session's test server: a fresh
    ephemeral server (a new PREFECT_HOME) takes ~27 s to start on 2 cores (`make demo` still uses one)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": str(PREFECT_API_URL.value())}


@pytest.fixture
def tiny_unet():
    from diffprune.config import DataConfig, TeacherConfig
    from diffprune.models.unet import build_unet

    torch.manual_seed(0)
    return build_unet(TeacherConfig(**{k: v for k, v in TINY_TEACHER.items() if k in
                                       ("block_out_channels", "attention", "layers_per_block", "norm_num_groups")}),
                      DataConfig()).eval()


@pytest.fixture
def tiny_scheduler():
    from diffprune.config import TeacherConfig
    from diffprune.models.unet import build_scheduler

    return build_scheduler(TeacherConfig())


def make_project(root: Path, overrides: dict | None = None, stages: bool = True, code: bool = False) -> Path:
    """A project folder with dvc.yaml and a tiny params.yaml (and a copy of the package: the code
    files dvc.yaml lists as dependencies, for ``dvc repro``, with the benchmark results the ``report``
    stage depends on)."""
    root.mkdir(parents=True, exist_ok=True)
    params = {k: dict(v) for k, v in TINY_PARAMS.items()}
    for k, v in (overrides or {}).items():
        params.setdefault(k, {}).update(v)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if stages:
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    if code:
        shutil.copytree(REPO / "diffprune", root / "diffprune", ignore=shutil.ignore_patterns("__pycache__"))
        from diffprune.workspace import copy_benchmarks

        copy_benchmarks(REPO, root)
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


# ----------------------------------------------------------------------------- the latent families

# the stages a latent family's test workspace runs (tests/test_{dit,sd,ldm}_family.py), in order
LATENT_STAGES = ("data", "latents", "features", "teacher", "evaluate@teacher", "dipgo", "evaluate@dipgo", "taylor",
                 "finetune", "evaluate@finetune")


def run_stage(p, root: Path, name: str, **kwargs) -> dict:
    """Stage ``name`` (or ``evaluate@TARGET``) of ``p.teacher.family``, quietly."""
    from diffprune.stages import get_stage

    base, _, target = name.partition("@")
    return get_stage(base)(p, root, progress=False, **({"target": target} if target else {}), **kwargs)


def latent_workspace(root: Path, overrides: dict) -> tuple:
    """``(params, root, {stage: result})`` after :data:`LATENT_STAGES` under ``root``."""
    from diffprune.config import load_params

    p = load_params(None, overrides)
    return p, root, {name: run_stage(p, root, name) for name in LATENT_STAGES}


_FRESH = """
import json, sys, numpy, torch, mlflow.pyfunc
from diffprune.pipelines import pipeline_from_registry
models, call, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name, uri in models.items():
    numpy.save(f"{out}/{name}.pyfunc.npy", mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"}).predict(
        {"num_images": 3, "seed": 5}))
    if call is not None:
        pipe = pipeline_from_registry(uri)
        numpy.save(f"{out}/{name}.pipe.npy",
                   pipe(**call, generator=torch.Generator().manual_seed(3), output_type="np").images)
        print("NET", name, type(getattr(pipe, "transformer", None) or pipe.unet).__name__)
assert "diffprune.stages" not in sys.modules  # the loaders alone
"""


def registered_models_in_a_fresh_process(p, root: Path, monkeypatch, out: Path, call: Optional[dict]) -> dict:
    """Register the workspace's three compressed models (Diff-Pruning's ``finetune``, ``dipgo``,
    ``experts``), then, in ONE fresh process that imports only the loaders, sample each from MLflow
    (its pyfunc: 3 images, seed 5) and, with ``call``, from its diffusers pipeline
    (``pipelines.pipeline_from_registry``; ``pipe(**call)``, seed 3). Returns ``{name: {"pyfunc",
    "pipe", "net"}}`` and checks the pyfunc images equal the library's own, bit for bit."""
    import json
    import subprocess
    import sys

    import mlflow
    import numpy as np

    from diffprune.models.unet import sampling_scheduler
    from diffprune.sampling import sample
    from diffprune.stages.core import get_target, target_paths
    from diffprune.targets import load_target

    for var in ("MLFLOW_TRACKING_URI", "DIFFPRUNE_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    names = ("finetune", "dipgo", "experts")
    uris = {n: run_stage(p, root, "register", target=n)["model_uri"] for n in names}
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(uris), json.dumps(call), str(out)], env=env,
                       capture_output=True, text=True, cwd=out, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    nets = dict(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("NET "))
    got = {}
    for n in names:
        m = load_target(get_target(n, p.teacher.family).kind, target_paths(root, n, p.teacher.family))
        x = sample(m.denoiser, sampling_scheduler(m.scheduler_config, "ddim"), num_images=3,
                   sample_shape=m.sample_shape, steps=p.evaluate.steps, seed=5)
        want = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(np.load(out / f"{n}.pyfunc.npy"), want, err_msg=n)
        got[n] = {"loaded": m, "net": nets.get(n),
                  "pipe": np.load(out / f"{n}.pipe.npy") if call is not None else None}
    return got


def house_images(m, steps: int, seed: int = 3):
    """The library's sampler's 3 images of a loaded target in [0, 1], ``(3, H, W, C)`` (a pipeline's
    ``output_type="np"``)."""
    from diffprune.models.unet import sampling_scheduler
    from diffprune.sampling import sample

    x = sample(m.denoiser, sampling_scheduler(m.scheduler_config, "ddim"), num_images=3, sample_shape=m.sample_shape,
               steps=steps, seed=seed, batch_size=3)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
