"""Prefect tasks: thin adapters around the library's stage functions.

Each task loads the params by path, calls the stage function (the same one the DVC stage's
``diffprune stage NAME`` calls), and returns small values (paths, numbers), never models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from ..config import ConfigError, load_params
from ..stages import get_stage


def _progress_reporter(name: str):
    """A ``(done, total)`` callback that shows progress in the Prefect UI."""
    state: dict[str, Any] = {}

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(1, total)
        try:
            if "id" not in state:
                state["id"] = create_progress_artifact(progress=pct, description=f"{name}: {done}/{total}")
            else:
                update_progress_artifact(state["id"], progress=pct, description=f"{name}: {done}/{total}")
        except Exception:  # progress display must never fail a training run
            pass

    return report


def _small(out: dict) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, (str, int, float, bool)) or v is None}


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.2,
    retry_condition_fn=lambda task, task_run, state: not isinstance(state.result(raise_on_failure=False), ConfigError),
    persist_result=False,
    # prints inside a stage stay prints: library code that captures stdout (dill's dis.dis, run by
    # `datasets` fingerprinting) must not have them rerouted into the flow's log
    log_prints=False,
)
def run_stage(name: str, params_path: str, root: str, expert: int | None = None) -> dict:
    """Run pipeline stage ``name`` (``evaluate@teacher`` = stage evaluate on target teacher); per-expert
    stages take ``expert`` to train one expert only."""
    base, _, target = name.partition("@")
    kwargs: dict[str, Any] = {"on_progress": _progress_reporter(name if expert is None else f"{name}[{expert}]"),
                              "progress": True}
    if target:
        kwargs["target"] = target
    if expert is not None:
        kwargs["expert"] = expert
    out = get_stage(base)(load_params(params_path), Path(root), **kwargs)
    return _small(out)
