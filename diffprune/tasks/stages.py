"""Prefect tasks: thin adapters around the library's stage functions.

Each task loads the params by path, calls the stage function (the same one the DVC stage's
``diffprune stage NAME`` calls), and returns small values (paths, numbers), never models.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from ..config import ConfigError, load_params
from ..io import ArtifactError
from ..slots import gpu_slot
from ..stages import get_stage

# Never retried: the same input fails the same way again (ValueError covers ConfigError, DataError and
# the registry's refusals).
PERMANENT: tuple[type[BaseException], ...] = (ConfigError, ArtifactError, ValueError, NotImplementedError,
                                              PermissionError, FileNotFoundError, IsADirectoryError,
                                              NotADirectoryError)
# Retried: errors of the machine or the network that a later attempt may not meet.
TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BlockingIOError, InterruptedError)
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE}
TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "temporarily unavailable",
                      "connection reset", "too many requests")


def is_transient(exc: BaseException | None) -> bool:
    """Whether a failed stage is worth retrying: only errors of the moment, never of the input.

    Transient: connection and timeout errors (``ConnectionError``, ``TimeoutError``, a lock timeout),
    an ``OSError`` whose errno is one of :data:`TRANSIENT_ERRNOS` (busy, again, reset, unreachable),
    and any error (SQLite, SQLAlchemy, MLflow) whose message says the database is locked or the
    service is temporarily unavailable. Never: :data:`PERMANENT` (config, artifact, value errors,
    not implemented, permission denied, not found) nor anything else (bugs do not heal on retry).
    The cause chain is followed, so an MLflow error raised from a locked SQLite database counts.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PERMANENT):
            return False
        if isinstance(exc, TRANSIENT) or (isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS):
            return True
        if any(m in str(exc).lower() for m in TRANSIENT_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed run only on a transient error."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself is unreadable: do not guess
        return False
    return isinstance(exc, BaseException) and is_transient(exc)


def _progress_reporter(name: str, every: float = 5.0):
    """A ``(done, total)`` callback for the Prefect UI: a progress artifact, and a line in the task's
    log each time another ``every`` percent is done (the task log gets lines, not a tqdm bar)."""
    state: dict[str, Any] = {"logged": 0.0}

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(1, total)
        if pct < state["logged"] + every and done < total:
            return
        state["logged"] = pct - pct % every
        try:
            get_run_logger().info("%s: %d/%d (%.0f%%)", name, done, total, pct)
            if "id" not in state:
                state["id"] = create_progress_artifact(progress=pct, description=f"{name}: {done}/{total}")
            else:
                update_progress_artifact(state["id"], progress=pct, description=f"{name}: {done}/{total}")
        except Exception:  # progress display must never fail a training run
            pass

    return report


def _small(out: dict) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, (str, int, float, bool)) or v is None}


# the retry policy of every task that runs a stage (here and in diffprune.flows.graph)
RETRY_OPTIONS: dict[str, Any] = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.2,
    retry_condition_fn=_retry_condition,  # transient errors only (is_transient)
    persist_result=False,
    # prints inside a stage stay prints: library code that captures stdout (dill's dis.dis, run by
    # `datasets` fingerprinting) must not have them rerouted into the flow's log
    log_prints=False,
)


@task(**RETRY_OPTIONS)
def run_stage(name: str, params_path: str, root: str, expert: int | None = None) -> dict:
    """Run pipeline stage ``name`` (``evaluate@teacher`` = stage evaluate on target teacher); per-expert
    stages take ``expert`` to train one expert only. A stage training or sampling on a CUDA device
    first takes a slot of the ``gpu`` concurrency limit (:func:`diffprune.slots.gpu_slot`)."""
    base, _, target = name.partition("@")
    # progress as log lines (the reporter), not a tqdm bar: the terminal shows the task's log too
    kwargs: dict[str, Any] = {"on_progress": _progress_reporter(name if expert is None else f"{name}[{expert}]"),
                              "progress": False}
    if target:
        kwargs["target"] = target
    if expert is not None:
        kwargs["expert"] = expert
    p = load_params(params_path)
    with gpu_slot(base, p.project.device):
        out = get_stage(base)(p, Path(root), **kwargs)
    return _small(out)
