"""Every DVC stage declares the code it runs: its module's transitive imports inside ``diffprune``.

For each stage ``cmd: diffprune stage NAME`` the stage function's module is parsed (AST) and its
imports are followed through the package, lazy imports inside functions included (a lazily imported
module is still run), except the imports inside the *other* stage functions (``@stage``) and
the stage registry's loader (``diffprune.stages._load_all``, which imports every stage module to
find one by name). Every module file reached must lie under one of the stage's ``deps``; and
``register@*`` must track the params that name what it registers.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from diffprune.flows.specs import stage_specs

from .conftest import REPO

PKG = "diffprune"
REGISTRY_INIT = REPO / PKG / "stages" / "__init__.py"


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` inside the package (its ``__init__.py`` for a package)."""
    if name != PKG and not name.startswith(PKG + "."):
        return None
    rel = Path(*name.split("."))
    for f in (REPO / rel.with_suffix(".py"), REPO / rel / "__init__.py"):
        if f.exists():
            return f
    return None


def _module_name(f: Path) -> str:
    parts = list(f.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_stage_fn(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
        isinstance(d, ast.Call) and getattr(d.func, "id", None) == "stage" for d in node.decorator_list)


def _imports(f: Path, keep_fn: str) -> set[str]:
    """Package modules ``f`` imports; of its stage functions, only ``keep_fn``'s lazy imports count."""
    tree = ast.parse(f.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        other_stage = _is_stage_fn(node) and node.name != keep_fn
        registry = f == REGISTRY_INIT and isinstance(node, ast.FunctionDef)
        if other_stage or registry:
            skip |= {id(n) for n in ast.walk(node)}
    base = _module_name(f)
    pkg = base if f.name == "__init__.py" else base.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = importlib.util.resolve_name("." * node.level + (node.module or ""), pkg) if node.level \
                else node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import core` imports a module
    return {m for m in found if _module_file(m) is not None}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def stage_modules(stage_fn) -> set[Path]:
    """Files of every package module that running ``stage_fn`` imports (its own module included)."""
    files: set[Path] = set()
    todo = _with_parents(stage_fn.__module__)
    while todo:
        f = _module_file(todo.pop())
        if f is None or f in files:
            continue
        files.add(f)
        todo += [p for m in _imports(f, stage_fn.__name__) for p in _with_parents(m)]
    return files


def _covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(REPO).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


SPECS = stage_specs(REPO)


@pytest.mark.parametrize("name", list(SPECS))
def test_stage_deps_cover_its_code(name: str) -> None:
    from diffprune.stages import stage_function as get_stage

    spec = SPECS[name]
    words = spec["cmd"].split()
    assert words[:2] == ["diffprune", "stage"], spec["cmd"]
    fn = get_stage(words[2])
    missing = sorted(f.relative_to(REPO).as_posix() for f in stage_modules(fn) if not _covered(f, spec["deps"]))
    assert not missing, f"dvc.yaml stage {name} runs code it does not list in deps: {missing}"


def test_the_analysis_sees_lazy_and_relative_imports() -> None:
    from diffprune.stages import stage_function as get_stage

    rel = {f.relative_to(REPO).as_posix() for f in stage_modules(get_stage("register"))}
    assert {"diffprune/tracking.py", "diffprune/versioning.py", "diffprune/stages/core.py"} <= rel  # lazy
    assert "diffprune/stages/taylor.py" not in rel  # the registry loader does not count
    finetune = {f.relative_to(REPO).as_posix() for f in stage_modules(get_stage("finetune"))}
    assert {"diffprune/pruning/taylor.py", "diffprune/stages/core.py", "diffprune/training.py"} <= finetune
    data = {f.relative_to(REPO).as_posix() for f in stage_modules(get_stage("data"))}
    assert "diffprune/tracking.py" not in data  # only register's lazy import needs it


@pytest.mark.parametrize("name", [n for n in SPECS if n.startswith("register@")])
def test_register_tracks_what_names_the_model(name: str) -> None:
    from diffprune.config import load_params
    from diffprune.stages.core import get_target

    target = name.partition("@")[2]
    params = load_params(REPO / "params.yaml")
    model_name = get_target(target).model_name(params)
    keys = SPECS[name]["params"]
    holders = [k for k in _dotted_keys(REPO / "params.yaml") if _lookup(params, k) == model_name]
    assert holders, f"no param holds {model_name!r}"
    tracked = [h for h in holders if any(h == k or h.startswith(k + ".") for k in keys)]
    assert tracked, f"{name}: its params {keys} do not track {holders}, which name the registered model"
    assert any(k in ("register", "register.experiment") for k in keys), f"{name}: the MLflow experiment is not tracked"


def _dotted_keys(params_yaml: Path) -> list[str]:
    import yaml

    doc = yaml.safe_load(params_yaml.read_text())
    return [f"{s}.{k}" for s, body in doc.items() if isinstance(body, dict) for k in body]


def _lookup(params, dotted: str):
    obj = params
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _family_specs(family: str) -> dict:
    """The stages of a latent family's workspace dvc.yaml (before the workspace folds the code into `code`)."""
    import json

    import yaml

    from diffprune.families import family_dvc
    from diffprune.flows import specs as specs_mod

    doc = family_dvc(yaml.safe_load((REPO / "dvc.yaml").read_text()), family)
    tmp = REPO / ".work" / f"{family}-dvc-test"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "dvc.yaml").write_text(json.dumps(doc))
    return specs_mod.stage_specs(tmp)


LATENT_SPECS = {family: _family_specs(family) for family in ("dit", "sd", "ldm")}


@pytest.mark.parametrize("family,name", [(f, n) for f, specs in LATENT_SPECS.items() for n in specs])
def test_a_latent_family_workspace_stage_deps_cover_the_family_code(family: str, name: str) -> None:
    from diffprune.stages import stage_function

    spec = LATENT_SPECS[family][name]
    fn = stage_function(spec["cmd"].split()[2], family)
    missing = sorted(f.relative_to(REPO).as_posix() for f in stage_modules(fn) if not _covered(f, spec["deps"]))
    assert not missing, f"the {family} workspace's stage {name} runs code it does not list in deps: {missing}"


EXPERT_SPECS = ("intervals", "experts", "router", "prune-experts", "evaluate@experts", "register@experts")


@pytest.mark.parametrize("family", list(LATENT_SPECS))
def test_a_latent_family_workspace_has_latents_and_the_expert_stages_on_them(family: str) -> None:
    specs = LATENT_SPECS[family]
    frozen = {"sd": {"models/text-encoder"}}.get(family, set())
    assert "latents" in specs and list(specs).index("latents") == 1
    assert frozen <= set(specs["latents"]["outs"])
    assert "stack" not in specs
    # the expert stages train on the latents with the family's conditions (stages/FAMILY_experts.py)
    assert set(EXPERT_SPECS) <= set(specs)
    for name in EXPERT_SPECS[:4]:
        assert {"data/latents", f"diffprune/stages/{family}.py", f"diffprune/stages/{family}_experts.py",
                *frozen} <= set(specs[name]["deps"]), name
    assert family in specs["experts"]["params"] and family in specs["prune-experts"]["params"]
    assert not any("_experts" in d for n in ("teacher", "taylor", "dipgo") for d in specs[n]["deps"])
    for name in ("teacher", "taylor", "finetune", "dipgo", "evaluate@dipgo"):
        assert {"data/latents", "models/autoencoder"} | frozen <= set(specs[name]["deps"]), name
    # the CLIP score is the text-to-image evaluation's: its weights re-evaluate, never retrain
    assert ("clip" in specs["evaluate@teacher"]["params"]) == (family == "sd")
    assert "clip" not in specs["teacher"]["params"]
