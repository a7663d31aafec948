"""DiP-GO: block graph, SuperNet, skip-schedule sampler, schedules and pruner training (tiny, CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffprune.config import DataConfig, DipgoConfig, TeacherConfig
from diffprune.metrics.cost import MacCounter, unet_macs
from diffprune.models.unet import build_scheduler, build_unet, sampling_scheduler
from diffprune.pruning.dipgo import OUTPUT, ConsistencyLoss, GatedRunner, GatePruner, Schedule, SkipScheduleDenoiser
from diffprune.pruning.dipgo import block_costs, block_graph, deepcache_schedule, random_schedule
from diffprune.pruning.dipgo import save_heatmap, schedule_from_scores, schedule_macs, skip_savings, ste_gates
from diffprune.pruning.dipgo import train_pruner
from diffprune.pruning.dipgo.gates import fitted_ssim_window
from diffprune.pruning.dipgo.pruner import warmup_cosine
from diffprune.sampling import ModelDenoiser, sample, trajectory
from diffprune.training import TrainState

SHAPE = (1, 8, 8)
T = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_unet(
        TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False], norm_num_groups=4),
        DataConfig(image_size=8),
    )
    return m.eval()


@pytest.fixture(scope="module")
def sched_config():
    return dict(build_scheduler(TeacherConfig()).config)


@pytest.fixture(scope="module")
def ddim(sched_config):
    return sampling_scheduler(sched_config, "ddim")


def _all_keep(model, steps: int = T) -> Schedule:
    g = block_graph(model)
    return Schedule(keep=[[True] * len(g.block_names)] * steps, block_names=g.block_names, consumers=g.consumers)


def _no_hooks(model) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m)
        and not hasattr(m, "_diffusers_hook")
        for m in model.modules()
    )


# ------------------------------------------------------------------------- block graph

def test_graph_blocks_and_consumers(model):
    g = block_graph(model)
    assert g.block_names == ["down_0", "down_1", "down_2", "mid", "up_0", "up_1", "up_2"]
    c = dict(zip(g.block_names, g.consumers))
    names = g.block_names
    # the residual stack: up_2 reads down_0's resnet output, up_1 down_0's downsample and down_1's resnet
    assert [names[i] for i in c["down_0"]] == ["down_1", "up_1", "up_2"]
    assert [names[i] for i in c["mid"]] == ["up_0"]
    assert c["up_2"] == [OUTPUT]


def test_graph_forward_equals_model(model):
    g = block_graph(model)
    x, t = torch.randn(3, *SHAPE), torch.tensor([5, 500, 999])
    with torch.no_grad():
        assert torch.equal(g.forward(x, t, lambda k, compute: compute()), model(x, t).sample)


def test_graph_runs_the_models_own_forward_through_removable_block_hooks(model):
    g = block_graph(model)
    x, t = torch.randn(2, *SHAPE), torch.tensor([3, 600])
    calls, seen = [], []
    handle = model.register_forward_hook(lambda mod, args, out: calls.append(type(out).__name__))
    try:
        with g.hooks(lambda k, compute: seen.append(k) or compute()):
            assert all(hasattr(m, "_diffusers_hook") for m in g.block_modules)
            with torch.no_grad():
                out = model(x, t).sample
    finally:
        handle.remove()
    assert calls == ["UNet2DOutput"] and seen == list(range(len(g.block_names)))  # execution order
    assert _no_hooks(model)
    with torch.no_grad():
        assert torch.equal(out, model(x, t).sample)


def test_block_hooks_are_removed_when_a_block_call_fails(model):
    g = block_graph(model)

    def fail_at_mid(k, compute):
        if g.block_names[k] == "mid":
            raise RuntimeError("boom")
        return compute()

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        g.forward(torch.randn(1, *SHAPE), torch.tensor([5]), fail_at_mid)
    assert _no_hooks(model)


def test_blocks_not_needed_are_not_computed(model):
    """Reusing up_0 frees mid and down_2: neither runs, and the model's forward still completes."""
    g = block_graph(model)
    r = GatedRunner(g)
    x, t = torch.randn(2, *SHAPE), torch.tensor([100, 900])
    with torch.no_grad():
        r.step_hard(x, t, [True] * 7)
        keep = [name != "up_0" for name in g.block_names]
        counters = [MacCounter(m) for m in g.block_modules]
        for c in counters:
            c.__enter__()
        try:
            r.step_hard(x, t, keep)
        finally:
            for c in counters:
                c.__exit__(None, None, None)
    ran = {name for name, c in zip(g.block_names, counters) if c.total > 0}
    assert ran == {"down_0", "down_1", "up_1", "up_2"}
    assert _no_hooks(model)


