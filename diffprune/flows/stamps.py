"""Skip a stage whose inputs and config are unchanged since its last success.

The stage's inputs are read from ``dvc.yaml`` (its ``deps`` and ``params``), so the Prefect flow and
``dvc repro`` agree on what a stage depends on. A stamp (the hash of those inputs, and the hashes of
the outputs it produced) is written after success; the stage is skipped while the key matches and
the outputs are still there, unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, Params, to_dict
from ..io import read_json, sha256_tree, write_json


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
    def paths(items):
        return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]

    return {
        "cmd": st["cmd"],
        "deps": paths(st.get("deps")),
        "params": [p for p in st.get("params", []) if isinstance(p, str)],
        "outs": paths(st.get("outs")) + paths(st.get("metrics")) + paths(st.get("plots")),
    }


def _param_value(p: Params, dotted: str) -> Any:
    obj: Any = p
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj


def input_key(root: Path, spec: dict, params: Params) -> str:
    h = hashlib.sha256()
    h.update(spec["cmd"].encode())
    for dep in sorted(spec["deps"]):
        path = Path(root) / dep
        h.update(dep.encode())
        h.update((sha256_tree(path) if path.exists() else "missing").encode())
    for name in sorted(spec["params"]):
        h.update(json.dumps([name, _param_value(params, name)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _stamp_file(root: Path, name: str) -> Path:
    return Path(root) / ".work" / "stamps" / f"{name.replace('@', '--')}.json"


def is_fresh(root: Path, name: str, key: str, spec: dict) -> bool:
    f = _stamp_file(root, name)
    if not f.exists():
        return False
    try:
        stamp = read_json(f)
    except Exception:
        return False
    if stamp.get("key") != key:
        return False
    for out, digest in stamp.get("outs", {}).items():
        path = Path(root) / out
        if not path.exists() or sha256_tree(path) != digest:
            return False
    return True


def write_stamp(root: Path, name: str, key: str, spec: dict) -> None:
    outs = {o: sha256_tree(Path(root) / o) for o in spec["outs"] if (Path(root) / o).exists()}
    write_json(_stamp_file(root, name), {"key": key, "outs": outs})
