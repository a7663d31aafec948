"""The stage graph's scheduling: dvc.yaml's edges, the per-expert expansion, and a failing stage that
stops only what depends on it."""

from __future__ import annotations

import pytest

from diffprune.flows.specs import direct_upstream, stage_specs

from .conftest import REPO, make_project


def test_the_edges_are_dvc_yaml_producers():
    specs = stage_specs(REPO)
    assert "taylor" in direct_upstream("finetune", specs)
    assert direct_upstream("dipgo", specs) >= {"teacher"} and "taylor" not in direct_upstream("dipgo", specs)
    assert direct_upstream("data", specs) == set()
    for name, spec in specs.items():  # every edge is a real producer -> consumer dependency
        for up in direct_upstream(name, specs):
            assert any(d == o or d.startswith(o.rstrip("/") + "/") for d in spec["deps"] for o in specs[up]["outs"])


def test_a_failing_stage_stops_only_what_depends_on_it(tmp_path, prefect_harness, monkeypatch):
    from diffprune import stages
    from diffprune.flows.pipeline import prune_pipeline

    stages._load_all()
    monkeypatch.setitem(stages.STAGES, "dipgo", lambda *a, **k: (_ for _ in ()).throw(ValueError("dipgo broke")))
    root = make_project(tmp_path / "proj", {"evaluate": {"sampler": "ddim"}}, code=True)
    with pytest.raises(ValueError, match="dipgo broke"):
        prune_pipeline(params_path=str(root / "params.yaml"), root=str(root), only=["evaluate@dipgo", "finetune"],
                       push=False)
    lock = (root / "dvc.lock").read_text()
    for done in ("data", "teacher", "taylor", "finetune"):  # the other branch ran to its end, recorded
        assert f"  {done}:" in lock
    assert "  dipgo:" not in lock and "evaluate@dipgo" not in lock  # the failed stage and what needs it
    assert not (root / "models/eval/dipgo").exists()