def test_block_costs_sum_to_model_macs(model):
    costs = block_costs(model, SHAPE)
    assert costs.full == unet_macs(model, SHAPE)
    assert all(c > 0 for c in costs.blocks) and costs.always > 0


def test_gamma_counts_blocks_made_unnecessary(model):
    g = block_graph(model)
    costs = block_costs(model, SHAPE)
    gamma = dict(zip(g.block_names, skip_savings(g.consumers, costs)))
    own = dict(zip(g.block_names, costs.blocks))
    # reusing up_0 frees mid and down_2, which feed only it
    assert gamma["up_0"] == own["up_0"] + own["mid"] + own["down_2"]
    assert gamma["mid"] < gamma["up_0"] and gamma["down_2"] < gamma["up_0"]
    assert gamma["up_0"] < gamma["up_1"] < gamma["up_2"] == sum(costs.blocks)
    assert gamma["down_1"] == own["down_1"]  # down_0 still feeds up_1 and up_2


# ------------------------------------------------------------------------- skip-schedule sampler

def test_all_compute_schedule_reproduces_plain_sampler(model, ddim):
    kw = dict(num_images=3, sample_shape=SHAPE, steps=T, seed=1)
    plain = sample(ModelDenoiser(model), ddim, **kw)
    skip = sample(SkipScheduleDenoiser(model, _all_keep(model)), ddim, **kw)
    assert torch.equal(plain, skip)


@pytest.mark.parametrize("kind", ["deepcache", "random"])
def test_executed_macs_equal_schedule_macs(model, ddim, kind):
    if kind == "deepcache":
        s = deepcache_schedule(model, T, interval=3, branch=1, sample_shape=SHAPE)
    else:
        s = random_schedule(model, T, 0.5, SHAPE, seed=3, tolerance=0.05)
    with MacCounter(model) as counter:
        sample(SkipScheduleDenoiser(model, s), ddim, num_images=2, sample_shape=SHAPE, steps=T, batch_size=1)
    predicted = schedule_macs(model, s, SHAPE)
    assert counter.total == 2 * predicted
    assert predicted < block_costs(model, SHAPE).full * T
    assert s.macs_ratio == pytest.approx(predicted / (block_costs(model, SHAPE).full * T))


def test_skipping_schedule_changes_samples(model, ddim):
    s = deepcache_schedule(model, T, interval=2, branch=0, sample_shape=SHAPE)
    kw = dict(num_images=2, sample_shape=SHAPE, steps=T, seed=0)
    assert not torch.equal(sample(ModelDenoiser(model), ddim, **kw), sample(SkipScheduleDenoiser(model, s), ddim, **kw))


def test_model_untouched_after_sampling_and_reset(model, ddim):
    x, t = torch.randn(2, *SHAPE), torch.tensor([10, 700])
    with torch.no_grad():
        before = model(x, t).sample
    den = SkipScheduleDenoiser(model, deepcache_schedule(model, T, 2, 0, SHAPE))
    sample(den, ddim, num_images=1, sample_shape=SHAPE, steps=T)
    assert any(b is not None for b in den.runner.backup)
    den.reset()
    assert all(b is None for b in den.runner.backup)
    assert _no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, before)


def test_denoiser_rejects_wrong_length_and_names(model, ddim):
    s = _all_keep(model)
    with pytest.raises(ValueError, match="schedule has 6"):
        sample(SkipScheduleDenoiser(model, s), ddim, num_images=1, sample_shape=SHAPE, steps=T + 1)
    bad = dataclasses.replace(s, block_names=[f"b{i}" for i in range(len(s.block_names))])
    with pytest.raises(ValueError, match="do not match"):
        SkipScheduleDenoiser(model, bad)


def test_soft_supernet_forward_equals_hard_schedule(model, ddim):
    """Training's SuperNet with 0/1 gates computes exactly what the skip-schedule sampler runs."""
    s = random_schedule(model, T, 0.5, SHAPE, seed=0, tolerance=0.05)
    g = block_graph(model)
    noise = torch.randn(2, *SHAPE)
    gates = s.keep_tensor().float()
    r = GatedRunner(g)
    soft = trajectory(r.denoiser(gates, soft=True), ddim, noise, T)
    hard = trajectory(r.denoiser(s.keep), ddim, noise, T)
    assert torch.equal(soft, hard)


