"""Every benchmark's ``--quick`` smoke setting runs end to end on the shared harness (slow: make test-all).

The smoke numbers mean nothing; what is checked is that each benchmark writes its JSON and Markdown
with the significance column, and that the harness caches what it ran (a second run reuses the
teacher and every run).
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest

import benchmarks.common as common

pytestmark = pytest.mark.slow
NAMES = ("teacher", "taylor_sizes", "taylor", "dipgo", "experts", "stack", "dit_cache", "sd_cache")


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-quick")


@pytest.mark.parametrize("name", NAMES)
def test_quick_benchmark_runs_and_writes_its_results(name: str, quick_root: Path, monkeypatch) -> None:
    monkeypatch.setattr(common, "QUICK_ROOT", quick_root)
    main = importlib.import_module(f"benchmarks.{name}").main
    out = quick_root / "results"
    main(**({"quick": True} if name == "taylor_sizes" else {"quick": True, "progress": False}))
    doc = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert doc["quick"] is True
    if name in ("taylor", "dipgo", "experts", "stack", "dit_cache", "sd_cache"):
        assert "significance vs baselines at equal MACs" in md, md[:500]
        assert (out / f"{name}.png").stat().st_size > 0
    if name == "teacher":
        assert [c["step"] for c in doc["curve"]] == sorted(c["step"] for c in doc["curve"])


def test_a_second_quick_run_reuses_every_cached_run(quick_root: Path, monkeypatch) -> None:
    """Resumable: a rerun finds the teacher and every evaluated run in the cache (same results, fast)."""
    monkeypatch.setattr(common, "QUICK_ROOT", quick_root)
    from benchmarks.dipgo import main

    main(quick=True, progress=False)  # a no-op if the parametrised run above already ran it
    first = (quick_root / "results" / "dipgo.json").read_text()
    t0 = time.perf_counter()
    main(quick=True, progress=False)
    assert (quick_root / "results" / "dipgo.json").read_text() == first
    assert time.perf_counter() - t0 < 60
