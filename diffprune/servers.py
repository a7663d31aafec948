"""The servers ``make ui`` starts, recorded by process id, so ``make ui-stop`` stops exactly those.

``python -m diffprune.servers start DIR NAME -- COMMAND [ARGS...]`` starts COMMAND detached (its own
session, the defaults of :mod:`diffprune.env` set), output in ``DIR/NAME.log``, and records it in
``DIR/NAME.pid`` (JSON: pid, the process's start time, argv). ``python -m diffprune.servers stop DIR
NAME...`` stops each recorded process, with the processes it started, only when it still runs and
is still that command (same start time, same command line: a reused pid is left alone), then removes
the record. Nothing is matched by name pattern.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import psutil

STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL for what is still alive after this
START_GRACE_S = 0.5    # a command that exits this fast failed to start (port taken, bad option)


def record_path(folder: str | Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"server name {name!r}: expected a plain file name")
    return Path(folder) / f"{name}.pid"


def read_record(folder: str | Path, name: str) -> dict | None:
    """The record of server ``name`` in ``folder``; None when there is none, or it is unreadable."""
    try:
        rec = json.loads(record_path(folder, name).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("pid"), int) and isinstance(rec.get("argv"), list)
    return rec if ok else None


def same_command(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """Whether a live ``cmdline`` is the recorded ``argv``: it ends with argv's arguments, and runs
    argv's program (itself, or a script run by its interpreter: ``python .venv/bin/mlflow ...``)."""
    if not argv or len(cmdline) < len(argv):
        return False
    tail_ok = list(cmdline[len(cmdline) - len(argv) + 1:]) == list(argv[1:])
    program = Path(argv[0]).name
    return tail_ok and any(Path(c).name == program for c in cmdline[: len(cmdline) - len(argv) + 1])


def live_process(rec: dict) -> psutil.Process | None:
    """The recorded process when it still runs and is still the recorded command; else None."""
    try:
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - float(rec.get("create_time", -1))) > 0.05:
            return None  # the pid was reused by a later process
        return proc if _running(proc) and same_command(proc.cmdline(), rec["argv"]) else None
    except (psutil.Error, TypeError, ValueError):
        return None


def start(folder: str | Path, name: str, argv: Sequence[str]) -> str:
    """Start ``argv`` detached, logging to ``folder/NAME.log``, and record it; returns what happened.

    Raises:
        RuntimeError: the command exited at once (the end of its log in the message).
    """
    from .env import quiet_defaults

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rec = read_record(folder, name)
    if rec is not None and live_process(rec) is not None:
        return f"{name}: already running (pid {rec['pid']})"
    quiet_defaults()
    log = folder / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    rec = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "argv": list(argv)}
    tmp = record_path(folder, name).with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(record_path(folder, name))
    time.sleep(START_GRACE_S)
    if proc.poll() is not None:
        record_path(folder, name).unlink(missing_ok=True)
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
        raise RuntimeError(f"{name}: exited at once (exit {proc.returncode}); end of {log}:\n{tail}")
    return f"{name}: started (pid {proc.pid}, log {log})"


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie has exited: only unreaped
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def stop(folder: str | Path, name: str, timeout: float = STOP_TIMEOUT_S) -> str:
    """Stop the recorded server ``name`` and the processes it started; remove its record."""
    path = record_path(folder, name)
    rec = read_record(folder, name)
    if rec is None:
        path.unlink(missing_ok=True)
        return f"{name}: nothing recorded ({path}): not started by make ui"
    proc = live_process(rec)
    path.unlink(missing_ok=True)
    if proc is None:
        return f"{name}: pid {rec['pid']} is gone or now another program: nothing stopped"
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        procs = [proc]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    for p in _wait_gone(procs, timeout):
        try:
            p.kill()
        except psutil.Error:
            pass
    return f"{name}: stopped pid {rec['pid']}" + (f" and {len(procs) - 1} child process(es)" if len(procs) > 1 else "")


USAGE = ("usage: python -m diffprune.servers start DIR NAME -- COMMAND [ARGS...]\n"
         "       python -m diffprune.servers stop DIR NAME [NAME...]")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) >= 5 and args[0] == "start" and args[3] == "--":
            print(start(args[1], args[2], args[4:]))
            return 0
        if len(args) >= 3 and args[0] == "stop":
            for name in args[2:]:
                print(stop(args[1], name))
            return 0
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
