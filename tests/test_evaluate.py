"""The evaluation protocol's comparisons against the teacher: paired latency, ratios, machine record."""

import copy
import time

import pytest

from diffprune.metrics.evaluate import compare_to_teacher, machine_info, paired_latency


def test_paired_latency_times_both_interleaved_and_reports_the_ratio_of_medians():
    calls = []

    def slow():
        calls.append("reference")
        time.sleep(0.02)

    def fast():
        calls.append("candidate")
        time.sleep(0.005)

    out = paired_latency(fast, slow, repeats=3, warmup=1)
    # warm-up once each, then strictly alternating: a load change hits both alike
    assert calls == ["reference", "candidate"] * 4
    assert out["teacher_latency_s"] > out["latency_s"] > 0
    assert out["speedup_vs_teacher"] == pytest.approx(out["teacher_latency_s"] / out["latency_s"])
    assert 2.0 < out["speedup_vs_teacher"] < 5.0


def test_compare_to_teacher_ratios():
    r = compare_to_teacher({"trajectory_macs": 30, "fid": 3.0}, {"trajectory_macs": 120, "fid": 2.0})
    assert r == {"macs_ratio_vs_teacher": 0.25, "fid_ratio_vs_teacher": 1.5}


def test_machine_info_names_the_machine():
    info = machine_info("cpu")
    assert info["device"] == "cpu" and info["cpu"] and info["torch_threads"] >= 1


def _write_metrics(root, name, **m):
    from diffprune.io import write_json

    base = {"fid": 1.23456, "fid_std": 0.1, "fid_per_seed": [1.2], "fid_floor": 0.3, "macs_per_step": 5e6,
            "trajectory_macs": 2.5e8, "params": 1.1e6, "latency_s": 0.51234, "sampler": "ddim", "steps": 50,
            "num_samples": 500, "latency_batch": 64, "feature_extractor": "featnet"}
    write_json(root / "models" / "eval" / name / "metrics.json", {**base, **m})


def test_report_rows_put_the_model_first_rounded_with_every_column(tmp_path):
    from diffprune.report import COLUMNS, metrics_table, table_rows

    _write_metrics(tmp_path, "teacher")
    _write_metrics(tmp_path, "dipgo", macs_ratio_vs_teacher=0.33333, speedup_vs_teacher=2.8123,
                   psnr_vs_teacher=30.456, ssim_vs_teacher=0.98765)
    rows = table_rows(tmp_path)
    assert [r["model"] for r in rows] == ["teacher", "dipgo"]
    assert list(rows[1]) == list(COLUMNS) and list(rows[1])[0] == "model"
    assert rows[1]["FID"] == 1.235 and rows[1]["speedup"] == 2.81 and rows[1]["PSNR vs teacher"] == 30.46
    assert rows[0]["PSNR vs teacher"] is None
    table = metrics_table(tmp_path)
    assert "| dipgo | 1.235 |" in table and "2.81x" in table


def test_report_names_a_truncated_metrics_file(tmp_path):
    from diffprune.io import ArtifactError
    from diffprune.report import metrics_table

    f = tmp_path / "models" / "eval" / "teacher" / "metrics.json"
    f.parent.mkdir(parents=True)
    f.write_text('{"fid": 1.2')
    with pytest.raises(ArtifactError, match="metrics.json"):
        metrics_table(tmp_path)