# ------------------------------------------------------------------------- schedules

def test_schedule_validation_and_json_roundtrip(model, tmp_path):
    s = random_schedule(model, T, 0.6, SHAPE, seed=1, tolerance=0.05)
    path = s.save(tmp_path / "schedule.json")
    back = Schedule.load(path)
    assert back == s and back.keep_tensor().shape == (T, 7)
    with pytest.raises(ValueError, match="step 0"):
        Schedule(keep=[[False] * 7] * 2, block_names=s.block_names)
    with pytest.raises(ValueError, match="expected 7"):
        Schedule(keep=[[True] * 6], block_names=s.block_names)


def test_heatmap_png(model, tmp_path):
    s = deepcache_schedule(model, T, 3, 1, SHAPE)
    p = save_heatmap(s, tmp_path / "h" / "heatmap.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [q.name for q in p.parent.iterdir()] == ["heatmap.png"]  # no temporary left behind


@pytest.mark.parametrize("target", [0.2, 0.45, 0.7])
def test_bisection_reaches_target_within_tolerance(model, target):
    g = block_graph(model)
    steps = 20
    scores = torch.rand(steps, 7, generator=torch.Generator().manual_seed(0))
    s = schedule_from_scores(scores, g, block_costs(model, SHAPE), target, tolerance=0.0125)
    assert abs(s.macs_ratio - target) <= 0.0125
    assert all(s.keep[0])
    assert schedule_macs(model, s, SHAPE) == pytest.approx(s.macs_ratio * block_costs(model, SHAPE).full * steps)


def test_a_target_between_whole_steps_is_reached_by_swapping_gates(model):
    """Scores that rank the last block lowest at every step: every other gate is free (its output is
    not needed while the last block is reused), and keeping any last-block gate adds a whole step.
    The rank-order fill alone stalls below the band (0.5923 for 0.62); the swap keeps a last-block
    gate and drops the cheapest kept gates to land in it."""
    g = block_graph(model)
    steps, costs = 4, block_costs(model, SHAPE)
    last = g.block_names.index(g.block_names[-1])
    scores = torch.linspace(1.0, 0.5, steps * 7).reshape(steps, 7)
    scores[:, last] = torch.linspace(0.2, 0.1, steps)
    target = 0.62  # step 0 alone is 0.25, whole steps give 0.5 / 0.75
    s = schedule_from_scores(scores, g, costs, target, tolerance=0.0125)
    assert abs(s.macs_ratio - target) <= 0.0125
    assert schedule_macs(model, s, SHAPE) == pytest.approx(s.macs_ratio * costs.full * steps)


def test_bisection_unreachable_target_raises(model):
    g = block_graph(model)
    with pytest.raises(ValueError, match="minimum possible"):
        schedule_from_scores(torch.rand(4, 7), g, block_costs(model, SHAPE), 0.05)


# ------------------------------------------------------------------------- pruner

def test_initial_pruner_keeps_everything():
    p = GatePruner(num_steps=T, num_blocks=7, dim=16)
    gates = ste_gates(p())
    assert gates.shape == (T, 7) and torch.equal(gates, torch.ones(T, 7))
    assert torch.equal(p(), torch.tensor([0.0, 1.0]).expand(T, 7, 2))  # last layer: weight 0, bias [0, 1]
    assert (p.keep_scores() > 0.5).all()


def test_pruner_has_one_head_per_query():
    """Each (step, block) query has its own MLP head: a loss on one logit reaches only its head."""
    p = GatePruner(num_steps=3, num_blocks=4, dim=32, seed=1)
    assert [tuple(w.shape) for w in p.weights] == [(12, 32, 8), (12, 8, 8), (12, 8, 2)]
    with torch.no_grad():
        p.weights[-1].normal_()
    logits = p()
    q = 1 * 4 + 2  # step 1, block 2
    manual = p.queries[q]
    for i, (w, b) in enumerate(zip(p.weights, p.biases)):
        manual = manual @ w[q] + b[q]
        manual = torch.relu(manual) if i < 2 else manual
    assert torch.allclose(logits[1, 2], manual, atol=1e-6)
    logits[1, 2, 1].backward()
    for w in p.weights:
        touched = (w.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
        assert touched == [q]


def test_warmup_cosine_lr_factor():
    f = warmup_cosine(3, 13)
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == 1.0 and f(8) == pytest.approx(0.5) and f(13) == pytest.approx(0.0)


def test_ste_gates_are_hard_forward_soft_backward():
    logits = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]], requires_grad=True)
    g = ste_gates(logits)
    assert g.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    g[1, 0].backward()
    assert logits.grad[1, 0, 1] > 0 and logits.grad[0].abs().sum() == 0  # step 0 is a constant


