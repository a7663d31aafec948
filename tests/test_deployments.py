"""prefect.yaml's deployments name a flow that imports and parameters it takes; the Dockerfile's
COPYs name files that exist and reach the build (.dockerignore)."""

from __future__ import annotations

import fnmatch
import inspect
import shlex

import pytest
import yaml

from tests.conftest import REPO


def _deployments() -> dict[str, dict]:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in doc["deployments"]}


def _dockerfile() -> list[list[str]]:
    """The Dockerfile's instructions as word lists (continuation lines joined, comments dropped)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [shlex.split(line, posix=False) for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def test_the_deployments_run_their_flows_with_parameters_they_take():
    from prefect.flows import load_flow_from_entrypoint

    deps = _deployments()
    assert set(deps) == {"nightly", "nightly-gpu", "weekly-stack"}
    flows = {"nightly": "prune-pipeline", "nightly-gpu": "prune-pipeline", "weekly-stack": "stack-pipeline"}
    for name, dep in deps.items():
        path, _, func = dep["entrypoint"].partition(":")
        assert (REPO / path).is_file(), f"{name}: {path} is missing"
        flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
        accepted = inspect.signature(flow.fn).parameters
        assert set(dep["parameters"]) <= set(accepted), f"{name}: {set(dep['parameters']) - set(accepted)}"
        assert flow.name == flows[name] and func == flow.name.replace("-", "_")
    assert deps["nightly"]["work_pool"] == {"name": "diffprune-process", "work_queue_name": "default"}
    assert deps["weekly-stack"]["parameters"] == deps["nightly"]["parameters"]
    assert not any(s.get("active") for s in deps["weekly-stack"]["schedules"])  # the nightly run builds it too
    assert deps["nightly"]["parameters"] == deps["nightly-gpu"]["parameters"]


def test_the_gpu_deployment_requests_the_gpus_of_a_docker_pool():
    docker_types = pytest.importorskip("docker.types")
    dep = _deployments()["nightly-gpu"]
    pool = dep["work_pool"]
    assert pool["name"] == "diffprune-docker"
    jobs = pool["job_variables"]
    requests = jobs["container_create_kwargs"]["device_requests"]
    # docker-py turns each into a DeviceRequest (what prefect-docker's worker hands containers.create)
    assert requests and all(["gpu"] in docker_types.DeviceRequest(**r).capabilities for r in requests)
    # the image's checkout is where the flow runs, and the workspaces are mounted inside it
    workdir = next(words[1] for words in _dockerfile() if words[0] == "WORKDIR")
    pull = dep["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert pull == workdir and all(v.split(":")[1].startswith(workdir + "/") for v in jobs["volumes"])
    assert jobs["image_pull_policy"] == "Never" and jobs["image"] == "diffprune:gpu"
    assert not any(s.get("active") for s in dep.get("schedules", []))  # one nightly schedule per workspace


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_every_path_the_dockerfile_copies_exists_and_reaches_the_build():
    ignore = [line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    copies = [[w for w in words[1:] if not w.startswith("--")] for words in _dockerfile() if words[0] == "COPY"]
    assert copies and "pyproject.toml" in copies[0] and ["diffprune", "./diffprune"] in copies
    for *sources, _dest in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile COPYs {src}, which does not exist"
            assert not _ignored(src, ignore), f"Dockerfile COPYs {src}, which .dockerignore leaves out"
    assert _ignored(".venv", ignore) and _ignored("runs", ignore) and _ignored("tests", ignore)
