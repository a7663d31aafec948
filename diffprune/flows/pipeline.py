"""The Prefect flow ``prune-pipeline``: every stage of dvc.yaml as a retryable task of a graph.

The stages run as the subflow ``prune-stages`` (:mod:`diffprune.flows.graph`): each waits for the
stages it depends on, so independent branches run at once on the task runner ``params.yaml``
``orchestration:`` names (threads, Dask, or one at a time).

``dvc.lock`` is the one record of what is up to date, for ``dvc repro`` and this flow alike: a stage
runs only when ``dvc status`` says it changed (its deps, params or outs differ from ``dvc.lock``), and
right after it succeeds ``dvc commit -f NAME`` records it there. A killed run thus leaves the lock
consistent, and the next run (of either tool) redoes only what was not recorded. A ``register@`` stage
is also stale when the registry it points at lacks the version its record names. Skipped stages
appear in the run as ``Skipped`` task runs naming why. At the end the outputs the default remote lacks
are pushed, the run is recorded as a git commit (in a ``diffprune init`` workspace a commit on its
branch, elsewhere a DVC experiment), every model version registered in the run is git-tagged
``NAME/vVERSION`` on that commit (and the commit written into its tags), both are pushed when a
git remote exists, the promotion gate (``params.yaml`` ``promotion:``, :mod:`diffprune.gate`) decides
for each new version whether it takes its model's champion alias (a markdown artifact of the
decisions), and a table artifact of the metrics is published, with the Pareto report (stage
``report``) as a markdown artifact and as the artifacts of the run's MLflow run ``pipeline``.
"""

from __future__ import annotations

# Absolute imports: Prefect deployments load this file by path (prefect.yaml's entrypoint).

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from diffprune.config import ConfigError, OrchestrationConfig, PromotionConfig, fingerprint, load_params
from diffprune.io import write_json
from diffprune.locks import stage_lock
from diffprune.env import quiet_defaults
from diffprune.report import metrics_table, table_rows
from diffprune.flows.graph import run_graph
from diffprune.flows.specs import missing_params, missing_sources, needed, stage_specs

# The stages in run order; the project's dvc.yaml declares the same ones but ``latents`` (a test checks
# it); a workspace of another model family has the ``latents`` stage and lacks the ones that family
# has no version of (diffprune.families.UNSUPPORTED). SPINE: what every dvc.yaml must declare.
PIPELINE: list[str] = [
    "data", "latents", "features", "teacher", "taylor", "finetune", "dipgo",
    "intervals", "experts", "router", "prune-experts", "stack",
    "evaluate@teacher", "evaluate@finetune", "evaluate@dipgo", "evaluate@experts", "evaluate@stack",
    "register@teacher", "register@finetune", "register@dipgo", "register@experts", "register@stack", "report",
]
SPINE = ("data", "features", "teacher", "evaluate@teacher", "register@teacher")


CLAIM = ".work/locks/workspace.json"  # the config and pids of the runs live in a workspace


@flow(name="prune-pipeline", log_prints=True)
def prune_pipeline(params_path: str = "params.yaml", root: str = ".", only: Optional[list[str]] = None,
                   push: bool = True) -> dict:
    """Run every pipeline stage that DVC does not find up to date; record each in ``dvc.lock``;
    push to the default remote (``push``); record the run as a git commit (a workspace commit or a
    DVC experiment) and tag the versions it registered with it; publish the metrics.

    Returns ``{"ran", "skipped", "pushed", "experiment", "commit", "tags", "decisions", "table", "report"}``
    (``decisions``: the promotion gate's, one per version this run registered; ``report``: the Pareto
    table and plot path, None when the run did not include the ``report`` stage).
    """
    quiet_defaults()
    log = get_run_logger()
    rootp = Path(root).resolve()
    params = load_params(params_path)
    with _claim_workspace(rootp, params):
        check_params_file(rootp, params_path)
        return _pipeline(rootp, params_path, only, push, log, params.promotion, params.register.experiment,
                         params.orchestration)


