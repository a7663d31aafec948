"""The promotion gate: the pure policy, then the gate on a real sqlite MLflow registry (alias moves,
decision tags), the flow's part (only this run's new versions, the markdown artifact) and the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from diffprune import gate, registry, tracking
from diffprune.config import ConfigError, DataConfig, PromotionConfig, TeacherConfig, load_params
from diffprune.gate import TAG_CHAMPION, TAG_DECISION, TAG_POLICY, TAG_REASONS, decide
from diffprune.models.checkpoint import save_model
from diffprune.models.unet import build_scheduler, build_unet
from diffprune.serving import DEGENERATE_TAG

POLICY = PromotionConfig(max_fid_ratio=2.0, min_psnr=20.0)
GOOD = {"fid": 2.0, "fid_ratio_vs_teacher": 1.5, "psnr_vs_teacher": 25.0, "trajectory_macs": 4e8}


def _s(version: int, **changes: Any) -> dict[str, Any]:
    return {**GOOD, "version": version, **changes}


# ----------------------------------------------------------------------------- the pure policy

def test_no_champion_a_passing_candidate_wins() -> None:
    d = decide(_s(1), None, POLICY)
    assert d.promote and d.outcome == "promoted"
    assert d.reasons[-1] == "no champion yet" and "1.500x the teacher's <= 2.0" in d.reasons[0]


@pytest.mark.parametrize("changes, wins, why", [
    ({"trajectory_macs": 3e8}, True, "fewer trajectory MACs than champion v1: 3e+08 vs 4e+08"),
    ({"trajectory_macs": 5e8, "fid": 0.5}, False, "more trajectory MACs than champion v1"),  # MACs first
    ({"fid": 1.9}, True, "equal trajectory MACs (4e+08) and a lower FID than champion v1: 1.9 vs 2"),
    ({"fid": 2.1}, False, "a higher FID than champion v1"),
    ({}, False, "a tie with champion v1 (trajectory MACs 4e+08, FID 2): the champion stays"),
])
def test_fewer_macs_then_lower_fid_and_a_tie_keeps_the_champion(changes, wins, why) -> None:
    d = decide(_s(2, **changes), _s(1), POLICY)
    assert d.promote is wins and d.outcome == ("promoted" if wins else "kept")
    assert why in d.reasons[-1]


@pytest.mark.parametrize("changes, why", [
    ({"degenerate": "FID 40 is on the noise side"}, "marked degenerate by its evaluation (FID 40 is on the noise"),
    ({"fid_ratio_vs_teacher": 2.5}, "FID 2.500x the teacher's > max_fid_ratio 2.0"),
    ({"psnr_vs_teacher": 19.5}, "PSNR vs teacher 19.50 dB < min_psnr 20.0 dB"),
    ({"psnr_vs_teacher": math.nan}, "no psnr_vs_teacher metric"),
    ({"trajectory_macs": None}, "no trajectory_macs metric"),
])
def test_out_of_policy_candidates_are_rejected_even_when_far_cheaper(changes, why) -> None:
    cand = _s(2, **({"trajectory_macs": 1.0} | changes))
    d = decide(cand, _s(1), POLICY)
    assert not d.promote and d.outcome == "rejected" and any(why in r for r in d.reasons), d.reasons
    assert decide(cand, None, POLICY).outcome == "rejected"  # no champion does not lower the bar


def test_a_champion_out_of_the_current_policy_loses_to_any_passing_candidate() -> None:
    d = decide(_s(2, trajectory_macs=9e8), _s(1, psnr_vs_teacher=10.0), POLICY)
    assert d.promote and "champion v1 fails the policy: PSNR vs teacher 10.00 dB < min_psnr" in d.reasons[-1]


def test_the_champion_itself_is_kept() -> None:
    d = decide(_s(3), _s(3), POLICY)
    assert d.outcome == "kept" and d.reasons[-1] == "already the champion"


@pytest.mark.parametrize("override, key, value", [
    ({"max_fid_ratio": 0.0}, "promotion.max_fid_ratio", "0.0"),
    ({"max_fid_ratio": "2"}, "promotion.max_fid_ratio", "'2'"),
    ({"min_psnr": -1.0}, "promotion.min_psnr", "-1.0"),
    ({"min_psnr": math.inf}, "promotion.min_psnr", "inf"),
    ({"alias": "bad alias"}, "promotion.alias", "'bad alias'"),
    ({"alias": "latest"}, "promotion.alias", "'latest'"),
    ({"enabled": "yes"}, "promotion.enabled", "'yes'"),
    ({"tolerance": 1}, "promotion.tolerance", "unknown key"),
])
def test_bad_policy_values_are_one_clear_config_error(override, key, value) -> None:
    with pytest.raises(ConfigError) as e:
        load_params(None, {"promotion": override})
    assert key in str(e.value) and value in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- on a real registry

_hashes = itertools.count()


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sqlite registry in a temp folder and one tiny checkpoint (each version gets its own hash)."""
    root = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", tracking.TRACKING_ENV,
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
            mp.delenv(var, raising=False)
        mp.setattr(tracking, "_artifact_root", None)
        tracking.configure(root=root)
        torch.manual_seed(0)
        teacher = TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False], norm_num_groups=4)
        ckpt = save_model(build_unet(teacher, DataConfig(image_size=8)), root / "ckpt",
                          scheduler_config=dict(build_scheduler(TeacherConfig()).config))
        (root / "metrics.json").write_text("{}")
        yield {"root": root, "ckpt": ckpt}
        mlflow.set_tracking_uri(None)


