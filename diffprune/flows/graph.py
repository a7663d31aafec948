"""The stages as a task graph: each stage a Prefect task that waits for the stages it depends on.

The graph is dvc.yaml's (a stage depends on the stages producing its deps), so the three method
branches after the teacher, and every evaluation, run at once on the configured task runner
(``orchestration.runner``: Prefect's thread pool, a Dask cluster through prefect-dask, or one stage
at a time). Every stage task decides for itself, under its stage lock, whether ``dvc.lock`` records
it as it is now (:func:`stale`), runs it if not, and records it (``dvc commit -f NAME``, under the
DVC lock: one DVC command at a time per repository). The locks are files, so they hold across
threads, Dask worker processes and other runs alike.

A stage is submitted once the stages it depends on are done. A stage made of independent per-expert
parts (:data:`PER_EXPERT`) is then expanded (the number of experts is in its upstream's output):
one task per expert, then the stage itself, which assembles what they share.

Dask moves task arguments between processes with its own (pickle-based) transport; everything
passed here is small JSON-like values (names, paths, ``dvc status`` entries), and nothing is
persisted that way (``persist_result=False``).
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from diffprune.config import ConfigError, OrchestrationConfig
from diffprune.flows.specs import direct_upstream, stage_specs
from diffprune.locks import stage_lock
from diffprune.tasks.stages import RETRY_OPTIONS, run_stage

# stages made of independent per-expert parts: one task per expert, run concurrently, then the
# stage itself (which skips the finished experts and assembles what they share)
PER_EXPERT = {"experts", "prune-experts"}


def task_runner(cfg: OrchestrationConfig):
    """The Prefect task runner ``orchestration`` names: threads (``max_workers``), Dask (prefect-dask:
    the cluster at ``dask_address``, else a local cluster of ``dask_workers`` worker processes of
    one task each, its dashboard on a free loopback port), Ray (prefect-ray, when installed: the
    cluster at ``ray_address``, else a local one) or one stage at a time."""
    if cfg.runner == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        # dask's nanny caps OMP/MKL/OpenBLAS at 1 thread in the workers by writing them into this
        # process's environment: the workers would sum floats in another order than the thread
        # runner (and every later subprocess of this one would inherit the caps). Workers keep this
        # process's thread settings instead; run_graph restores the environment.
        dask.config.set({"distributed.nanny.pre-spawn-environ": {}})
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": "127.0.0.1:0"})
    if cfg.runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("orchestration.runner = 'ray' needs prefect-ray: pip install 'diffprune[ray]'") from None
        return RayTaskRunner(address=cfg.ray_address) if cfg.ray_address else RayTaskRunner()
    return ThreadPoolTaskRunner(max_workers=1 if cfg.runner == "sequential" else cfg.max_workers)


def run_graph(root: Path, params_path: str, stages: list[str], dirty: dict[str, Any],
              cfg: OrchestrationConfig) -> dict[str, dict]:
    """Run ``stages`` (dvc.yaml order) as the subflow ``prune-stages`` on ``cfg``'s task runner;
    returns each stage's outcome (:func:`stage_task`)."""
    environ = dict(os.environ)
    try:
        graph = stage_graph.with_options(task_runner=task_runner(cfg))
        return graph(str(root), params_path, stages, dirty)
    finally:  # what a task runner set in this process's environment (dask's nanny) ends with the run
        os.environ.clear()
        os.environ.update(environ)


@flow(name="prune-stages", log_prints=True)
def stage_graph(root: str, params_path: str, stages: list[str], dirty: dict[str, Any]) -> dict[str, dict]:
    """Run every stage once the stages it depends on are done; returns each stage's outcome."""
    specs = stage_specs(Path(root))
    deps = {s: sorted(direct_upstream(s, specs) & set(stages)) for s in stages}
    return _Scheduler(root, params_path, dirty, deps).run(stages)


