"""The flow on a local Dask cluster (prefect-dask) of 2 worker processes: the three method branches
run at once in other processes, a stage lock held by another process holds its stage back, and a
second run finds every stage recorded in dvc.lock."""

from __future__ import annotations

import os
import threading
import time

import pytest

from diffprune.locks import stage_lock

from .conftest import make_project

BRANCHES = {"taylor": ["taylor", "finetune"], "dipgo": ["dipgo"],
            "experts": ["intervals", "experts", "router", "prune-experts"]}
HOLD_UNTIL = "taylor"  # the test process holds dipgo's lock until this stage is recorded in dvc.lock


@pytest.fixture(scope="module")
def dask_run(tmp_path_factory, prefect_harness):
    from diffprune.flows.pipeline import prune_pipeline

    root = make_project(tmp_path_factory.mktemp("dask") / "proj",
                        {"evaluate": {"sampler": "ddim"}, "orchestration": {"runner": "dask", "dask_workers": 2}},
                        code=True)
    held, released = threading.Event(), {}

    def hold() -> None:  # the lock is thread-local (filelock): taken and let go in this one thread
        with stage_lock(root, "dipgo"):
            held.set()
            deadline = time.time() + 300
            while time.time() < deadline and f"  {HOLD_UNTIL}:" not in _text(root / "dvc.lock"):
                time.sleep(0.2)
            released["at"] = time.time()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    only = [chain[-1] for chain in BRANCHES.values()]
    try:
        first = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), only=only, push=False)
    finally:
        holder.join()
    second = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), only=["dipgo"], push=False)
    return first, second, released["at"]


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def _window(outcomes: dict, stages: list[str]) -> tuple[float, float]:
    return min(outcomes[s]["start"] for s in stages), max(outcomes[s]["end"] for s in stages)


def test_the_method_branches_run_at_once_in_dask_worker_processes(dask_run):
    first, _, _ = dask_run
    out = first["outcomes"]
    assert set(first["ran"]) == {"data", "teacher", *(s for chain in BRANCHES.values() for s in chain)}
    pids = {o["pid"] for o in out.values()}
    assert os.getpid() not in pids and len(pids) == 2  # every stage in a worker process; both workers used
    windows = {b: _window(out, chain) for b, chain in BRANCHES.items()}
    overlaps = [(a, b) for a in windows for b in windows if a < b
                and windows[a][0] < windows[b][1] and windows[b][0] < windows[a][1]]
    assert len(overlaps) >= 2, windows  # with 2 workers, each branch overlaps at least one other
    teacher_end = out["teacher"]["end"]
    assert all(out[chain[0]]["start"] >= teacher_end for chain in BRANCHES.values())  # the graph's edges hold


def test_a_stage_lock_held_by_another_process_holds_that_stage_back(dask_run):
    first, _, released = dask_run
    out = first["outcomes"]
    assert out["dipgo"]["locked"] >= released        # it waited for the test process's lock ...
    assert out[HOLD_UNTIL]["end"] <= released         # ... while another branch ran a stage to the end
    assert out["dipgo"]["start"] < out[HOLD_UNTIL]["end"]  # (dipgo was waiting on the lock meanwhile)


def test_a_second_run_finds_every_stage_recorded(dask_run):
    _, second, _ = dask_run
    assert second["ran"] == [] and second["skipped"] == ["data", "teacher", "dipgo"]
    assert all(o["reason"] == "up to date in dvc.lock" for o in second["outcomes"].values())