def test_fidelity_gives_a_confidence_interval_that_holds_the_mean_and_shrinks_with_closeness():
    import torch

    from diffprune.metrics.evaluate import fidelity

    g = torch.Generator().manual_seed(0)
    ref = torch.rand((64, 1, 8, 8), generator=g) * 2 - 1
    near = (ref + 0.01 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    far = (ref + 0.3 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    a, b = fidelity(near, ref), fidelity(far, ref)
    for m in (a, b):
        lo, hi = m["psnr_vs_teacher_ci95"]
        assert lo < m["psnr_vs_teacher"] < hi
    assert a["psnr_vs_teacher"] > b["psnr_vs_teacher"] + 10 and a["ssim_vs_teacher"] > b["ssim_vs_teacher"]


_CAL = {"floor": 0.3, "bad": {"gauss": 90.0, "blur": 120.0}, "half_bad": {"gauss": 30.0, "blur": 50.0}}


def test_quality_verdict_flags_noise_side_fid_and_chance_fidelity():
    import torch

    from diffprune.metrics.evaluate import quality_verdict

    g = torch.Generator().manual_seed(0)
    ref = (torch.rand((32, 1, 8, 8), generator=g) > 0.5).float() * 2 - 1  # distinct teacher samples
    close = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    unrelated = (torch.rand(ref.shape, generator=g) > 0.5).float() * 2 - 1  # images, but not from these noises
    good = quality_verdict({"fid": 1.0}, _CAL, close, ref)
    assert good == {"degenerate": False, "verdict": "ok"}
    bad_fid = quality_verdict({"fid": 31.0}, _CAL, close, ref)
    assert bad_fid["degenerate"] and "noise side" in bad_fid["verdict"] and "half-gauss 30" in bad_fid["verdict"]
    lost = quality_verdict({"fid": 1.0}, _CAL, unrelated, ref)
    assert lost["degenerate"] and "no better than unrelated teacher samples" in lost["verdict"]
    assert quality_verdict({"fid": 1.0}, None, close, None) == {"degenerate": False, "verdict": "ok"}


def test_a_degenerate_model_is_tagged_and_its_promotion_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from diffprune import registry, serving, tracking, versioning
    from diffprune.config import Params
    from diffprune.io import read_json, write_json
    from diffprune.stages.core import run_register

    seen = {}

    def fake_register(**kw):
        seen.update(kw)
        return {"name": kw["name"], "version": 3, "created": True}

    monkeypatch.setattr(registry, "register_model", fake_register)
    monkeypatch.setattr(tracking, "configure", lambda **kw: None)
    monkeypatch.setattr(versioning, "stage_hashes", lambda root: {})
    save_dir = tmp_path / "models" / "teacher"
    save_dir.mkdir(parents=True)
    (save_dir / "model.safetensors").write_bytes(b"x")
    write_json(tmp_path / "models" / "eval" / "teacher" / "metrics.json",
               {"fid": 40.0, "degenerate": True, "verdict": "FID 40 is on the noise side",
                "feature_extractor": "featnet"})
    out = run_register(Params(), tmp_path, "teacher")
    assert seen["tags"][serving.DEGENERATE_TAG] == "FID 40 is on the noise side"
    assert out[serving.DEGENERATE_TAG] == "FID 40 is on the noise side"
    assert read_json(tmp_path / "models" / "registry" / "teacher.json") == out
    # promote refuses it before downloading anything
    monkeypatch.setattr(serving, "get_version", lambda n, v: SimpleNamespace(
        version=3, tags={serving.DEGENERATE_TAG: "FID 40 is on the noise side"}))
    monkeypatch.setattr(serving, "_download", lambda *a: (_ for _ in ()).throw(AssertionError("downloaded")))
    with pytest.raises(registry.RegistryError, match="marked degenerate.*noise side.*promotion refused"):
        serving.promote("diffprune-teacher", 3)


def test_report_rows_with_every_column_keep_the_display_columns_first(tmp_path):
    from diffprune.report import COLUMNS, table_rows

    _write_metrics(tmp_path, "teacher", kid=0.0123456)
    (row,) = table_rows(tmp_path, every=True)
    assert list(row)[: len(COLUMNS)] == list(COLUMNS)
    assert row["kid"] == 0.01235 and row["latency_batch"] == 64 and "fid_per_seed" not in row


def test_evaluate_reports_the_paired_feature_distance_zero_against_itself(tiny_unet, tiny_scheduler):
    import numpy as np
    import torch

    from diffprune.config import EvaluateConfig
    from diffprune.metrics.evaluate import evaluate
    from diffprune.metrics.fid import Extractor
    from diffprune.models.unet import sampling_scheduler
    from diffprune.sampling import ModelDenoiser

    protocol = EvaluateConfig(steps=3, num_samples=12, batch_size=12, seeds=[0], latency_batch=2, latency_repeats=1)
    flat = Extractor("flat pixels", lambda x: x.flatten(1).double().numpy())
    sched, shape = sampling_scheduler(dict(tiny_scheduler.config), "ddim"), (1, 8, 8)
    train_feats = np.random.default_rng(0).normal(size=(12, 64))
    args = (sched, [tiny_unet], protocol, flat, train_feats)
    m, ref = evaluate(ModelDenoiser(tiny_unet), *args, sample_shape=shape, progress=False)
    assert "feature_distance_vs_teacher" not in m  # the teacher itself: nothing to pair with
    same, _ = evaluate(ModelDenoiser(tiny_unet), *args, sample_shape=shape, reference=ref, progress=False)
    assert same["feature_distance_vs_teacher"] == 0.0
    other = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        for prm in other.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
    far, _ = evaluate(ModelDenoiser(other), sched, [other], protocol, flat, train_feats, sample_shape=shape,
                      reference=ref, progress=False)
    lo, hi = far["feature_distance_vs_teacher_ci95"]
    assert 0 < lo < far["feature_distance_vs_teacher"] < hi and far["psnr_vs_teacher"] < same["psnr_vs_teacher"]
