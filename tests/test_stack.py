"""Stacking: splits that land on the budget, DiP-GO over a mixture of experts (all-compute equals the
mixture, switch steps whole, counted MACs equal predicted), experts pruned per interval, and the
``stack`` stage end to end: its model evaluated at its own steps, registered, loaded from the
registry in a fresh process with the library's images."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from diffprune.config import STACK_NETS, ConfigError, DipgoConfig, TaylorConfig, load_params
from diffprune.metrics.cost import unet_macs
from diffprune.metrics.evaluate import trajectory_macs
from diffprune.metrics.image import feature_distance
from diffprune.models.unet import sampling_scheduler
from diffprune.pruning.dipgo import Schedule, SkipScheduleDenoiser, block_costs, schedule_from_scores, train_pruner
from diffprune.pruning.dipgo.graph import block_graph
from diffprune.pruning.dipgo.routed import RoutedGraph, switch_steps
from diffprune.pruning.experts import ExpertMixtureModel
from diffprune.pruning.stack import (Split, candidate_splits, choose, interval_ranges, mixture_of, rank_key,
                                     stacked_denoiser)
from diffprune.pruning.taylor import prune_unet
from diffprune.sampling import ModelDenoiser, sample

from .conftest import make_project

SHAPE = (1, 8, 8)
SCHED = {"num_train_timesteps": 1000}


def _images(n: int = 16) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture
def mixture(tiny_unet, tiny_scheduler):
    """Two experts of one width: the tiny UNet pruned by its early and by its late timesteps."""
    cfg = TaylorConfig(importance="diff-pruning", ratio=0.5, threshold=0.0, batch_size=8, max_timesteps=12)
    experts = [prune_unet(tiny_unet, tiny_scheduler, _images(), cfg, timesteps=r)[0].eval()
               for r in interval_ranges([500], 1000)]
    return mixture_of(experts, [500])


# ----------------------------------------------------------------------------- the split grid

@pytest.mark.parametrize("budget", [0.5, 0.3, 0.2, 0.1])
def test_every_candidate_split_lands_on_the_budget(budget):
    nets = {"teacher": 1.0, "pruned": 0.4478, "mixture": 0.2522}
    splits = candidate_splits(budget, nets, [1.0, 0.7, 0.5], 50, min_steps=4)
    assert splits and {s.net for s in splits} <= set(nets)
    for s in splits:
        assert 4 <= s.steps <= 50 and 0.2 <= s.skip_ratio <= 1.0
        if s.skip_ratio == 1.0:  # no schedule: whole steps alone within 2%
            assert abs(s.predicted_ratio - budget) <= 0.02 * budget
        else:  # the schedule's ratio is what lands the product on the budget
            assert s.predicted_ratio == pytest.approx(budget, abs=1e-4)
    # fewer steps alone is a split of every budget k / 50
    assert Split("teacher", 1.0, 1.0, round(budget * 50), 50) in splits
    assert len({(s.net, s.steps, s.skip_ratio < 1) for s in splits}) == len(splits)


def _scores(psnr: float, dist: float) -> dict[str, float]:
    return {"validation_psnr": psnr, "validation_feature_distance": dist}


def test_the_best_by_the_chosen_fidelity_wins_and_an_empty_search_says_what_to_widen():
    a, b, c = Split("teacher", 1.0, 1.0, 10, 50), Split("pruned", 0.5, 1.0, 20, 50), Split("x", 1.0, 0.5, 20, 50)
    scored = [(a, 0.2, _scores(33.0, 0.30)), (b, 0.2, _scores(31.5, 0.10)), (c, 0.2, _scores(float("nan"), 0.05))]
    best, rows = choose(scored, by="psnr")  # higher PSNR is better; a NaN score ranks last
    assert best == a and [r["name"] for r in rows] == [a.name, b.name, c.name] and rows[0]["chosen_by"] == "psnr"
    best, rows = choose(scored, by="features")  # a smaller distance is better
    assert best == c and [r["validation_feature_distance"] for r in rows] == [0.05, 0.10, 0.30]
    with pytest.raises(ConfigError, match="stack.fidelity = 'lpips'"):
        choose(scored, by="lpips")
    with pytest.raises(ConfigError, match="stack.skip_ratios"):
        choose([])
    with pytest.raises(ConfigError, match="stack.budget = 1.5"):
        candidate_splits(1.5, {"teacher": 1.0}, [1.0], 50)
    with pytest.raises(ConfigError, match="stack.fidelity"):
        load_params(None, {"stack": {"fidelity": "lpips"}})
    with pytest.raises(ConfigError, match="stack.validation_fid_samples >= 2, got 0"):
        load_params(None, {"stack": {"fidelity": "fid"}})
    fid_rows = [{"name": "a", "validation_fid": 0.9}, {"name": "b", "validation_fid": 0.4}, {"name": "c"}]
    assert [r["name"] for r in sorted(fid_rows, key=rank_key("fid"))] == ["b", "a", "c"]  # lower FID first


def test_the_search_result_reranks_by_the_other_criterion():
    from diffprune.stages.stack import Searched

    a, b = Split("teacher", 1.0, 1.0, 10, 50), Split("pruned", 0.5, 1.0, 20, 50)
    best, rows = choose([(a, 0.2, _scores(33.0, 0.30)), (b, 0.2, _scores(31.5, 0.10))], by="features")
    found = Searched(best, None, rows, {a.name: a, b.name: b}, {a.name: None, b.name: None}, {})
    assert found.best == b
    split, schedule, by_psnr = found.best_by("psnr")
    assert split == a and schedule is None and [r["name"] for r in by_psnr] == [a.name, b.name]
    assert {r["chosen_by"] for r in by_psnr} == {"psnr"}


def test_validation_scores_pair_the_first_noises_and_take_fid_over_more(tiny_unet, tiny_scheduler):
    from diffprune.metrics.fid import fid
    from diffprune.pruning.stack import VALIDATION_SEED, validation_scores

    sched, flat = sampling_scheduler(dict(tiny_scheduler.config), "ddim"), lambda x: x.flatten(1).double().numpy()
    ref = sample(ModelDenoiser(tiny_unet), sched, num_images=6, sample_shape=SHAPE, steps=3, seed=VALIDATION_SEED)
    train = flat(_images(40))
    v = validation_scores(ModelDenoiser(tiny_unet), sched, ref, 3, features=flat, reference_features=flat(ref),
                          train_features=train, fid_samples=20, batch_size=20)
    # the first 6 of the 20 are the paired noises (equal up to float rounding of the larger batch)
    assert v["psnr"].shape == (6,) and float(v["psnr"].min()) > 90
    assert v["feature_distance"].shape == (6,) and float(v["feature_distance"].max()) < 1e-10
    x = sample(ModelDenoiser(tiny_unet), sched, num_images=20, sample_shape=SHAPE, steps=3, seed=VALIDATION_SEED,
               batch_size=20)
    assert v["fid"] == pytest.approx(fid(flat(x), train))
    assert "fid" not in validation_scores(ModelDenoiser(tiny_unet), sched, ref, 3, features=flat,
                                          reference_features=flat(ref))


def test_feature_distance_is_zero_for_the_same_features_and_near_one_for_unrelated_draws():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4000, 6, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5, 0.1])
    assert torch.equal(feature_distance(ref, ref), torch.zeros(4000, dtype=torch.float64))
    unrelated = ref[torch.randperm(4000, generator=g)]
    assert float(feature_distance(unrelated, ref).mean()) == pytest.approx(1.0, abs=0.05)
    near = ref + 0.1 * torch.randn(ref.shape, generator=g)
    assert float(feature_distance(near, ref).mean()) < 0.01  # a small perturbation is near
    with pytest.raises(ValueError, match=r"\(4000, 6\) and \(4000, 5\)"):
        feature_distance(ref, ref[:, :5])


def test_switch_steps_are_where_the_serving_expert_changes():
    assert switch_steps([500], [900, 700, 500, 300, 100]) == [3]
    assert switch_steps([300, 600], [950, 650, 599, 301, 299, 0]) == [2, 4]
    assert switch_steps([500], [400, 100]) == []


# ----------------------------------------------------------------------------- experts pruned per interval

def test_experts_pruned_by_their_intervals_share_widths_but_not_channels(tiny_unet, tiny_scheduler):
    cfg = TaylorConfig(importance="diff-pruning", ratio=0.5, threshold=0.0, batch_size=8, max_timesteps=12)
    early, rep = prune_unet(tiny_unet, tiny_scheduler, _images(), cfg)
    late, rep_late = prune_unet(tiny_unet, tiny_scheduler, _images(), cfg, timesteps=(600, 1000))
    assert rep["timestep_range"] is None and rep_late["timestep_range"] == [600, 1000]
    assert rep_late["timesteps_used"] == 12 and rep_late["losses"] != rep["losses"]
    assert [p.shape for p in early.parameters()] == [p.shape for p in late.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(early.parameters(), late.parameters()))  # other channels kept
    with pytest.raises(ConfigError, match=r"timesteps = \(600, 1200\)"):
        prune_unet(tiny_unet, tiny_scheduler, _images(), cfg, timesteps=(600, 1200))


def test_experts_of_different_widths_are_refused_for_one_schedule(tiny_unet, tiny_scheduler):
    narrow, _ = prune_unet(tiny_unet, tiny_scheduler, _images(), TaylorConfig(importance="magnitude", ratio=0.5))
    with pytest.raises(ValueError, match="different widths"):
        mixture_of([tiny_unet, narrow], [500])
    with pytest.raises(ValueError, match="cost different MACs"):
        block_costs(ExpertMixtureModel([tiny_unet, narrow], [500]), SHAPE)


# ----------------------------------------------------------------------------- DiP-GO over a mixture

def test_an_all_compute_schedule_over_a_mixture_equals_the_mixture_bit_for_bit(mixture):
    graph = block_graph(mixture)
    assert isinstance(graph, RoutedGraph) and graph.block_names == block_graph(mixture.experts[0]).block_names
    sched = sampling_scheduler(SCHED, "ddim")
    keep = Schedule(keep=[[True] * len(graph.block_names)] * 6, block_names=graph.block_names)
    plain = sample(mixture.denoiser(), sched, num_images=3, sample_shape=SHAPE, steps=6, seed=2)
    gated = sample(SkipScheduleDenoiser(mixture, keep), sched, num_images=3, sample_shape=SHAPE, steps=6, seed=2)
    assert torch.equal(plain, gated)
    one = sample(ModelDenoiser(mixture.experts[0]), sched, num_images=3, sample_shape=SHAPE, steps=6, seed=2)
    assert not torch.equal(plain, one)  # both experts really serve


def test_a_schedule_over_a_mixture_computes_each_experts_first_step_whole_and_costs_what_it_predicts(mixture):
    steps = 8
    sched = sampling_scheduler(SCHED, "ddim")
    sched.set_timesteps(steps)
    forced = switch_steps(mixture.boundaries, sched.timesteps.tolist())
    assert forced == [4]
    cfg = DipgoConfig(target_ratio=0.5, steps=3, batch_size=2, pool_size=4, dim=8, tolerance=0.02)
    schedule, _ = train_pruner(mixture, SCHED, cfg, steps=steps, sample_shape=SHAPE, progress=False,
                               forced_steps=forced)
    assert all(schedule.keep[0]) and all(schedule.keep[4])
    assert schedule.macs_ratio == pytest.approx(0.5, abs=0.02) and not all(map(all, schedule.keep))
    den = stacked_denoiser(mixture, schedule)
    counted = trajectory_macs(den, sampling_scheduler(SCHED, "ddim"), list(mixture.experts), sample_shape=SHAPE,
                              steps=steps)
    assert counted == pytest.approx(schedule.macs_ratio * unet_macs(mixture.experts[0], SHAPE) * steps, rel=1e-9)
    # the post-processing keeps forced steps whole even when their scores are the lowest
    scores = torch.rand(steps, len(schedule.block_names), generator=torch.Generator().manual_seed(0))
    scores[4] = -1.0
    g = block_graph(mixture)
    s = schedule_from_scores(scores, g, block_costs(g, SHAPE), 0.5, 0.05, forced_steps=[4])
    assert all(s.keep[4])
    with pytest.raises(ValueError, match="forced_steps"):
        schedule_from_scores(scores, g, block_costs(g, SHAPE), 0.5, 0.05, forced_steps=[9])


# ----------------------------------------------------------------------------- the stage

def test_the_stack_stage_chooses_a_split_its_model_costs_it_and_round_trips_the_registry(tmp_path, monkeypatch):
    from diffprune.io import read_json
    from diffprune.stages.core import run_data, run_evaluate, run_features, run_register, run_teacher
    from diffprune.stages.experts import run_intervals
    from diffprune.stages.stack import run_stack
    from diffprune.stages.taylor import run_finetune, run_taylor
    from diffprune.targets import load_target

    for var in ("MLFLOW_TRACKING_URI", "DIFFPRUNE_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    root = make_project(tmp_path / "proj", {"evaluate": {"steps": 8},
                                            "dipgo": {"tolerance": 0.02},
                                            "stack": {"budget": 0.5, "min_steps": 2, "validation_samples": 8,
                                                      "validation_fid_samples": 12,
                                                      "nets": list(STACK_NETS), "skip_ratios": [1.0, 0.5]}},
                        stages=False)
    p = load_params(root / "params.yaml")
    with pytest.raises(ConfigError, match="run the teacher stage first"):
        run_stack(p, root, progress=False)
    for fn in (run_data, run_teacher, run_taylor, run_finetune, run_intervals, run_features):
        fn(p, root, **({} if fn in (run_data, run_taylor) else {"progress": False}))
    out = run_stack(p, root, progress=False)
    doc = read_json(root / "models/stack/stack.json")
    rows = doc["candidates"]
    assert out["chosen"] == rows[0]["name"] == doc["chosen"]["name"]
    # chosen by paired PSNR (the default), every candidate scored by the feature distance and FID too
    assert p.stack.fidelity == "psnr" and out["chosen_by"] == rows[0]["chosen_by"] == "psnr"
    assert rows[0]["validation_psnr"] == max(r["validation_psnr"] for r in rows)
    assert all(r["validation_feature_distance"] >= 0 and r["validation_fid"] >= 0 for r in rows)
    assert {r["net"] for r in rows} <= set(STACK_NETS) and len(rows) >= 3 and any("experts" in r["net"] for r in rows)
    assert all(abs(r["macs_ratio"] - 0.5) <= 0.02 * 0.5 for r in rows)  # every candidate at equal cost
    run_evaluate(p, root, "teacher", progress=False)
    m = run_evaluate(p, root, "stack", progress=False)["metrics"]
    assert m["steps"] == doc["chosen"]["steps"]  # sampled at its own steps against the 8-step teacher
    assert m["macs_ratio_vs_teacher"] == pytest.approx(doc["chosen"]["macs_ratio"], rel=1e-9)  # counted = predicted

    info = run_register(p, root, "stack")
    assert info["name"] == p.stack.model_name and run_register(p, root, "stack")["version"] == info["version"]
    images = tmp_path / "images.npy"
    code = ("import sys, numpy, mlflow.pyfunc\n"
            "m = mlflow.pyfunc.load_model(sys.argv[1], model_config={'device': 'cpu'})\n"
            f"numpy.save(sys.argv[2], m.predict({{'num_images': 3, 'seed': 5, 'steps': {m['steps']}}}))\n")
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, info["model_uri"], str(images)], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_target("stack", {"model": root / "models/stack/model", "stack": root / "models/stack/stack.json"})
    x = sample(loaded.denoiser, sampling_scheduler(loaded.scheduler_config, "ddim"), num_images=3,
               sample_shape=loaded.sample_shape, steps=loaded.steps, seed=5)
    want = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.load(images), want)


def test_the_stack_flow_runs_the_stack_and_only_what_it_is_made_from():
    from diffprune.flows.specs import needed, stage_specs
    from diffprune.flows.stack import STACK_TARGETS, stack_pipeline

    from .conftest import REPO

    assert stack_pipeline.name == "stack-pipeline"
    assert needed(STACK_TARGETS, stage_specs(REPO)) == {
        "data", "features", "teacher", "taylor", "finetune", "intervals", "stack", "evaluate@teacher",
        "evaluate@stack", "register@stack"}  # no expert, router or DiP-GO stage: the stack makes its own
