"""The evaluation protocol's comparisons against the teacher: paired latency, ratios, machine record."""

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
