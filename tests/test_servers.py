"""`make ui` records the servers it starts by process id; `make ui-stop` stops exactly those."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from diffprune import servers

from .conftest import REPO

SLEEP = shutil.which("sleep")
pytestmark = pytest.mark.skipif(SLEEP is None, reason="needs sleep(1)")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def lookalike():
    """An unrecorded process with the very command line of the recorded one: it must survive."""
    proc = subprocess.Popen([SLEEP, "300"])
    yield proc
    proc.kill()
    proc.wait()


def test_stop_kills_exactly_the_recorded_process(tmp_path, lookalike):
    said = servers.start(tmp_path, "dummy", [SLEEP, "300"])
    rec = json.loads((tmp_path / "dummy.pid").read_text())
    assert said.startswith("dummy: started") and rec["argv"] == [SLEEP, "300"] and _alive(rec["pid"])
    assert servers.start(tmp_path, "dummy", [SLEEP, "300"]) == f"dummy: already running (pid {rec['pid']})"
    assert servers.stop(tmp_path, "dummy") == f"dummy: stopped pid {rec['pid']}"
    deadline = time.monotonic() + 5
    while _alive(rec["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(rec["pid"]) and lookalike.poll() is None
    assert not (tmp_path / "dummy.pid").exists()
    assert servers.stop(tmp_path, "dummy").startswith("dummy: nothing recorded")


@pytest.mark.parametrize("change", [{"argv": [SLEEP, "999"]}, {"create_time": 1.0}])
def test_a_recorded_pid_that_is_another_process_now_is_left_alone(tmp_path, lookalike, change):
    """A pid reused by another program (other command line, or other start time) is not killed."""
    rec = {"pid": lookalike.pid, "create_time": psutil.Process(lookalike.pid).create_time(), "argv": [SLEEP, "300"]}
    assert servers.live_process(rec) is not None
    (tmp_path / "dummy.pid").write_text(json.dumps(rec | change))
    assert "nothing stopped" in servers.stop(tmp_path, "dummy")
    assert lookalike.poll() is None and not (tmp_path / "dummy.pid").exists()


def test_the_children_of_a_recorded_server_stop_with_it(tmp_path):
    script = "import subprocess, sys, time; subprocess.Popen([sys.argv[1], '300']); time.sleep(300)"
    servers.start(tmp_path, "parent", [sys.executable, "-c", script, SLEEP])
    rec = json.loads((tmp_path / "parent.pid").read_text())
    deadline = time.monotonic() + 10
    while not psutil.Process(rec["pid"]).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = psutil.Process(rec["pid"]).children()
    assert servers.stop(tmp_path, "parent").endswith("and 1 child process(es)")
    psutil.wait_procs([child], timeout=5)
    assert not _alive(child.pid) and not _alive(rec["pid"])


def test_a_command_that_exits_at_once_is_an_error_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="exited at once"):
        servers.start(tmp_path, "bad", [sys.executable, "-c", "print('port taken'); raise SystemExit(3)"])
    assert not (tmp_path / "bad.pid").exists() and "port taken" in (tmp_path / "bad.log").read_text()
    assert servers.main(["start", str(tmp_path), "bad", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 1
    assert servers.main(["stop"]) == 2 and servers.main(["stop", str(tmp_path), "../x"]) == 2


def test_the_makefile_stops_servers_by_recorded_pid_only():
    mk = (REPO / "Makefile").read_text()
    ui, stop = mk[mk.index("\nui:"):mk.index("\nui-stop:")], mk[mk.index("\nui-stop:"):mk.index("\nclean:")]
    assert "pkill" not in mk and "killall" not in mk
    assert ui.count("$(SERVERS) start .work ") == 2 and "$(SERVERS) stop .work prefect-server mlflow-ui" in stop
    assert "SERVERS := $(BIN)/python -m diffprune.servers" in mk
