"""The flow on a local Dask cluster (prefect-dask) of 2 worker processes: the three method branches
run at once in other processes, a stage lock held by another process holds its stage back, and a
second run, in this process, finds every stage the workers ran recorded in dvc.lock."""

from __future__ import annotations

import contextvars
import os
import threading
import time

import pytest
import yaml

from diffprune.locks import stage_lock

from .conftest import make_project

BRANCHES = {"taylor": ["taylor", "finetune"], "dipgo": ["dipgo"],
            "experts": ["intervals", "experts", "router", "prune-experts"]}
HOLD_S = 3.0  # the test process lets go of dipgo's lock this long after dipgo's task started


@pytest.fixture(scope="module")
def dask_run(tmp_path_factory, prefect_harness):
    from diffprune.flows.pipeline import prune_pipeline

    root = make_project(tmp_path_factory.mktemp("dask") / "proj",
                        {"evaluate": {"sampler": "ddim"}, "orchestration": {"runner": "dask", "dask_workers": 2}},
                        code=True)
    held, stop, released = threading.Event(), threading.Event(), {}

    def hold() -> None:  # the lock is thread-local (filelock): taken and let go in this one thread
        with stage_lock(root, "dipgo"):
            held.set()
            deadline = time.time() + 300
            while time.time() < deadline and not stop.is_set() and not _running("dipgo"):
                time.sleep(0.2)
            stop.wait(HOLD_S)  # dipgo's task, started in a worker process, now waits on the lock
            released["at"] = time.time()

    holder = threading.Thread(target=contextvars.copy_context().run, args=(hold,))  # the harness's API
    holder.start()
    held.wait()
    only = [chain[-1] for chain in BRANCHES.values()]
    environ = dict(os.environ)
    try:
        first = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), only=only, push=False)
    finally:
        stop.set()  # a failed run does not leave the holder waiting
        holder.join()
    # the main process reads what the workers recorded (the runner is no DVC param: nothing reruns for it)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["orchestration"]["runner"] = "threads"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    second = prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), only=["dipgo"], push=False)
    return first, second, released["at"], environ


def test_the_run_leaves_this_process_environment_as_it_was(dask_run):
    # dask's nanny writes thread caps into it; later subprocesses (and float sums) would differ
    *_, environ = dask_run
    now = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    assert now == {k: v for k, v in environ.items() if k != "PYTEST_CURRENT_TEST"}


def _running(name: str) -> bool:
    """Whether the Prefect API has a task run ``name`` in the Running state."""
    from prefect import get_client
    from prefect.client.schemas.filters import (TaskRunFilter, TaskRunFilterName, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    running = TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))
    with get_client(sync_client=True) as client:
        return bool(client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name]),
                                                                        state=running)))


def _window(outcomes: dict, stages: list[str]) -> tuple[float, float]:
    return min(outcomes[s]["start"] for s in stages), max(outcomes[s]["end"] for s in stages)


def test_the_method_branches_run_at_once_in_dask_worker_processes(dask_run):
    first, *_ = dask_run
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
    first, _, released, _ = dask_run
    out = first["outcomes"]
    assert out["dipgo"]["pid"] != os.getpid()
    assert out["dipgo"]["start"] < released - HOLD_S / 2 < released <= out["dipgo"]["locked"]


def test_a_second_run_finds_every_stage_recorded(dask_run):
    _, second, *_ = dask_run
    assert second["ran"] == [] and second["skipped"] == ["data", "teacher", "dipgo"]
    assert all(o["reason"] == "up to date in dvc.lock" for o in second["outcomes"].values())
