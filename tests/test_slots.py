"""GPU slots: CUDA stages hold a slot of the Prefect global concurrency limit `gpu`; CPU runs ask no server.

Devices are passed as strings: nothing here touches torch.cuda."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from diffprune import slots
from diffprune.config import ConfigError
from tests.conftest import make_project

HOLD_S = 1.0  # how long a holder keeps the one slot while the other asks for it


def _read_limit():
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(slots.GPU_LIMIT)
        except ObjectNotFound:
            return None


def _delete_limit() -> None:
    from prefect.client.orchestration import get_client

    if _read_limit() is not None:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(slots.GPU_LIMIT)


@pytest.fixture
def no_gpu_limit(prefect_harness):
    """The test server without the `gpu` limit, before and after the test."""
    _delete_limit()
    yield
    _delete_limit()


def _two_concurrent_holders(device: str, *, meet: bool) -> int:
    """How many of two tasks, submitted at once on a thread runner, held a slot for ``device`` at once.

    With ``meet`` each holder waits (up to a minute) inside its slot for the other to arrive: only two
    slots let both in, so a limit that serialises them breaks the barrier and fails the test rather
    than depending on how fast a loaded machine starts the second task."""
    import threading

    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    barrier, lock, inside = threading.Barrier(2, timeout=60), threading.Lock(), []
    most = [0]

    @task
    def hold(i: int) -> None:
        with slots.gpu_slot("teacher", device):
            with lock:
                inside.append(i)
                most[0] = max(most[0], len(inside))
            if meet:
                barrier.wait()
            else:
                time.sleep(HOLD_S)
            with lock:
                inside.remove(i)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def two() -> None:
        for f in [hold.submit(i) for i in range(2)]:
            f.result()

    two()
    return most[0]


def test_every_stage_is_classified_once():
    from diffprune.stages import STAGES, _load_all

    from diffprune.stages import NAMES

    _load_all()
    assert set(NAMES) == set(STAGES) and list(NAMES) == sorted(NAMES)  # the names known before importing them
    assert slots.DEVICE_STAGES | slots.HOST_STAGES == set(STAGES)
    assert not slots.DEVICE_STAGES & slots.HOST_STAGES
    assert slots.needs_slot("evaluate@teacher", "cuda:1") and slots.needs_slot("experts", "cuda")
    assert not slots.needs_slot("register@teacher", "cuda") and not slots.needs_slot("features", "cuda")
    assert not any(slots.needs_slot("teacher", d) for d in ("cpu", "mps"))


def test_cpu_and_mps_take_no_slot_and_ask_no_server(monkeypatch):
    import prefect.concurrency.sync as sync

    def refuse(*a, **k):
        raise AssertionError("a CPU stage asked the server for a slot")

    monkeypatch.setattr(sync, "concurrency", refuse)
    for device in ("cpu", "mps"):
        with slots.gpu_slot("teacher", device) as held:
            assert held is False
    with slots.gpu_slot("report", "cuda") as held:  # no device work: no slot either
        assert held is False


def test_cpu_stages_run_concurrently_with_no_limit(no_gpu_limit):
    assert _two_concurrent_holders("cpu", meet=True) == 2


def test_one_slot_serialises_cuda_stages_two_let_them_overlap(no_gpu_limit):
    assert slots.ensure_gpu_limit(1).startswith("created")
    assert _two_concurrent_holders("cuda", meet=False) == 1, "two CUDA stages held the one slot at once"
    assert slots.ensure_gpu_limit(2).startswith("updated")
    assert _two_concurrent_holders("cuda:0", meet=True) == 2  # a broken barrier fails it instead
    assert _read_limit().active_slots == 0  # both released


def test_a_cuda_stage_without_the_limit_names_diffprune_slots(no_gpu_limit):
    from diffprune.tasks.stages import is_transient

    with pytest.raises(ConfigError) as info:
        with slots.gpu_slot("evaluate@teacher", "cuda"):
            raise AssertionError("ran without a slot")
    message = str(info.value)
    assert "\n" not in message and "`diffprune slots`" in message and "'gpu'" in message
    assert "project.device = 'cuda'" in message
    assert not is_transient(info.value)  # the task does not retry it


def test_run_stage_takes_the_slot_of_its_stage_and_device(project, monkeypatch):
    import contextlib

    from diffprune.tasks import stages as tasks

    seen = []

    @contextlib.contextmanager
    def fake_slot(stage, device):
        seen.append((stage, device))
        yield False

    monkeypatch.setattr(tasks, "gpu_slot", fake_slot)
    monkeypatch.setattr(tasks, "get_stage", lambda base: lambda p, root, **kw: {"target": kw.get("target")})
    out = tasks.run_stage.fn("evaluate@finetune", str(project / "params.yaml"), str(project))
    assert out == {"target": "finetune"} and seen == [("evaluate", "cpu")]


def test_slots_command_creates_then_updates_the_limit(no_gpu_limit, tmp_path):
    from diffprune.cli import app

    # the server's host need not have the stages' device: only the orchestration section is read
    root = make_project(tmp_path / "p", {"orchestration": {"gpu_slots": 2}, "project": {"device": "cuda:7"}},
                        stages=False)
    runner = CliRunner()
    first = runner.invoke(app, ["slots", "--root", str(root)])
    assert first.exit_code == 0 and "created" in first.output and "2 slot(s)" in first.output
    again = runner.invoke(app, ["slots", "--root", str(root)])
    assert again.exit_code == 0 and "unchanged" in again.output
    bigger = runner.invoke(app, ["slots", "--root", str(root), "--size", "3", "--wait", "5"])
    assert bigger.exit_code == 0 and "2 slot(s) -> 3 slot(s)" in bigger.output
    limit = _read_limit()
    assert limit.limit == 3 and limit.active
    bad = runner.invoke(app, ["slots", "--size", "0"])
    assert bad.exit_code == 2
    zero = make_project(tmp_path / "z", {"orchestration": {"gpu_slots": 0}}, stages=False)
    refused = runner.invoke(app, ["slots", "--root", str(zero)])
    assert refused.exit_code == 2 and "orchestration.gpu_slots = 0" in refused.output
    assert _read_limit().limit == 3