def _version(reg: dict[str, Any], name: str, metrics: dict[str, Any], **tags: str) -> int:
    content = hashlib.sha256(f"{name}-{next(_hashes)}".encode()).hexdigest()
    return registry.register_model(name=name, model_dir=reg["ckpt"], params={}, metrics=metrics, tags=tags,
                                   artifacts=[reg["root"] / "metrics.json"], experiment="gate-test",
                                   content_hash=content, steps=2)["version"]


def _holder(name: str) -> int | None:
    mv = registry.alias_holder(name, "champion")
    return int(mv.version) if mv is not None else None


def _tags(name: str, version: int) -> dict[str, str]:
    return registry.get_version(name, version).tags


def test_gate_moves_the_alias_only_for_a_winner(reg: dict[str, Any]) -> None:
    name = "gate-order"
    v1 = _version(reg, name, GOOD)
    first = gate.gate_version(name, v1, POLICY)
    assert first["decision"] == "promoted" and first["champion"] is None and _holder(name) == v1
    assert _tags(name, v1)[TAG_DECISION] == "promoted" and _tags(name, v1)[TAG_CHAMPION] == ""
    assert json.loads(_tags(name, v1)[TAG_POLICY])["max_fid_ratio"] == 2.0

    worse = _version(reg, name, {**GOOD, "trajectory_macs": 5e8})
    assert gate.gate_version(name, worse, POLICY)["decision"] == "kept" and _holder(name) == v1
    assert _tags(name, worse)[TAG_DECISION] == "kept" and _tags(name, worse)[TAG_CHAMPION] == str(v1)
    assert "more trajectory MACs than champion v1" in _tags(name, worse)[TAG_REASONS]

    tie = _version(reg, name, GOOD)
    assert gate.gate_version(name, tie, POLICY)["decision"] == "kept" and _holder(name) == v1
    assert "a tie with champion v1" in _tags(name, tie)[TAG_REASONS]

    better = _version(reg, name, {**GOOD, "trajectory_macs": 3e8})
    out = gate.gate_version(name, better, POLICY)
    assert out["decision"] == "promoted" and out["champion"] == v1 and _holder(name) == better
    assert "fewer trajectory MACs than champion v1" in _tags(name, better)[TAG_REASONS]
    assert _tags(name, v1)[TAG_DECISION] == "promoted"  # the old champion's record is left as it was


def test_degenerate_and_out_of_policy_versions_are_rejected_with_their_reason(reg: dict[str, Any]) -> None:
    name = "gate-reject"
    champion = _version(reg, name, GOOD)
    gate.gate_version(name, champion, POLICY)
    cheap = {**GOOD, "trajectory_macs": 1e6}
    bad = _version(reg, name, cheap, **{DEGENERATE_TAG: "FID 40 is on the noise side"})
    far = _version(reg, name, {**cheap, "fid_ratio_vs_teacher": 2.4})
    blurry = _version(reg, name, {k: v for k, v in cheap.items() if k != "psnr_vs_teacher"})
    for version, why in ((bad, "marked degenerate by its evaluation (FID 40 is on the noise side)"),
                         (far, "FID 2.400x the teacher's > max_fid_ratio 2.0"),
                         (blurry, "no psnr_vs_teacher metric")):
        assert gate.gate_version(name, version, POLICY)["decision"] == "rejected"
        assert _tags(name, version)[TAG_DECISION] == "rejected" and why in _tags(name, version)[TAG_REASONS]
        assert _holder(name) == champion


