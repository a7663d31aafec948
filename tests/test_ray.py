"""The flow on a local Ray instance (prefect-ray, the optional extra ``diffprune[ray]``): skipped where it
is not installed. The method branches run in Ray worker processes and their outputs are recorded."""

from __future__ import annotations

import os

import pytest

from .conftest import make_project

pytest.importorskip("prefect_ray", reason="the optional extra diffprune[ray] is not installed")


def test_branches_run_in_ray_workers_and_are_recorded(tmp_path, prefect_harness):
    from diffprune.flows.pipeline import prune_pipeline

    root = make_project(tmp_path / "proj", {"evaluate": {"sampler": "ddim"}, "orchestration": {"runner": "ray"}},
                        code=True)
    try:
        first = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), only=["dipgo", "taylor"],
                               push=False)
    finally:
        import ray

        ray.shutdown()
    out = first["outcomes"]
    assert set(first["ran"]) == {"data", "teacher", "taylor", "dipgo"}
    assert os.getpid() not in {o["pid"] for o in out.values()}  # every stage in a Ray worker
    assert out["taylor"]["start"] >= out["teacher"]["end"] and out["dipgo"]["start"] >= out["teacher"]["end"]
    assert (root / "dvc.lock").read_text().count("cmd:") >= 4
