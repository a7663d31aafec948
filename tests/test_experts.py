"""Mixture of efficient experts: elastic sub-networks, router, physical pruning, stages (intervals: test_intervals.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from diffprune.config import ConfigError, load_params
from diffprune.metrics.cost import unet_macs
from diffprune.models.checkpoint import load_model, save_model
from diffprune.pruning.experts import (
    ElasticController,
    ElasticSpace,
    ExpertMixtureModel,
    ShortcutBlock,
    SkippedBlock,
    SubnetConfig,
    elastic_hook,
    elastic_space,
    importance_orders,
    load_mixture,
    prune_to_config,
    relax,
    reorder_units,
    sample_subnet,
    save_mixture,
    train_router,
    unit_importance,
)
from diffprune.training import TrainSpec, train_denoiser

from .conftest import make_project

SHAPE = (1, 8, 8)


def _images(n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * 2 - 1


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, *SHAPE, generator=g), torch.tensor([3, 420, 977])


def _out(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t).sample


@pytest.fixture
def ordered(tiny_unet, tiny_scheduler):
    """The tiny UNet with its channels put in importance order, and its elastic space."""
    space = elastic_space(tiny_unet, SHAPE, min_width=0.5)
    scores = unit_importance(tiny_unet, space, tiny_scheduler, _images(), t_min=0, t_max=500, batch_size=8, seed=0)
    reorder_units(tiny_unet, space, importance_orders(scores))
    return tiny_unet, space


def _configs(space, n: int = 6, seed: int = 1) -> list[SubnetConfig]:
    g = torch.Generator().manual_seed(seed)
    return [space.full(), space.smallest()] + [sample_subnet(space, g, 0.5) for _ in range(n)]


# ----------------------------------------------------------------------------- elastic / prune

def test_reordering_by_importance_keeps_the_function(tiny_unet, tiny_scheduler):
    x, t = _inputs()
    ref = _out(tiny_unet, x, t)
    space = elastic_space(tiny_unet, SHAPE, 0.5)
    orders = [torch.randperm(u.units, generator=torch.Generator().manual_seed(i)) for i, u in enumerate(space.units)]
    orders += [torch.randperm(s.channels, generator=torch.Generator().manual_seed(99 + i))
               for i, s in enumerate(space.streams)]
    before = copy.deepcopy(tiny_unet.state_dict())
    reorder_units(tiny_unet, space, orders)
    assert torch.allclose(_out(tiny_unet, x, t), ref, atol=1e-5)
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders)
    assert not torch.equal(before["conv_in.weight"], tiny_unet.conv_in.weight), "stream channels must move too"


def test_all_gates_on_equals_the_unpruned_expert_exactly(ordered):
    model, space = ordered
    x, t = _inputs()
    ref = _out(model, x, t)
    with ElasticController(model, space) as ctrl:
        ctrl.set(space.full())
        assert torch.equal(_out(model, x, t), ref)
        on = torch.full((len(space.units),), 20.0)
        sub = relax(space, on, on, tau=0.5)  # router: straight-through masks, all on
        assert sub.hard() == space.full()
        ctrl.set_relaxed(sub.width_masks, sub.gates)
        assert torch.equal(_out(model, x, t), ref)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), "hooks left behind"
    assert torch.equal(_out(prune_to_config(model, space, space.full(), SHAPE), x, t), ref)


def test_pruned_expert_macs_match_the_router_prediction_and_its_outputs_the_masked_net(ordered):
    model, space = ordered
    x, t = _inputs()
    teacher_macs = unet_macs(model, SHAPE)
    assert space.full_macs() == teacher_macs
    g = torch.Generator().manual_seed(3)
    for cfg in _configs(space):
        pruned = prune_to_config(model, space, cfg, SHAPE)
        assert unet_macs(pruned, SHAPE) == space.macs(cfg), cfg
        dropped = [u for u, on in zip(space.units, cfg.depth) if not on]
        shortcut = [u for u in dropped if getattr(model.get_submodule(u.name), "conv_shortcut", None) is not None]
        assert sum(isinstance(m, ShortcutBlock) for m in pruned.modules()) == len(shortcut)
        assert sum(isinstance(m, SkippedBlock) for m in pruned.modules()) == len(dropped) - len(shortcut)
        with ElasticController(model, space) as ctrl:
            ctrl.set(cfg)
            masked = _out(model, x, t)
        assert torch.allclose(_out(pruned, x, t), masked, atol=1e-5), cfg
        # the router's differentiable MACs equal the real ones in the forward pass
        wl, dl = torch.randn(space.num_logits, generator=g), torch.randn(len(space.units), generator=g)
        sub = relax(space, wl, dl, tau=0.5, gen=g)
        assert float(sub.macs) == space.macs(sub.hard()) == unet_macs(prune_to_config(model, space, sub.hard()), SHAPE)
    assert space.macs(space.smallest()) < 0.75 * teacher_macs


def _masked_and_pruned(model, space, cfg, x, t, shape=SHAPE):
    with ElasticController(model, space) as ctrl:
        ctrl.set(cfg)
        masked = _out(model, x, t)
    pruned = prune_to_config(model, space, cfg, shape)
    return masked, _out(pruned, x, t), unet_macs(pruned, shape)


def test_every_stream_segment_alone_masked_equals_pruned_with_the_predicted_macs(ordered):
    from dataclasses import replace

    model, space = ordered
    x, t = _inputs()
    full = space.full()
    # conv_in, down-1's resnet (its shortcut conv), both downsampler convs, the 6 up-block resnets
    # (all with a shortcut conv), both upsampler convs; down-0, down-2 and the mid block carry theirs on
    assert len(space.streams) == 12 and len(full.stream) == 12
    assert {s.name for s in space.streams} >= {"conv_in", "down_blocks.0.downsamplers.0", "up_blocks.2.resnets.1"}
    for s, seg in enumerate(space.streams):
        assert seg.channels % seg.blocks == 0 and (seg.norms or seg.blocks == 1)  # blocks: its GroupNorms' groups
        assert all(seg.blocks % model.get_submodule(n).num_groups == 0 for n, _ in seg.norms)
        cfg = replace(full, stream=tuple(space.stream_min_keep(s) if i == s else k for i, k in enumerate(full.stream)))
        masked, pruned, counted = _masked_and_pruned(model, space, cfg, x, t)
        assert counted == space.macs(cfg) < space.full_macs(), seg.name
        assert torch.allclose(pruned, masked, atol=1e-5), seg.name
    g = torch.Generator().manual_seed(11)
    for _ in range(3):  # everything at once, random widths, depths and stream widths
        cfg = sample_subnet(space, g, 0.3)
        masked, pruned, counted = _masked_and_pruned(model, space, cfg, x, t)
        assert counted == space.macs(cfg) and torch.allclose(pruned, masked, atol=1e-5), cfg


def test_smallest_sub_network_of_the_default_teacher_is_under_015_of_its_macs():
    from diffprune.models.unet import build_unet

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    torch.manual_seed(0)
    model = build_unet(p.teacher, p.data).eval()
    shape = (p.data.channels, p.data.image_size, p.data.image_size)
    space = elastic_space(model, shape, p.experts.min_width)
    assert space.full_macs() == unet_macs(model, shape)
    small = space.smallest()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, *shape, generator=g), torch.tensor([10, 900])
    masked, pruned, counted = _masked_and_pruned(model, space, small, x, t, shape)
    assert counted == space.macs(small)
    assert counted <= 0.15 * space.full_macs(), counted / space.full_macs()
    assert torch.allclose(pruned, masked, atol=1e-5)


def test_space_and_configs_round_trip_json_and_old_json_reads_as_full_stream(ordered):
    import json
    from dataclasses import replace

    model, space = ordered
    back = ElasticSpace.from_json(json.loads(json.dumps(space.to_json())))
    assert back == space
    for cfg in _configs(space):
        again = SubnetConfig.from_json(json.loads(json.dumps(cfg.to_json())))
        assert again == cfg and back.macs(again) == space.macs(cfg)
        old = {"width": list(cfg.width), "depth": list(cfg.depth)}  # written before the stream was elastic
        assert SubnetConfig.from_json(old).stream == ()
        assert space.macs(SubnetConfig.from_json(old)) == space.macs(replace(cfg, stream=space.full().stream))
    # a space saved before: no segments, the per-unit MACs model, the same numbers at full stream width
    legacy = {k: v for k, v in space.to_json().items() if k not in ("streams", "terms")}
    old_space = ElasticSpace.from_json(legacy)
    assert old_space.streams == () and old_space.full().stream == ()
    for cfg in _configs(old_space):
        assert old_space.macs(cfg) == space.macs(cfg)
    with ElasticController(model, old_space) as ctrl:  # and it still runs: no stream hooks
        ctrl.set(old_space.smallest())
        assert torch.isfinite(_out(model, *_inputs())).all()


def test_relaxed_macs_are_differentiable_in_the_stream_widths(ordered):
    _, space = ordered
    u = len(space.units)
    wl = torch.full((space.num_logits,), 0.3, requires_grad=True)  # keep-ratios between whole widths
    sub = relax(space, wl, torch.zeros(space.num_logits), tau=0.5)
    assert float(sub.macs.detach()) == space.macs(sub.hard())
    sub.macs.backward()
    elastic = [s for s, seg in enumerate(space.streams) if seg.size > space.stream_min_keep(s)]
    assert elastic and all(float(wl.grad[u + s]) > 0 for s in elastic)
    assert all(m.requires_grad for m in sub.stream_masks)


def test_pruned_expert_and_mixture_round_trip_bit_identically(ordered, tmp_path):
    from diffprune.targets import load_target

    model, space = ordered
    x, t = _inputs()
    cfg = _configs(space)[1]  # the smallest: fewest heads, every droppable block dropped
    pruned = prune_to_config(model, space, cfg, SHAPE)
    assert any(isinstance(m, ShortcutBlock) for m in pruned.modules())  # an up-block resnet kept only its 1x1 conv
    save_model(pruned, tmp_path / "e")
    back = load_model(tmp_path / "e")
    assert torch.equal(_out(back, x, t), _out(pruned, x, t))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in pruned.state_dict().items())

    mixture = ExpertMixtureModel([pruned, model], [500])
    save_mixture(mixture, tmp_path / "mix", scheduler_config={"num_train_timesteps": 1000})
    again = load_mixture(tmp_path / "mix")
    assert again.boundaries == [500]
    for a, b in zip(mixture.experts, again.experts):
        assert torch.equal(_out(a, x, t), _out(b, x, t))
    loaded = load_target("experts", {"model": tmp_path / "mix"})
    assert loaded.sample_shape == SHAPE and len(loaded.modules) == 2
    tt = torch.full((3,), 100)
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, tt, 0), _out(pruned, x, tt))
        assert torch.equal(loaded.denoiser(x, tt + 800, 0), _out(model, x, tt + 800))


def test_elastic_training_with_a_hook_is_reproducible_and_resumes_exactly(ordered, tiny_scheduler, tmp_path):
    model, space = ordered
    spec = TrainSpec(steps=4, batch_size=8, lr=1e-3, ema_decay=0.9, checkpoint_every=1, seed=2, t_min=0, t_max=400)
    seen: list[list[SubnetConfig]] = []

    def run(work: Path, stop_after=None):
        net = copy.deepcopy(model)
        configs: list[SubnetConfig] = []
        with ElasticController(net, space) as ctrl:
            hook = elastic_hook(ctrl, 0.5)

            def before(step, gen):
                hook(step, gen)
                configs.append(ctrl.current)

            net, _ = train_denoiser(net, _images(), tiny_scheduler, spec, work, progress=False, stop_after=stop_after,
                                    before_step=before)
        seen.append(configs)
        return net.state_dict()

    a = run(tmp_path / "a")
    b = run(tmp_path / "b")
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert seen[0] == seen[1] and len(set(seen[0])) > 1, "sub-networks must vary from step to step, reproducibly"
    run(tmp_path / "c", stop_after=2)
    c = run(tmp_path / "c")
    assert seen[3] == seen[0][2:], "a resumed run draws the same sub-networks as the uninterrupted one"
    assert all(torch.equal(v, c[k]) for k, v in a.items())


def test_router_respects_the_budget_and_is_deterministic(ordered, tiny_scheduler):
    model, space = ordered
    experts = [model, copy.deepcopy(model)]
    kw = dict(budget=0.8, train_steps=3, lr=0.05, resource_weight=2.0, tau=0.5, hidden=8, batch_size=4, seed=0)
    steps = [3, 5]
    r1 = train_router(experts, space, [(0, 500), (500, 1000)], steps, _images(), tiny_scheduler, **kw)
    r2 = train_router(experts, space, [(0, 500), (500, 1000)], steps, _images(), tiny_scheduler, **kw)
    assert r1.configs == r2.configs and r1.history == r2.history
    assert len(r1.history) == 3
    assert r1.ratio <= 0.8
    assert r1.ratio == pytest.approx(sum(space.macs(c) * n for c, n in zip(r1.configs, steps))
                                     / (space.full_macs() * sum(steps)))
    for c in r1.configs:
        space.check(c)
    assert r1.agent.width_head.weight.abs().sum() > 0, "the agent must have been trained"
    assert r1.agent.width_head.out_features == space.num_logits == len(space.units) + len(space.streams)
    assert all(p.requires_grad for p in model.parameters()) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "experts must be left as they were"


def test_router_resumes_where_it_stopped_and_matches_uninterrupted(ordered, tiny_scheduler, tmp_path, caplog):
    import logging

    model, space = ordered
    kw = dict(budget=0.8, train_steps=5, lr=0.05, resource_weight=2.0, tau=0.5, hidden=8, batch_size=4, seed=0,
              distill=0.5, checkpoint_every=2)
    args = ([model, copy.deepcopy(model)], space, [(0, 500), (500, 1000)], [3, 5], _images(), tiny_scheduler)
    full = train_router(*args, **kw, work_dir=tmp_path / "a")
    train_router(*args, **kw, work_dir=tmp_path / "b", stop_after=3)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000002", "step-00000003"]
    with caplog.at_level(logging.INFO, logger="diffprune.pruning.experts.router"):
        resumed = train_router(*args, **kw, work_dir=tmp_path / "b")
    assert "resuming the router from step 3" in caplog.text
    assert len(resumed.history) == 5 and resumed.history == full.history
    logits, again = full.agent(), resumed.agent()
    assert all(torch.equal(a, b) for a, b in zip(logits, again)), "same final width and depth logits"
    assert resumed.configs == full.configs and resumed.offset == full.offset
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000004", "step-00000005"]


def test_router_distillation_target_is_the_full_expert(ordered, tiny_scheduler):
    from dataclasses import replace

    model, space = ordered
    kw = dict(budget=1.0, train_steps=1, lr=0.01, resource_weight=0.0, tau=0.5, hidden=8, batch_size=4, seed=0)
    args = ([model], space, [(0, 1000)], [4], _images(), tiny_scheduler)
    plain = train_router(*args, **kw, distill=0.0).history[0]["denoise"]
    assert 0 < train_router(*args, **kw, distill=1.0).history[0]["denoise"] < plain
    # a space with nothing elastic: every sub-network is the full expert, which matches itself exactly
    rigid = ElasticSpace(tuple(replace(u, droppable=False) for u in space.units), space.base_macs, 1.0)
    assert train_router([model], rigid, *args[2:], **kw, distill=1.0).history[0]["denoise"] == 0.0
    with pytest.raises(ValueError, match="router.distill = 2"):
        train_router(*args, **kw, distill=2)


# ----------------------------------------------------------------------------- stages

def test_stages_end_to_end_build_a_mixture_within_budget(tmp_path):
    from diffprune.stages import core
    from diffprune.stages.core import run_data, run_teacher
    from diffprune.stages.experts import MIXTURE, run_experts, run_intervals, run_prune_experts
    from diffprune.stages.router import run_router
    from diffprune.io import read_json
    from diffprune.targets import load_target

    root = make_project(tmp_path / "proj", {
        "intervals": {"grid": 6, "k": 2, "batches": 1, "batch_size": 8, "stability_seeds": 3},
        "experts": {"fraction": 0.5, "batch_size": 8, "checkpoint_every": 2},
        "router": {"steps": 2, "batch_size": 4, "hidden": 8, "budget": 0.8},
        "prune_experts": {"fraction": 0.34, "batch_size": 8, "checkpoint_every": 2},
    }, stages=False)
    p = load_params(root / "params.yaml")
    run_data(p, root)
    run_teacher(p, root, progress=False)
    iv = run_intervals(p, root, progress=False)
    doc = read_json(root / "models/intervals/intervals.json")
    assert len(iv["boundaries"]) == 1 and (root / "models/intervals/alignment.png").stat().st_size > 0
    assert doc["objective"] >= doc["uniform_objective"] - 1e-12
    assert sum(doc["steps_served"]) == p.evaluate.steps and len(doc["steps_served"]) == 2
    assert [c["k"] for c in doc["candidates"]] == list(range(1, 7)) and doc["candidates"][1]["boundaries"] == iv[
        "boundaries"]
    assert sorted(doc["seed_boundaries"]) == ["0", "1", "2"] and doc["seed_boundaries"]["0"] == iv["boundaries"]
    assert doc["stable"] == (len({tuple(b) for b in doc["seed_boundaries"].values()}) == 1)
    # seed 0 is the main estimate: its least-aligned row is the main one's
    assert doc["seed_outlier_rows"]["0"] == doc["outlier_row"] and doc["outlier_row"]["timestep"] in doc["grid"]
    run_experts(p, root, progress=False, expert=1)
    first = load_model(root / "models/experts/elastic/expert-1")
    out = run_experts(p, root, progress=False)  # expert 1 is up to date and kept as is
    assert len(out["experts"]) == 2
    assert all(torch.equal(v, load_model(root / "models/experts/elastic/expert-1").state_dict()[k])
               for k, v in first.state_dict().items())
    with pytest.raises(ConfigError, match="expert = 5"):
        run_experts(p, root, progress=False, expert=5)
    r = run_router(p, root, progress=False)
    assert r["ratio"] <= 0.8
    rdoc = read_json(root / "models/experts/router/router.json")
    assert rdoc["steps_per_expert"] == doc["steps_served"]
    assert rdoc["adjustment"] == pytest.approx((rdoc["ratio"] - rdoc["ratio_learned"]) / 0.8)
    res = run_prune_experts(p, root, progress=False)
    assert res["trajectory_macs_ratio"] == pytest.approx(r["ratio"])
    loaded = load_target(core.TARGETS["experts"].kind, {"model": root / MIXTURE})
    assert [unet_macs(e, SHAPE) for e in loaded.modules] == read_json(root / "models/experts/router/router.json")[
        "macs_per_expert"]
    from diffprune.models.unet import sampling_scheduler
    from diffprune.sampling import sample

    x = sample(loaded.denoiser, sampling_scheduler(loaded.scheduler_config, "ddim"), num_images=2,
               sample_shape=loaded.sample_shape, steps=3)
    assert x.shape == (2, *SHAPE) and torch.isfinite(x).all()


def test_calibration_fills_the_budget_even_when_all_logits_tie(ordered):
    from dataclasses import replace

    from diffprune.pruning.experts import calibrate

    _, space = ordered
    steps = [30, 20]
    full = space.full_macs() * sum(steps)
    lo = space.macs(space.smallest()) * sum(steps) / full
    tied = torch.zeros(2, space.num_logits)  # a common offset flips every unit at once
    # the fill stops only when no single upgrade (a group, a head, a sub-block back on, one more
    # stream channel per block) fits; MACs are linear in each width, steepest at full width
    thinner = [replace(space.full(), stream=tuple(k - (i == s) for i, k in enumerate(space.full().stream)))
               for s in range(len(space.streams)) if space.streams[s].size > space.stream_min_keep(s)]
    step = max([u.macs_fixed + u.units * u.macs_per_unit for u in space.units]
               + [space.full_macs() - space.macs(c) for c in thinner]) * max(steps) / full
    for budget in (lo + 0.1, 0.5 * (lo + 1), 0.95):
        _, cfgs = calibrate(space, tied, tied, steps, budget, tau=0.5)
        r = sum(space.macs(c) * n for c, n in zip(cfgs, steps)) / full
        assert budget - step <= r <= budget, (budget, r)
    _, small = calibrate(space, tied, tied, steps, lo / 2, tau=0.5)
    assert small == [space.smallest()] * 2  # below the smallest mixture: the smallest, with a warning