def test_a_teacher_is_its_own_fidelity_reference_and_a_dry_run_changes_nothing(reg: dict[str, Any]) -> None:
    name = "gate-teacher"
    teacher = _version(reg, name, {"fid": 1.2, "trajectory_macs": 8e8}, target="teacher")
    out = gate.gate_version(name, teacher, POLICY, dry_run=True)
    assert out["decision"] == "promoted" and out["dry_run"] and "PSNR inf dB" in out["reasons"][0]
    assert _holder(name) is None and TAG_DECISION not in _tags(name, teacher)
    assert gate.gate_version(name, teacher, POLICY)["decision"] == "promoted" and _holder(name) == teacher
    again = gate.gate_version(name, teacher, POLICY)
    assert again["decision"] == "kept" and again["reasons"][-1] == "already the champion"


def test_a_winner_that_fails_verification_is_rejected(reg: dict[str, Any], monkeypatch) -> None:
    name = "gate-tampered"
    v = _version(reg, name, GOOD)
    registry.set_version_tags(name, v, {registry.TAG_CODE: "0" * 64})  # as if mlflow_model.py were swapped
    out = gate.gate_version(name, v, POLICY)
    assert out["decision"] == "rejected" and "mlflow_model.py differs" in out["reasons"][0]
    assert _holder(name) is None and _tags(name, v)[TAG_DECISION] == "rejected"


# ----------------------------------------------------------------------------- the flow's part, the CLI

def test_the_flow_gates_only_the_versions_its_run_created(reg: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    from diffprune.flows import pipeline
    from diffprune.io import write_json

    name = "gate-flow"
    old, new = _version(reg, name, GOOD), _version(reg, name, {**GOOD, "trajectory_macs": 2e8})
    write_json(tmp_path / "models/registry/teacher.json", {"name": name, "version": old, "created": False})
    write_json(tmp_path / "models/registry/dipgo.json", {"name": name, "version": new, "created": True})
    monkeypatch.setenv(tracking.TRACKING_ENV, mlflow.get_tracking_uri())  # the flow's configure() keeps this registry
    published: list[dict] = []
    monkeypatch.setattr(pipeline, "create_markdown_artifact", lambda **kw: published.append(kw))
    log = logging.getLogger("test")
    assert pipeline._gate(tmp_path, ["data", "evaluate@dipgo"], POLICY, log) == []  # nothing newly registered
    assert pipeline._gate(tmp_path, ["register@dipgo"], PromotionConfig(enabled=False), log) == []
    assert _holder(name) is None
    decisions = pipeline._gate(tmp_path, ["register@teacher", "register@dipgo"], POLICY, log)
    assert [(d["version"], d["decision"]) for d in decisions] == [(new, "promoted")] and _holder(name) == new
    assert TAG_DECISION not in _tags(name, old) and published == []  # outside a flow run: no artifact

    monkeypatch.setattr(pipeline.FlowRunContext, "get", classmethod(lambda cls: object()))
    newer = _version(reg, name, {**GOOD, "trajectory_macs": 2e8})
    write_json(tmp_path / "models/registry/dipgo.json", {"name": name, "version": newer, "created": True})
    pipeline._gate(tmp_path, ["register@dipgo"], POLICY, log)
    (art,) = published
    assert art["key"] == "prune-pipeline-promotion"
    assert f"| {name} | {newer} | **kept** | v{new} | " in art["markdown"] and "a tie with champion" in art["markdown"]


def test_cli_gate_reports_the_decision(reg: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    from diffprune.cli import app

    name = "gate-cli"
    v = _version(reg, name, GOOD)
    params = tmp_path / "params.yaml"
    params.write_text("promotion:\n  min_psnr: 30.0\n")
    monkeypatch.setenv(tracking.TRACKING_ENV, mlflow.get_tracking_uri())
    result = CliRunner().invoke(app, ["gate", name, str(v), "--params", str(params), "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"models:/{name}/{v}: rejected (@champion: no champion)" in result.output
    assert "PSNR vs teacher 25.00 dB < min_psnr 30.0 dB" in result.output and _holder(name) is None
    params.write_text("promotion:\n  max_fid_ratio: -1\n")
    bad = CliRunner().invoke(app, ["gate", name, str(v), "--params", str(params), "--root", str(tmp_path)])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: promotion.max_fid_ratio = -1: must be > 0.0"
