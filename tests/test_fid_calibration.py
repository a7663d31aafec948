"""Issue 19: the FID extractor must prove it can tell known-bad sets (noise, blur, shuffled pixels,
the mean image) from real images, on digits and on an RGB image folder; a weak extractor is refused."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from diffprune.config import load_params
from diffprune.metrics import fid as fidmod
from diffprune.metrics.calibration import (BAD_SETS, bad_sets, calibration_failures, check_calibration, judge_fid,
                                           required_fid)
from diffprune.stages import core

from .conftest import make_project
from .rgb_folder import CLASSES, make_rgb_folder

RGB = {"image_size": 16, "channels": 3, "max_images": 0, "ref_fraction": 0.25}


def _features(root: Path, monkeypatch=None, weak_epochs: int = 0) -> Path:
    """Run data + features in ``root``; with ``weak_epochs``, the feature net is class-only (today's)."""
    p = load_params(root / "params.yaml")
    core.run_data(p, root)
    if weak_epochs:
        weak = functools.partial(fidmod.train_feature_net, quality=False)
        monkeypatch.setattr(core, "train_feature_net", lambda *a, **k: weak(*a, **{**k, "epochs": weak_epochs}))
    core.run_features(p, root, progress=False)
    return root / core.FEATURES


def _rgb_project(tmp_path: Path, epochs: int) -> Path:
    folder = make_rgb_folder(tmp_path / "shapes", per_class=100, seed=0)
    return make_project(tmp_path / "proj", {"data": {"source": str(folder), **RGB},
                                            "evaluate": {"feature_epochs": epochs}}, stages=False)


def _assert_calibrated(feats: Path) -> dict:
    cal = json.loads((feats / "calibration.json").read_text())
    floor = json.loads((feats / "floor.json").read_text())
    assert cal["passed"] and cal["failures"] == [] and set(cal["bad"]) == set(BAD_SETS)
    assert floor["calibration"]["bad"] == cal["bad"] and floor["fid_floor"] == cal["floor"]
    assert "quality" in cal["feature_extractor"] and floor["objective"].endswith("+quality")
    need, _ = required_fid(cal)
    for kind, v in cal["bad"].items():
        assert v >= need >= 10 * cal["floor"], kind   # far above the floor: the stated rule
        assert cal["floor"] < cal["half_bad"][kind] < v, kind  # half-bad sits between floor and bad
    return cal


def test_bad_sets_are_the_ref_size_in_range_and_made_from_the_data():
    g = torch.Generator().manual_seed(0)
    ref, train = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.rand(10, 3, 8, 8, generator=g) * 2 - 1
    sets = bad_sets(ref, train)
    assert tuple(sets) == BAD_SETS
    for kind, x in sets.items():
        assert x.shape == ref.shape and x.min() >= -1 and x.max() <= 1, kind
    # shuffled pixels keep each image's pixels (all channels move together), blur keeps the mean
    assert torch.equal(sets["shuffle"].flatten(2).sort(-1).values[:, 0], ref.flatten(2).sort(-1).values[:, 0])
    assert not torch.equal(sets["shuffle"], ref)
    assert torch.allclose(sets["blur"].mean(), ref.mean(), atol=0.05) and sets["blur"].std() < ref.std()
    assert torch.allclose(sets["mean"][3], train.mean(0))


def test_rule_names_the_bad_set_that_came_too_close():
    cal = {"floor": 0.34, "spread": 1.0, "bad": {"gauss": 50.0, "blur": 0.9}}
    assert calibration_failures(cal) == ["blur scored 0.9, needs >= 3.4 (10x the floor 0.34)"]
    with pytest.raises(RuntimeError, match=r"^FID extractor featnet-x failed calibration: blur scored 0.9, "
                                           r"needs >= 3.4 \(10x the floor 0.34\)$"):
        check_calibration(cal, "featnet-x")
    cal["spread"] = 20.0  # a tiny floor is not enough: the feature spread sets the bar
    assert calibration_failures(cal)[0].startswith("blur scored 0.9, needs >= 20.3 (the floor 0.34 + 1 x")
    check_calibration({"floor": 0.3, "spread": 2.0, "bad": {"gauss": 3.0, "blur": 4.0}}, "ok")


def test_judge_fid_puts_the_line_at_the_lowest_half_bad_set():
    cal = {"floor": 0.4, "bad": {"gauss": 100.0, "blur": 60.0}, "half_bad": {"gauss": 30.0, "blur": 25.0}}
    ok, reason = judge_fid(5.0, cal)
    assert ok and "below half-blur 25" in reason
    ok, reason = judge_fid(25.0, cal)
    assert not ok and "noise side" in reason and "floor 0.4" in reason
    assert not judge_fid(float("nan"), cal)[0]
    with pytest.raises(ValueError, match="half_bad"):
        judge_fid(1.0, {"floor": 0.4, "bad": {}})


def test_digits_extractor_passes_calibration(project: Path):
    cal = _assert_calibrated(_features(project))
    assert judge_fid(cal["floor"], cal)[0] and not judge_fid(cal["bad"]["gauss"], cal)[0]


def test_digits_class_only_net_is_refused(project: Path, monkeypatch):
    # today's class-only net, trained until it knows the classes, is blind to noise and shuffling
    with pytest.raises(RuntimeError, match=r"^FID extractor featnet-classes\(.*\) failed calibration: "
                                           r"gauss scored [\d.]+, needs >= [\d.]+ \(the floor"):
        _features(project, monkeypatch, weak_epochs=60)
    feats = project / core.FEATURES
    assert not (feats / "floor.json").exists()  # a refused extractor leaves no floor for later stages
    assert not json.loads((feats / "calibration.json").read_text())["passed"]


def test_rgb_folder_extractor_passes_calibration(tmp_path: Path):
    assert sorted(p.name for p in make_rgb_folder(tmp_path / "look", per_class=2).iterdir()) == sorted(CLASSES)
    _assert_calibrated(_features(_rgb_project(tmp_path, epochs=20)))


def test_rgb_folder_class_only_net_is_refused(tmp_path: Path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"failed calibration: .*blur scored [\d.]+, needs >= [\d.]+"):
        _features(_rgb_project(tmp_path, epochs=20), monkeypatch, weak_epochs=10)


def test_feature_net_with_quality_head_round_trips(tmp_path: Path):
    torch.manual_seed(0)
    net = fidmod.FeatureNet(3, 16, 3, width=8, num_quality=1 + len(fidmod.CORRUPTIONS)).eval()
    fidmod.save_feature_net(net, tmp_path / "f", {"accuracy": 1.0, "task": "classes",
                                                  "objective": fidmod.objective_name(net, "classes")})
    loaded, doc = fidmod.load_feature_net(tmp_path / "f")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert doc["hparams"]["num_quality"] == 5 and loaded.quality is not None
    assert torch.equal(loaded.quality(loaded.features(x)), net.quality(net.features(x)))
    assert fidmod.feature_net_extractor(tmp_path / "f").name.startswith("featnet-classes+quality(dim=32")


def test_corrupt_labels_every_image_and_stays_in_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    xc, q = fidmod.corrupt(x, g)
    assert xc.shape == x.shape and xc.min() >= -1 and xc.max() <= 1
    assert set(q.tolist()) == set(range(1, 1 + len(fidmod.CORRUPTIONS)))
    assert (xc - x).flatten(1).abs().amax(1).min() > 0  # no image left untouched
