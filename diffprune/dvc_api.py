"""DVC's Python API (``dvc.repo.Repo``) in one long-lived child process per repository root.

A flow asks ``dvc status`` and runs ``dvc commit`` once or twice per stage. As ``dvc`` commands each
costs a fresh interpreter importing DVC: 1.2 s a status and 1.7 s a commit on a 2-core machine, 60 s
of a 100 s tiny pipeline run, all of it under the one ``dvc`` lock. Through the API in a process
that has imported DVC once, each costs 0.03-0.2 s. The API resolves stage names against the working
directory, which a process running stages in threads must not change; hence a child whose working
directory is the root. Only :mod:`diffprune.versioning` calls this.

Protocol: one JSON request a line on the child's stdin (``{"op": "status"|"commit", "targets": [...]}``),
one JSON reply a line on a descriptor of its own (what DVC prints goes to stderr, never into a
reply). The child ends when its stdin closes, so it never outlives the process that started it.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

COMMAND = [sys.executable, "-m", "diffprune.dvc_api"]  # the child; its reply descriptor is appended
_CHILDREN: dict[str, tuple[subprocess.Popen, Any]] = {}
_GUARD = threading.Lock()


def call(root: str | Path, op: str, targets: list[str], env: dict[str, str]) -> tuple[bool, Any]:
    """Run ``op`` on ``targets`` in ``root``'s child: ``(True, result)`` or ``(False, error text)``."""
    key = f"{os.getpid()}:{Path(root).resolve()}"  # a forked process starts its own: pipes are not shared
    with _GUARD:  # one request at a time per process: replies are read in order
        child, err = _child(key, env)
        try:
            child.stdin.write(json.dumps({"op": op, "targets": targets}) + "\n")
            child.stdin.flush()
            line = child.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:  # the child died: report its last words, start a fresh one next time
            _CHILDREN.pop(key, None)
            child.wait(timeout=10)
            err.seek(0)
            tail = "\n".join(err.read().decode(errors="replace").strip().splitlines()[-10:])
            return False, f"the DVC API process ended (exit {child.returncode}): {tail}"
    reply = json.loads(line)
    return reply["ok"], reply["result"] if reply["ok"] else reply["error"]


def _child(key: str, env: dict[str, str]) -> tuple[subprocess.Popen, Any]:
    got = _CHILDREN.get(key)
    if got is not None and got[0].poll() is None:
        return got
    err = tempfile.TemporaryFile()
    read_fd, write_fd = os.pipe()
    root = key.split(":", 1)[1]
    child = subprocess.Popen([*COMMAND, str(write_fd)], cwd=root, env=env,
                             stdin=subprocess.PIPE, stdout=err, stderr=err, pass_fds=(write_fd,), text=True)
    os.close(write_fd)
    child.stdout = os.fdopen(read_fd, "r")  # replies; DVC's own output goes to ``err``
    _CHILDREN[key] = (child, err)
    return child, err


@atexit.register
def close_all() -> None:
    """End every child (closing its stdin ends its loop)."""
    with _GUARD:
        for key, (child, err) in _CHILDREN.items():
            if not key.startswith(f"{os.getpid()}:"):
                continue  # a parent's child (inherited through a fork): the parent ends it
            for stream in (child.stdin, child.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
            err.close()
        _CHILDREN.clear()


def _run(op: str, targets: list[str]) -> Any:
    from dvc.repo import Repo

    with Repo(".") as repo:
        if op == "status":
            return repo.status(targets=targets or None)
        if op == "commit":  # as `dvc commit --force [TARGETS]`: each target in turn, all when none
            for target in targets or [None]:
                repo.commit(target, force=True, relink=True)
            return None
    raise ValueError(f"unknown op {op!r}")


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += f": {e.__cause__}"
    return text


def serve(reply_fd: int) -> None:
    """The child's loop: answer requests from stdin until it closes."""
    replies = os.fdopen(reply_fd, "w")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": True, "result": _run(request["op"], list(request["targets"]))}
        except Exception as e:  # DVC's errors and any other: the caller raises it, naming the command
            reply = {"ok": False, "error": _error(e)}
        replies.write(json.dumps(reply, default=str) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