def test_consistency_loss_kinds():
    a, b = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    for kind in ("ssim", "l1", "l2"):
        assert ConsistencyLoss(kind)(a, a).abs() < 1e-6 < ConsistencyLoss(kind)(a, b)
    feats = ConsistencyLoss("features", features=lambda x: x.flatten(1))
    assert feats(a, a) == 0 < feats(a, b)
    assert fitted_ssim_window(8, 8) == 3 and fitted_ssim_window(32, 32) == 11 and fitted_ssim_window(16, 20) == 7
    with pytest.raises(ValueError, match="needs a feature map"):
        ConsistencyLoss("features")
    with pytest.raises(NotImplementedError, match="unknown consistency loss"):
        ConsistencyLoss("lpips")


def test_training_reduces_kept_ratio_toward_target(model, sched_config, tmp_path):
    params = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    cfg = DipgoConfig(target_ratio=0.5, steps=12, batch_size=2, pool_size=4, dim=64, tolerance=0.05, alpha_s=4.0,
                      lr=2.0, warmup_steps=2)
    schedule, info = train_pruner(model, sched_config, cfg, steps=T, sample_shape=SHAPE, progress=False)
    kept = [h["kept_ratio"] for h in info["history"]]
    # the sparsity term at the full model: the kept MACs fraction of a step (sum of gamma), over steps 1..T-1
    assert info["history"][0]["sparsity"] == pytest.approx(4.0 * sum(info["gamma"]), rel=1e-5)
    assert [h["lr"] for h in info["history"][:3]] == pytest.approx([2.0 / 3, 4.0 / 3, 2.0])  # linear warm-up
    assert all(h["grad_norm"] >= 0 for h in info["history"])
    assert kept[0] == 1.0 and kept[-1] < 0.9  # starts from the full model, prunes toward the target
    assert abs(info["history"][0]["consistency"]) < 1e-6  # the initial SubNet is the full model
    assert abs(schedule.macs_ratio - 0.5) <= 0.05
    assert schedule.num_steps == T and schedule.method == "dipgo"
    # the teacher is untouched: same weights, same requires_grad flags, no hooks
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert _no_hooks(model)
    schedule.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json").keep == schedule.keep


def test_training_needs_a_deterministic_sampler(model, sched_config):
    with pytest.raises(NotImplementedError, match="deterministic sampler"):
        train_pruner(model, sched_config, DipgoConfig(steps=1), steps=T, sample_shape=SHAPE, sampler="ddpm",
                     progress=False)


def test_pruner_training_resumes_to_the_same_schedule(tmp_path, monkeypatch):
    """Interrupted pruner training (state checkpointed every 2 steps) resumes and ends identically."""
    from diffprune.config import DataConfig, DipgoConfig, TeacherConfig
    from diffprune.models.unet import build_scheduler, build_unet
    from diffprune.pruning.dipgo import train_pruner

    torch.manual_seed(0)
    model = build_unet(TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False],
                                     norm_num_groups=4), DataConfig()).eval()
    sc = dict(build_scheduler(TeacherConfig()).config)
    cfg = DipgoConfig(target_ratio=0.5, steps=4, batch_size=2, pool_size=4, dim=8, tolerance=0.1)  # 4x7 gates: coarse
    kw = dict(steps=4, sample_shape=(1, 8, 8), progress=False, checkpoint_every=2)
    full, full_info = train_pruner(model, sc, cfg, work_dir=tmp_path / "a", **kw)
    real_save = TrainState.save

    def save_then_die(self, step, **kwargs):
        real_save(self, step, **kwargs)
        raise KeyboardInterrupt("killed after the checkpoint at step 2")

    monkeypatch.setattr(TrainState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_pruner(model, sc, cfg, work_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(TrainState, "save", real_save)
    [state] = TrainState(tmp_path / "b" / "pruner-state", {}).checkpoints()
    assert json.loads((state / "meta.json").read_text())["step"] == 2
    resumed, info = train_pruner(model, sc, cfg, work_dir=tmp_path / "b", **kw)
    assert [h["step"] for h in info["history"]] == [0, 1, 2, 3]
    assert resumed.keep == full.keep
    assert info["scores"] == full_info["scores"]  # the trained pruner itself, bit for bit
    assert [h["loss"] for h in info["history"]] == [h["loss"] for h in full_info["history"]]
