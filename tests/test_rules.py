"""House rules checked on the source: layering, no pickle, no remote code."""

import ast
import re

from .conftest import REPO

PKG = REPO / "diffprune"
ALGORITHM = [PKG / "pruning", PKG / "models", PKG / "metrics", PKG / "sampling.py", PKG / "training.py",
             PKG / "train_state.py", PKG / "data"]
FORBIDDEN = {"prefect", "mlflow", "dvc"}


def _py(paths):
    for p in paths:
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def test_algorithm_code_never_imports_orchestration():
    bad = []
    for f in _py(ALGORITHM):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{f.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_no_pickle_no_unsafe_torch_load_no_remote_code():
    offenders = []
    for f in sorted(list(PKG.rglob("*.py")) + list((REPO / "benchmarks").rglob("*.py"))):
        src = f.read_text()
        if re.search(r"^\s*(import pickle|from pickle|import cloudpickle|import dill)", src, re.M):
            offenders.append(f"{f.name}: pickle import")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{f.name}: torch.load without weights_only=True")
        if re.search(r"trust_remote_code\s*=\s*True", src):
            offenders.append(f"{f.name}: trust_remote_code=True")
        if re.search(r"torch\.save\(", src):
            offenders.append(f"{f.name}: torch.save (pickle)")
    assert not offenders, offenders