class _Scheduler:
    """Submits a stage to the task runner only once its upstream stages are done (a task waiting on
    futures would hold a runner slot), with their finished futures as its ``upstream`` argument (the
    edges of the Prefect run graph). A per-expert stage, when ready and stale, is expanded first into
    one task per expert, which the stage then depends on. When a stage fails, what depends on it is
    not started, every other stage runs to its end, and then the first failure is raised."""

    def __init__(self, root: str, params_path: str, dirty: dict[str, Any], deps: dict[str, list[str]]) -> None:
        self.root, self.params_path, self.dirty, self.deps = root, params_path, dirty, deps
        self.futures: dict[str, Any] = {}
        self.done: "queue.Queue[str]" = queue.Queue()
        self.finished: set[str] = set()
        self.failed: list[str] = []
        self.expanded: set[str] = set()

    def run(self, stages: list[str]) -> dict[str, dict]:
        pending, running = list(stages), set()
        while True:
            while ready := [n for n in pending if all(d in self.finished for d in self.deps[n])]:
                for name in ready:
                    pending.remove(name)
                    parts = self._expand(name)
                    if parts:  # the stage waits for its experts now
                        pending[:0] = [*parts, name]
                        break  # ready again from the new pending list
                    self._submit(name)
                    running.add(name)
            if not running:  # everything ran, or what is left depends on a failed stage
                break
            name = self.done.get()
            running.discard(name)
            future = self.futures[name]
            future.wait()  # done: this caches its final state (no API call)
            if future.state.is_completed():
                self.finished.add(name)
            else:
                self.failed.append(name)
        if self.failed:
            self.futures[self.failed[0]].result()  # raises the stage's error
        return {n: f.result() for n, f in self.futures.items() if "[" not in n}

    def _expand(self, name: str) -> list[str]:
        """The expert parts of per-expert stage ``name`` when it must run (``[]`` when it is up to
        date, not per-expert, or expanded already)."""
        if name not in PER_EXPERT or name in self.expanded:
            return []
        self.expanded.add(name)
        touched = any(self.futures[d].result()["touched"] for d in self.deps[name])
        with stage_lock(Path(self.root), name):
            if stale(Path(self.root), name, self.dirty, touched) is None:
                return []
        from diffprune.io import read_json

        k = len(read_json(Path(self.root) / "models/intervals/intervals.json")["boundaries"]) + 1
        parts = [f"{name}[{e}]" for e in range(k)]
        for part in parts:
            self.deps[part] = self.deps[name]
        self.deps[name] = [*self.deps[name], *parts]
        return parts

    def _submit(self, name: str) -> None:
        ups = [self.futures[d] for d in self.deps[name]]
        if "[" in name:
            stage, expert = name[:-1].split("[")
            node = expert_task.with_options(name=f"{stage}[expert]", task_run_name=name)
            future = node.submit(stage, self.params_path, self.root, int(expert), ups)
        else:
            node = stage_task.with_options(name=name, task_run_name=name)
            future = node.submit(name, self.params_path, self.root, self.dirty, ups)
        self.futures[name] = future
        future.add_done_callback(lambda _: self.done.put(name))


@task(**RETRY_OPTIONS)
def expert_task(name: str, params_path: str, root: str, expert: int, upstream: list) -> dict:
    """One expert of per-expert stage ``name`` (under its own lock: a concurrent run waits, then
    finds it finished); the stage task assembles the experts afterwards."""
    t0 = time.time()
    with stage_lock(Path(root), f"{name}[{expert}]"):
        t1 = time.time()
        run_stage.fn(name, params_path, root, expert=expert)
    return _outcome(f"{name}[{expert}]", True, "its stage is stale", True, t0, t1)


@task(**RETRY_OPTIONS)
def stage_task(name: str, params_path: str, root: str, dirty: dict[str, Any], upstream: list) -> Any:
    """Stage ``name`` once the stages it depends on are done (``upstream``: their outcomes): skipped
    (a ``Skipped`` state) when ``dvc.lock`` records it as it is now, else run and recorded there.

    Returns ``{"name", "ran", "reason", "touched", "start", "locked", "end", "pid"}`` (times in seconds
    since the epoch; ``locked``: when it held its stage lock); ``touched``: this stage or one upstream
    of it ran in this flow run (a stage found clean at the start is asked again only then).
    """
    from diffprune import versioning

    log = get_run_logger()
    t0 = time.time()
    ran_upstream = any(u["touched"] for u in upstream)
    rootp = Path(root)
    with stage_lock(rootp, name):
        t1 = time.time()
        reason = stale(rootp, name, dirty, ran_upstream)
        if reason is None:
            out = _outcome(name, False, "up to date in dvc.lock", ran_upstream, t0, t1)
            return Completed(name="Skipped", message=f"{name}: up to date in dvc.lock", data=out)
        log.info("run %s: %s", name, reason)
        run_stage.fn(name, params_path, root)
        with stage_lock(rootp, "dvc"):
            versioning.commit_stage(rootp, name)
    return _outcome(name, True, reason, True, t0, t1)


def _outcome(name: str, ran: bool, reason: str, touched: bool, t0: float, t1: float) -> dict:
    return {"name": name, "ran": ran, "reason": reason, "touched": touched, "start": t0, "locked": t1,
            "end": time.time(), "pid": os.getpid()}


def stale(root: Path, name: str, dirty: dict[str, Any], ran_upstream: bool) -> Optional[str]:
    """Why stage ``name`` must run, or None when ``dvc.lock`` records it as it is now.

    ``dirty`` is ``dvc status`` of every stage at the start of the run; a stage found clean then is
    asked again only when a stage it depends on has run since. A stage found dirty is asked again
    (under its lock): a concurrent run may have run and recorded it meanwhile.
    """
    from diffprune import versioning

    if name not in dirty and not ran_upstream:
        return _unregistered(root, name)
    with stage_lock(root, "dvc"):
        now = versioning.status(root, [name])
    if name not in now:
        return _unregistered(root, name)
    return versioning.describe(now[name])


def _unregistered(root: Path, name: str) -> Optional[str]:
    """For a ``register@`` stage DVC finds recorded: why the version its record names is not in the
    registry this run points at (a deleted or other ``mlruns.db``), else None."""
    if not name.startswith("register@"):
        return None
    from diffprune import registry, tracking
    from diffprune.io import read_json

    record = root / f"models/registry/{name.split('@', 1)[1]}.json"
    uri = tracking.configure(root=root)
    gap = registry.missing_version(read_json(record)) if record.exists() else f"{record} is missing"
    return None if gap is None else f"{gap} (registry {uri})"


def overlapping(outcomes: dict[str, dict], a: str, b: str) -> bool:
    """Whether stages ``a`` and ``b`` ran at the same time in this run (their run windows intersect)."""
    x, y = outcomes[a], outcomes[b]
    return x["start"] < y["end"] and y["start"] < x["end"]

