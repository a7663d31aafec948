"""The pipeline's stages as ``dvc.yaml`` declares them, read the way DVC reads them.

``dvc.yaml`` is the one declaration of what a stage depends on and produces; the Prefect flow reads it
here to know the stages, their order of dependence, and (through DVC, see ``versioning``) whether
each one is up to date.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError


def stage_specs(root: Path) -> dict[str, dict[str, Any]]:
    """Stages of ``root/dvc.yaml`` (``foreach`` expanded to ``NAME@ITEM``) -> {cmd, deps, params, outs}."""
    f = Path(root) / "dvc.yaml"
    if not f.exists():
        raise ConfigError(f"{f}: no dvc.yaml in the project folder")
    doc = yaml.safe_load(f.read_text())["stages"]
    out: dict[str, dict[str, Any]] = {}
    for name, st in doc.items():
        if "foreach" in st:
            items = st["foreach"]
            for key, item in (items.items() if isinstance(items, dict) else ((i, i) for i in items)):
                body = json.dumps(st["do"]).replace("${key}", str(key))
                if isinstance(item, dict):
                    for field, value in item.items():
                        body = body.replace("${item.%s}" % field, str(value))
                else:
                    body = body.replace("${item}", str(item))
                out[f"{name}@{key}"] = _norm(json.loads(body))
        else:
            out[name] = _norm(st)
    return out


def _norm(st: dict) -> dict:
    def paths(items: list | None) -> list[str]:
        return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]

    return {
        "cmd": st["cmd"],
        "deps": paths(st.get("deps")),
        "params": [p for p in st.get("params", []) if isinstance(p, str)],
        "outs": paths(st.get("outs")) + paths(st.get("metrics")) + paths(st.get("plots")),
        # outputs git keeps (``cache: false``: metrics, plots, small reports), not DVC's cache
        "uncached": [next(iter(i)) for kind in ("outs", "metrics", "plots") for i in st.get(kind) or []
                     if isinstance(i, dict) and next(iter(i.values())).get("cache") is False],
    }


def missing_params(root: Path, stages: list[str], specs: dict[str, dict[str, Any]]) -> list[str]:
    """Param keys that ``stages`` track (dvc.yaml ``params:``) but ``root/params.yaml`` does not hold:
    DVC records a stage's params from that file, so a value left to the code's default cannot be."""
    f = Path(root) / "params.yaml"
    doc = yaml.safe_load(f.read_text()) if f.exists() else {}
    return [k for k in sorted({k for name in stages for k in specs[name]["params"]}) if not _has_key(doc, k)]


def _has_key(doc: Any, key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        doc = doc.get(part) if isinstance(doc, dict) else None
    return isinstance(doc, dict) and last in doc


def _under(path: str, folder: str) -> bool:
    return path == folder.rstrip("/") or path.startswith(folder.rstrip("/") + "/")


def needed(only: list[str], specs: dict[str, dict[str, Any]]) -> set[str]:
    """``only`` plus every stage whose outputs they depend on (transitively)."""
    producers = {o: name for name, s in specs.items() for o in s["outs"]}
    need: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name in need:
            continue
        if name not in specs:
            raise ConfigError(f"unknown stage {name!r} (known: {', '.join(specs)})")
        need.add(name)
        todo += [prod for dep in specs[name]["deps"] for out, prod in producers.items() if _under(dep, out)]
    return need


def direct_upstream(name: str, specs: dict[str, dict[str, Any]]) -> set[str]:
    """The stages producing a dep of ``name``: the edges of the stage graph."""
    deps = specs[name]["deps"]
    return {prod for prod, s in specs.items() if prod != name and any(_under(d, o) for d in deps for o in s["outs"])}


def upstream(name: str, specs: dict[str, dict[str, Any]]) -> set[str]:
    """The stages whose outputs ``name`` depends on, directly or not (``name`` excluded)."""
    return needed([name], specs) - {name}


def missing_sources(root: Path, stages: list[str], specs: dict[str, dict[str, Any]]) -> list[str]:
    """Deps of ``stages`` that no stage produces and that are absent under ``root`` (code, mostly)."""
    produced = [o for s in specs.values() for o in s["outs"]]
    deps = {d for name in stages for d in specs[name]["deps"]}
    return sorted(d for d in deps if not any(_under(d, o) for o in produced) and not (Path(root) / d).exists())