def check_params_file(root: Path, params_path: str | Path) -> None:
    """Refuse a run whose params are not ``root/params.yaml``: DVC records (in ``dvc.lock``) and
    ``dvc repro`` uses the params of that file, so any other file would make the record lie."""
    expected = root / "params.yaml"
    if Path(params_path).resolve() != expected:
        raise ConfigError(f"--params {params_path}: a run must use {expected} (DVC records the params of "
                          f"that file); copy yours there, or give the run its own --root holding it as params.yaml")


def _stages(root: Path, only: Optional[list[str]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The stages to consider, in run order, and every stage's spec; refuses a folder lacking the
    files (code, mostly) that the stages depend on and no stage produces."""
    specs = stage_specs(root)
    missing = [s for s in SPINE if s not in specs]
    if missing:
        raise ConfigError(f"dvc.yaml lacks pipeline stages {missing}")
    wanted = needed(only, specs) if only else set(PIPELINE) & set(specs)
    stages = [s for s in PIPELINE if s in wanted]
    absent = missing_sources(root, stages, specs)
    if absent:
        raise ConfigError(f"{root}: dvc.yaml deps {absent} are missing; the project folder must hold the "
                          f"code and inputs its stages depend on (a clone of the repository)")
    unset = missing_params(root, stages, specs)
    if unset:
        raise ConfigError(f"{root / 'params.yaml'} lacks {', '.join(unset)}, which dvc.yaml's stages track: "
                          f"write them there (DVC records params from that file, not the code's defaults)")
    return stages, specs


def _pipeline(root: Path, params_path: str, only: Optional[list[str]], push: bool, log: logging.Logger,
              policy: PromotionConfig, experiment: str, orchestration: OrchestrationConfig) -> dict:
    from diffprune import versioning, workspace

    stages, specs = _stages(root, only)
    with _lock(root, "dvc"):  # DVC allows one command at a time per repository
        versioning.ensure_dvc(root)
        workspace.refresh_code_hashes(root)  # a workspace's code hashes (for dvc repro: its `code` stage)
        code_recorded = workspace.record_code_stage(root)
        dirty = versioning.status(root, stages)
    outcomes = run_graph(root, str(Path(params_path).resolve()), stages, dirty, orchestration)
    ran = [s for s in stages if outcomes[s]["ran"]]
    skipped = [s for s in stages if not outcomes[s]["ran"]]
    pushed = _push(root, stages, log) if push else []
    uncached = [o for s in stages for o in specs[s]["uncached"]]
    record = _record_run(root, uncached, ran or (["code"] if code_recorded else []), log, stages)
    decisions = _gate(root, ran, policy, log)
    table = metrics_table(root)
    _publish(root, table, log)
    report = _publish_report(root, ran, experiment, record["commit"], log) if "report" in stages else None
    return {"ran": ran, "skipped": skipped, "outcomes": outcomes, "pushed": pushed, "experiment": record["experiment"],
            "commit": record["commit"], "tags": record["tags"], "decisions": decisions, "table": table,
            "report": report}


def _push(root: Path, stages: list[str], log: logging.Logger) -> list[str]:
    """Push what the default remote lacks (also what a killed earlier push left behind)."""
    from diffprune import versioning

    with _lock(root, "dvc"):
        pushed = versioning.push_missing(root, stages)
    if pushed:
        log.info("pushed %s to the default remote", ", ".join(pushed))
    return pushed


def _record_run(root: Path, include: list[str], ran: list[str], log: logging.Logger,
                stages: list[str]) -> dict[str, Any]:
    """Record code, params, dvc.lock and metrics as a git commit (:func:`versioning.record_run`: a
    workspace commit, or a DVC experiment of ``stages``, since ``--only`` leaves other stages without
    outputs); tag each model version registered in this run with it (a git tag and the version's
    ``git_commit``), and push them when a git remote exists. A run that ran nothing records nothing,
    except in a workspace what an interrupted run left uncommitted or untagged."""
    from diffprune import versioning

    registers = [n.split("@", 1)[1] for n in stages if n.startswith("register@")]
    workspace = versioning.is_workspace(root)
    pending = workspace and not ran and _pipeline_files_uncommitted(root, include)
    untagged = _untagged(root, registers) if workspace else []
    if not ran and not pending and not untagged:
        return {"commit": None, "experiment": None, "mode": "none", "tags": []}
    with _lock(root, "dvc"):
        record = versioning.record_run(root, include, stages, f"diffprune run: {', '.join(ran)}" if ran else
                                       "diffprune run: what an interrupted run left unrecorded")
    if record["commit"]:
        log.info("run recorded as %s %s%s", "DVC experiment" if record["experiment"] else "commit",
                 record["commit"][:12], f" ({record['experiment']}: `dvc exp show`)" if record["experiment"] else "")
    done = [t for t in registers if f"register@{t}" in ran or t in untagged]
    tags = _tag_versions(root, done, record, log)
    try:
        with _lock(root, "dvc"):
            remote = versioning.push_run(root, record, tags)
        if remote:
            log.info("run pushed to the git remote %s", remote)
    except versioning.VersioningError as e:  # the record stays local; the next `git push` can send it
        log.warning("could not push the run to the git remote: %s", e)
    return {**record, "tags": tags}


def _pipeline_files_uncommitted(root: Path, uncached: list[str]) -> bool:
    """Whether files a run writes (dvc.lock, metrics and reports, DVC's .gitignore files, the code
    hashes) differ from the workspace's last commit: an earlier run was stopped before its commit."""
    from diffprune import versioning

    managed = [*uncached, ".diffprune"]
    return any(versioning.written_by_run(p, managed) for p in versioning.changed_paths(root, untracked=True))


def _untagged(root: Path, targets: list[str]) -> list[str]:
    """The targets whose registered version carries no git tag yet (a run killed before tagging it)."""
    from diffprune import registry, tracking
    from diffprune.io import read_json

    records = {t: root / f"models/registry/{t}.json" for t in targets}
    if not any(f.exists() for f in records.values()):
        return []
    tracking.configure(root=root)
    out = []
    for target, f in records.items():
        if f.exists():
            reg = read_json(f)
            try:
                if "diffprune.git_tag" not in registry.get_version(reg["name"], reg["version"]).tags:
                    out.append(target)
            except registry.RegistryError:  # not registered there: its register@ stage reruns
                continue
    return out


def _tag_versions(root: Path, targets: list[str], record: dict[str, Any], log: logging.Logger) -> list[str]:
    """Git-tag ``NAME/vVERSION`` the run's commit for every version the run registered, and write the
    commit (and the tag) into the version's tags: ``git checkout TAG && dvc pull`` restores its inputs."""
    if not targets or not record["commit"]:
        return []
    from diffprune import registry, tracking, versioning
    from diffprune.io import read_json

    tracking.configure(root=root)
    tags = []
    for target in targets:
        reg = read_json(root / f"models/registry/{target}.json")
        with _lock(root, "dvc"):
            tag = versioning.tag_version(root, reg["name"], reg["version"], record["commit"])
        # an existing tag (the version's first run) stays: its commit is the one the version names
        commit = versioning.git(root, "rev-parse", f"{tag}^{{commit}}").stdout.strip() if tag else record["commit"]
        registry.tag_version_commit(reg["name"], reg["version"], commit, tag,
                                    record["experiment"] if commit == record["commit"] else None)
        if tag:
            tags.append(tag)
            log.info("%s version %s: git tag %s", reg["name"], reg["version"], tag)
    return tags


def registered_in_run(root: Path, ran: list[str]) -> list[dict[str, Any]]:
    """The registry records (``models/registry/TARGET.json``) of the versions this run created: its
    ``register@`` stages that ran and did not find the content already registered."""
    from diffprune.io import read_json

    records = [root / f"models/registry/{n.split('@', 1)[1]}.json" for n in ran if n.startswith("register@")]
    return [rec for f in records if f.exists() and (rec := read_json(f)).get("created")]


def _gate(root: Path, ran: list[str], policy: PromotionConfig, log: logging.Logger) -> list[dict[str, Any]]:
    """The promotion gate (:func:`diffprune.gate.gate_version`) on every version this run registered;
    its decisions are logged and, inside a flow run, published as a markdown artifact."""
    new = registered_in_run(root, ran)
    if not new or not policy.enabled:
        return []
    from diffprune import gate, tracking

    tracking.configure(root=root)
    decisions = []
    for rec in new:
        d = gate.gate_version(rec["name"], rec["version"], policy)
        log.info("%s version %s: %s (%s)", d["name"], d["version"], d["decision"], "; ".join(d["reasons"]))
        decisions.append(d)
    if FlowRunContext.get() is not None:
        create_markdown_artifact(markdown=gate.decisions_markdown(decisions), key="prune-pipeline-promotion",
                                 description="diffprune: the promotion gate's decisions")
    return decisions


def _publish(root: Path, table: str, log: logging.Logger) -> None:
    rows = table_rows(root, every=True)
    if rows:
        create_table_artifact(table=rows, key="prune-pipeline-metrics", description="diffprune: metrics of every model")
    log.info("metrics:\n%s", table)


def _publish_report(root: Path, ran: list[str], experiment: str, commit: Optional[str],
                    log: logging.Logger) -> Optional[dict]:
    """The ``report`` stage's Pareto plot and table: a markdown artifact (the plot embedded as a data
    URI) and, when this run ran stages, the files as artifacts of an MLflow run ``pipeline`` (one per
    flow run, :func:`diffprune.tracking.log_pipeline_run`). Returns ``{"table", "png"[, "mlflow_run_id"]}``."""
    from diffprune import pareto

    out = root / pareto.REPORT_DIR
    found = pareto.summary(out)
    if found is None:
        return None
    ctx = FlowRunContext.get()
    if ctx is not None:
        create_markdown_artifact(markdown=pareto.artifact_markdown(out), key="prune-pipeline-pareto",
                                 description="diffprune: FID vs trajectory MACs and vs latency, Pareto fronts")
    if ran:
        from diffprune import tracking

        tags = {"diffprune.ran": ", ".join(ran), **({"git_commit": commit} if commit else {})}
        if ctx is not None:
            tags |= {"prefect.flow_run_id": str(ctx.flow_run.id), "prefect.flow_run_name": ctx.flow_run.name}
        found["mlflow_run_id"] = tracking.log_pipeline_run(experiment, [out / f for f in pareto.FILES.values()],
                                                           root=root, tags=tags)
        log.info("Pareto report logged to MLflow run %s (experiment %s)", found["mlflow_run_id"], experiment)
    log.info("Pareto report %s:\n%s", found["png"], found["table"])
    return found


def check_workspace_free(root: Path, params) -> None:
    """Refuse a run of another config while one is live in ``root`` (the CLI asks before any Prefect
    server starts; :func:`_claim_workspace` asks again, atomically, when the flow claims it)."""
    with _lock(root, "workspace"):
        _live_claim(root, fingerprint(params))


def _live_claim(root: Path, mine: str) -> list[int]:
    """The live pids holding ``root``'s claim; raises when they run a config other than ``mine``."""
    claim = root / CLAIM
    doc = json.loads(claim.read_text()) if claim.exists() else {"config": mine, "pids": []}
    live = [pid for pid in doc["pids"] if _alive(pid)]
    if live and doc["config"] != mine:
        raise ConfigError(f"workspace {root} is in use by run(s) {live} of another config "
                          f"({doc['config']}, this one is {mine}); run it in another --root")
    return live


@contextlib.contextmanager
def _claim_workspace(root: Path, params) -> Iterator[None]:
    """Runs of the SAME config may share a workspace (they reuse each other's stages); a run of a
    different config is refused while another is live, instead of overwriting its outputs."""
    claim = root / CLAIM
    mine = fingerprint(params)
    with _lock(root, "workspace"):
        write_json(claim, {"config": mine, "pids": [*_live_claim(root, mine), os.getpid()]})
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
    return stage_lock(root, name)
