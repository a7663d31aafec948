"""The Prefect flow ``prune-pipeline``: every stage of dvc.yaml, in order, as retryable tasks.

A stage whose inputs (dvc.yaml deps, params) are unchanged since its last success is skipped. At the
end the outputs are versioned (dvc commit + push to the default remote) and a table artifact of the
metrics is published.
"""

from __future__ import annotations

# Absolute imports: Prefect deployments load this file by path (prefect.yaml's entrypoint).

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from diffprune.config import ConfigError, fingerprint, load_params
from diffprune.io import write_json
from diffprune.env import quiet_defaults
from diffprune.report import collect, metrics_table
from diffprune.tasks.stages import run_stage
from diffprune.flows.stamps import input_key, is_fresh, stage_specs, write_stamp

# The stages in run order; dvc.yaml declares the same ones (a test checks it).
PIPELINE: list[str] = [
    "data", "features", "teacher", "taylor", "finetune", "dipgo",
    "intervals", "experts", "router", "prune-experts",
    "evaluate@teacher", "evaluate@finetune", "evaluate@dipgo", "evaluate@experts",
    "register@teacher", "register@finetune", "register@dipgo", "register@experts",
]


def _needed(only: list[str], specs: dict) -> set[str]:
    """``only`` plus every stage whose outputs they depend on."""
    producers = {o: name for name, s in specs.items() for o in s["outs"]}
    need, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name in need:
            continue
        if name not in specs:
            raise ConfigError(f"unknown stage {name!r} (known: {', '.join(specs)})")
        need.add(name)
        for dep in specs[name]["deps"]:
            for out, prod in producers.items():
                if dep == out or dep.startswith(out.rstrip("/") + "/"):
                    todo.append(prod)
    return need


@flow(name="prune-pipeline", log_prints=True)
def prune_pipeline(params_path: str = "params.yaml", root: str = ".", only: Optional[list[str]] = None,
                   push: bool = True) -> dict:
    """Run (or skip, when up to date) every pipeline stage; version outputs; publish the metrics."""
    quiet_defaults()
    log = get_run_logger()
    rootp = Path(root).resolve()
    params = load_params(params_path)
    with _claim_workspace(rootp, params):
        return _pipeline(rootp, params_path, params, only, push, log)


def _pipeline(rootp: Path, params_path: str, params, only: Optional[list[str]], push: bool, log) -> dict:
    specs = stage_specs(rootp)
    missing = [s for s in PIPELINE if s not in specs]
    if missing:
        raise ConfigError(f"dvc.yaml lacks pipeline stages {missing}")
    wanted = _needed(only, specs) if only else set(PIPELINE)
    ran, skipped = [], []
    for name in PIPELINE:
        if name not in wanted:
            continue
        spec = specs[name]
        # one run at a time per stage and workspace: a concurrent run with the same inputs waits,
        # then finds the stage fresh and reuses its outputs instead of computing them again
        with _lock(rootp, name):
            key = input_key(rootp, spec, params)
            if is_fresh(rootp, name, key, spec):
                log.info("skip %s: inputs unchanged since its last success", name)
                skipped.append(name)
                continue
            if name.startswith("register@") and push:
                _version(rootp, [s for s in PIPELINE if s in wanted and s != name and not s.startswith("register@")
                                 and PIPELINE.index(s) < PIPELINE.index(name)], push=False, log=log)
            _run(name, str(Path(params_path).resolve()), rootp)
            write_stamp(rootp, name, key, spec)
        ran.append(name)
    if push and ran:
        _version(rootp, [s for s in PIPELINE if s in wanted], push=True, log=log)
    table = metrics_table(rootp)
    rows = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in collect(rootp)]
    if rows:
        create_table_artifact(table=rows, key="prune-pipeline-metrics", description="diffprune: metrics of every model")
    log.info("metrics:\n%s", table)
    return {"ran": ran, "skipped": skipped, "table": table}


# stages made of independent per-expert parts: one task per expert, run concurrently, then the
# stage itself (which skips the finished experts and assembles what they share)
PER_EXPERT = {"experts", "prune-experts"}


def _run(name: str, params_path: str, root: Path) -> None:
    if name in PER_EXPERT:
        from diffprune.io import read_json

        k = len(read_json(root / "models/intervals/intervals.json")["boundaries"]) + 1
        futures = [run_stage.with_options(name=f"{name}[{e}]").submit(name, params_path, str(root), expert=e)
                   for e in range(k)]
        for f in futures:
            f.result()
    run_stage.with_options(name=name)(name, params_path, str(root))


@contextlib.contextmanager
def _claim_workspace(root: Path, params) -> Iterator[None]:
    """Runs of the SAME config may share a workspace (they reuse each other's stages); a run of a
    different config is refused while another is live, instead of overwriting its outputs."""
    claim = root / ".work" / "locks" / "workspace.json"
    mine = fingerprint(params)
    with _lock(root, "workspace"):
        doc = json.loads(claim.read_text()) if claim.exists() else {"config": mine, "pids": []}
        live = [pid for pid in doc["pids"] if _alive(pid)]
        if live and doc["config"] != mine:
            raise ConfigError(f"workspace {root} is in use by run(s) {live} of another config "
                              f"({doc['config']}, this one is {mine}); run it in another --root")
        write_json(claim, {"config": mine, "pids": [*live, os.getpid()]})
    try:
        yield
    finally:
        with _lock(root, "workspace"):
            doc = json.loads(claim.read_text())
            write_json(claim, {**doc, "pids": [p for p in doc["pids"] if p != os.getpid() and _alive(p)]})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _lock(root: Path, name: str) -> FileLock:
    path = root / ".work" / "locks" / f"{name.replace('@', '--')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _version(root: Path, stages: list[str], push: bool, log: logging.Logger) -> None:
    from diffprune import versioning

    if not (root / ".dvc").exists():
        log.warning("no DVC repository at %s: outputs not versioned (run `make demo` or `dvc init`)", root)
        return
    with _lock(root, "dvc"):  # DVC allows one command at a time per repository
        versioning.commit_and_push(root, stages, push=push)
