"""Diff-Pruning on tiny seeded UNets: structure, attributes, checkpoints, timestep threshold, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from diffprune.config import ConfigError, DataConfig, FinetuneConfig, TaylorConfig, TeacherConfig
from diffprune.metrics.cost import num_parameters, unet_macs
from diffprune.models.checkpoint import load_model, save_model
from diffprune.models.unet import build_unet
from diffprune.pruning.surgery import PruningError, check_pruned, head_dim
from diffprune.pruning.groupnorm import ReferenceTaylorImportance, heads_to_remove, rank_within_blocks
from diffprune.pruning.taylor import (
    accumulate_timestep_gradients,
    finetune_spec,
    make_importance,
    prune_unet,
    search_ratio,
)

T_TRAIN = 20  # training timesteps of the test scheduler: keeps the gradient loop short


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_teacher() -> UNet2DModel:
    """1x8x8, attention at the middle level, layers_per_block=1, norm_num_groups=4."""
    return build_unet(TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False], norm_num_groups=4),
                      DataConfig(image_size=8))


def _no_attention() -> UNet2DModel:
    """1x8x8, no attention anywhere, layers_per_block=2, norm_num_groups=2."""
    return build_unet(TeacherConfig(block_out_channels=[4, 8], attention=[False, False], layers_per_block=2,
                                    norm_num_groups=2), DataConfig(image_size=8))


def _all_attention_rgb() -> UNet2DModel:
    """3x8x8, attention at every level (2 and 4 heads), layers_per_block=2, norm_num_groups=8."""
    return build_unet(TeacherConfig(block_out_channels=[16, 32], attention=[True, True], layers_per_block=2,
                                    norm_num_groups=8), DataConfig(image_size=8, channels=3))


def _resnet_resampling() -> UNet2DModel:
    """3x8x8, resampling by ResnetBlock2D(down/up=True): conv-less Downsample2D/Upsample2D inside."""
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), downsample_type="resnet",
                       upsample_type="resnet", norm_num_groups=4, attention_head_dim=4)


CONFIGS = {
    "tiny-teacher": _tiny_teacher,
    "no-attention": _no_attention,
    "all-attention-rgb": _all_attention_rgb,
    "resnet-resampling": _resnet_resampling,
}


def _seeded(build) -> UNet2DModel:
    torch.manual_seed(0)
    return build().eval()


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type)


def _images(model: UNet2DModel, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c, s = model.config.in_channels, model.config.sample_size
    return torch.rand((n, c, s, s), generator=g) * 2 - 1  # (N, C, H, W) in [-1, 1]


def _cfg(**kw) -> TaylorConfig:
    base = dict(importance="diff-pruning", ratio=0.5, threshold=0.05, batch_size=8, max_timesteps=4, seed=0)
    return TaylorConfig(**(base | kw))


def _assert_attributes_match_shapes(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            assert (m.in_channels, m.out_channels) == (m.conv1.in_channels, m.conv2.out_channels), name
            assert m.norm1.num_channels == m.in_channels, name
        if isinstance(m, (Downsample2D, Upsample2D)) and isinstance(m.conv, nn.Conv2d):
            assert (m.channels, m.out_channels) == (m.conv.in_channels, m.conv.out_channels), name
        if isinstance(m, Attention):
            assert m.heads * head_dim(m) == m.to_q.out_features == m.inner_dim, name
            assert m.inner_kv_dim == m.to_k.out_features == m.to_v.out_features, name
            assert m.query_dim == m.to_q.in_features and m.out_dim == m.to_out[0].out_features, name


@pytest.fixture(scope="module")
def pruned_tiny() -> tuple[UNet2DModel, UNet2DModel, dict]:
    teacher = _seeded(_tiny_teacher)
    pruned, report = prune_unet(teacher, _scheduler(), _images(teacher), _cfg())
    return teacher, pruned.eval(), report


# ----------------------------------------------------------------------------- structure + checkpoint

@pytest.mark.parametrize("name", list(CONFIGS))
def test_prune_shrinks_runs_and_round_trips(name: str, tmp_path) -> None:
    teacher = _seeded(CONFIGS[name])
    shape = (teacher.config.in_channels, 8, 8)
    before = copy.deepcopy(teacher.state_dict())
    pruned, report = prune_unet(teacher, _scheduler(), _images(teacher), _cfg())
    pruned.eval()

    # the teacher is not modified; the pruned copy is strictly cheaper and its report says so
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert report["params_after"] == num_parameters(pruned) < num_parameters(teacher) == report["params_before"]
    assert report["macs_after"] == unet_macs(pruned, shape) < unet_macs(teacher, shape) == report["macs_before"]
    # the output conv keeps every output channel
    assert pruned.conv_out.out_channels == pruned.conv_out.weight.shape[0] == teacher.config.out_channels
    _assert_attributes_match_shapes(pruned)

    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 17])
    with torch.no_grad():
        y = pruned(x, t).sample
    assert y.shape == x.shape

    save_model(pruned, tmp_path / "ck")
    fresh = load_model(tmp_path / "ck")
    assert fresh is not pruned
    _assert_attributes_match_shapes(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x, t).sample, y)


def test_attention_loses_whole_heads() -> None:
    teacher = _seeded(_all_attention_rgb)
    heads_before = {n: m.heads for n, m in teacher.named_modules() if isinstance(m, Attention)}
    width_before = {n: head_dim(m) for n, m in teacher.named_modules() if isinstance(m, Attention)}
    scale_before = {n: m.scale for n, m in teacher.named_modules() if isinstance(m, Attention)}
    pruned, _ = prune_unet(teacher, _scheduler(), _images(teacher), _cfg(importance="magnitude", ratio=0.5))
    attn = {n: m for n, m in pruned.named_modules() if isinstance(m, Attention)}
    assert sorted(set(heads_before.values())) == [2, 4]
    for n, m in attn.items():
        assert m.heads == heads_before[n] - heads_before[n] // 2  # floor(0.5 * heads) removed
        assert head_dim(m) == width_before[n] == 8 and m.scale == scale_before[n]
        assert m.heads * 8 == m.to_q.out_features == m.to_k.out_features == m.to_v.out_features


@pytest.mark.parametrize("heads,ratio,removed", [(1, 0.5, 0), (2, 0.3, 0), (2, 0.5, 1), (8, 0.3, 2), (4, 0.99, 3)])
def test_heads_to_remove_floors_and_keeps_one(heads: int, ratio: float, removed: int) -> None:
    assert heads_to_remove(heads, ratio) == removed


# ----------------------------------------------------------------------------- timestep threshold

def _stub_losses(values: list[float]) -> tuple[nn.Parameter, list[int], object]:
    """A parameter w = 1 and ``t -> values[t] * w``: the gradient of w is the sum of used values."""
    w = nn.Parameter(torch.ones(()))
    calls: list[int] = []

    def loss_at(t: int) -> torch.Tensor:
        calls.append(t)
        return values[t] * w

    return w, calls, loss_at


def test_threshold_stops_at_first_small_relative_loss() -> None:
    values = [1.0, 0.8, 0.5, 0.2, 0.05, 0.01]
    w, calls, loss_at = _stub_losses(values)
    trace = accumulate_timestep_gradients(loss_at, threshold=0.1, max_timesteps=len(values))
    assert trace.timesteps_used == 4  # 0.05 / 1.0 < 0.1 stops at t = 4
    assert calls == [0, 1, 2, 3, 4] and trace.losses == pytest.approx((1.0, 0.8, 0.5, 0.2, 0.05))
    assert w.grad.item() == pytest.approx(1.0 + 0.8 + 0.5 + 0.2)  # accumulated, stopping step excluded


def test_threshold_zero_uses_every_timestep_up_to_the_cap() -> None:
    values = [1.0, 0.8, 0.5, 0.2, 0.05, 0.01]
    w, calls, loss_at = _stub_losses(values)
    trace = accumulate_timestep_gradients(loss_at, threshold=0.0, max_timesteps=5)
    assert trace.timesteps_used == 5 and calls == [0, 1, 2, 3, 4]
    assert w.grad.item() == pytest.approx(sum(values[:5]))


def test_threshold_is_relative_to_the_running_maximum() -> None:
    values = [0.3, 1.0, 0.4, 0.09, 2.0]
    _, _, loss_at = _stub_losses(values)
    trace = accumulate_timestep_gradients(loss_at, threshold=0.1, max_timesteps=5)
    assert trace.timesteps_used == 3  # 0.09 < 0.1 * max(0.3, 1.0, 0.4); the first step never stops


def test_prune_unet_threshold_uses_fewer_timesteps() -> None:
    # v-prediction on all-zero images: the target is sqrt(abar_t) * noise, so L_t decays with t
    teacher = _seeded(_tiny_teacher)
    zeros = torch.zeros(8, 1, 8, 8)
    sched = _scheduler("v_prediction")
    runs = {
        (imp, thr): prune_unet(teacher, sched, zeros, _cfg(importance=imp, threshold=thr, max_timesteps=T_TRAIN))[1]
        for imp, thr in [("diff-pruning", 0.0), ("diff-pruning", 0.5), ("taylor", 0.5)]
    }
    all_steps = runs["diff-pruning", 0.0]
    early = runs["diff-pruning", 0.5]
    assert all_steps["timesteps_used"] == T_TRAIN
    assert 1 <= early["timesteps_used"] < T_TRAIN
    losses = early["losses"]
    assert losses[-1] < 0.5 * max(losses) and all(v >= 0.5 * max(losses[: i + 1]) for i, v in enumerate(losses[:-1]))
    assert runs["taylor", 0.5]["timesteps_used"] == T_TRAIN and runs["taylor", 0.5]["threshold"] == 0.0


# ----------------------------------------------------------------------------- importances

@pytest.mark.parametrize("importance", ["diff-pruning", "taylor", "magnitude", "random"])
def test_each_importance_prunes(importance: str, pruned_tiny) -> None:
    teacher, reference, _ = pruned_tiny
    pruned, report = prune_unet(teacher, _scheduler(), _images(teacher), _cfg(importance=importance))
    assert report["importance"] == importance
    assert report["params_after"] == num_parameters(reference)  # same per-layer ratio -> same shapes
    assert (report["timesteps_used"] > 0) == (importance in ("diff-pruning", "taylor"))
    assert all(p.grad is None for p in pruned.parameters())


def test_importances_choose_different_channels(pruned_tiny) -> None:
    teacher, _, _ = pruned_tiny
    kept = {imp: prune_unet(teacher, _scheduler(), _images(teacher), _cfg(importance=imp))[0].state_dict()
            for imp in ("diff-pruning", "magnitude", "random")}

    def differ(a: str, b: str) -> int:
        return sum(not torch.equal(kept[a][k], kept[b][k]) for k in kept[a])

    assert differ("diff-pruning", "magnitude") > 0 and differ("random", "magnitude") > 0


def test_random_importance_is_seeded(pruned_tiny) -> None:
    teacher, _, _ = pruned_tiny
    runs = [prune_unet(teacher, _scheduler(), _images(teacher), _cfg(importance="random", seed=s))[0]
            for s in (0, 0, 1)]
    weights = [r.conv_in.weight for r in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_unknown_importance_is_refused() -> None:
    with pytest.raises(ConfigError, match="'l1'"):
        make_importance("l1")


# ----------------------------------------------------------------------------- errors name the layer

def test_unsupported_network_fails_naming_a_layer() -> None:
    # NCSN++-style skip blocks: torch-pruning does not couple the FIR skip path's channels, so the
    # pruned copy is inconsistent (per-GroupNorm-block counts; upstream's rounding failed at skip_conv)
    torch.manual_seed(0)
    skip = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "SkipUpBlock2D"), norm_num_groups=4, add_attention=False)
    before = copy.deepcopy(skip.state_dict())
    with pytest.raises(PruningError, match=r"pruned network fails at down_blocks\.0\.resnet_down\.conv1 \(Conv2d\)"):
        prune_unet(skip, _scheduler(), _images(skip), _cfg(importance="magnitude"))
    assert all(torch.equal(before[k], v) for k, v in skip.state_dict().items())


STALE = [
    ("down_blocks.0.downsamplers.0", "channels"),
    ("down_blocks.0.downsamplers.0", "out_channels"),
    ("up_blocks.1.upsamplers.0", "channels"),
    ("up_blocks.1.upsamplers.0", "out_channels"),
    ("down_blocks.1.resnets.0", "in_channels"),
    ("down_blocks.1.resnets.0", "out_channels"),
    ("mid_block.attentions.0", "heads"),
    ("mid_block.attentions.0", "inner_dim"),
    ("mid_block.attentions.0", "inner_kv_dim"),
    ("mid_block.attentions.0", "query_dim"),
    ("mid_block.attentions.0", "out_dim"),
]


@pytest.mark.parametrize("module,attr", STALE)
def test_every_repaired_attribute_is_checked(module: str, attr: str, pruned_tiny) -> None:
    teacher, pruned, _ = pruned_tiny
    broken = copy.deepcopy(pruned)
    stale = getattr(teacher.get_submodule(module), attr)
    assert getattr(broken.get_submodule(module), attr) != stale  # pruning changed it and it was repaired
    setattr(broken.get_submodule(module), attr, stale)
    with pytest.raises(PruningError, match=rf"inconsistent at {module.replace('.', '[.]')} "):
        check_pruned(broken, (1, 8, 8))


def test_forward_failure_names_the_innermost_layer(pruned_tiny) -> None:
    _, pruned, _ = pruned_tiny
    broken = copy.deepcopy(pruned)
    conv2 = broken.down_blocks[0].resnets[0].conv2
    tp.prune_conv_in_channels(conv2, idxs=[0])  # self-consistent, but its input still has the old width
    with pytest.raises(PruningError, match=r"fails at down_blocks\.0\.resnets\.0\.conv2 \(Conv2d\)"):
        check_pruned(broken, (1, 8, 8))


# ----------------------------------------------------------------------------- fine-tuning budget

@pytest.mark.parametrize("fraction,teacher_steps,steps", [(0.2, 1200, 240), (0.1, 30, 3), (0.15, 7, 2), (0.01, 10, 1)])
def test_finetune_spec_steps(fraction: float, teacher_steps: int, steps: int) -> None:
    cfg = FinetuneConfig(fraction=fraction, lr=5e-4, batch_size=16, warmup_steps=3, ema_decay=0.99, seed=7)
    spec = finetune_spec(cfg, teacher_steps)
    assert spec.steps == steps
    assert (spec.lr, spec.batch_size, spec.warmup_steps, spec.ema_decay, spec.seed) == (5e-4, 16, 3, 0.99, 7)


def test_finetune_spec_refuses_empty_teacher() -> None:
    with pytest.raises(ConfigError, match="teacher.steps = 0"):
        finetune_spec(FinetuneConfig(), 0)


# ----------------------------------------------------------------------------- GroupNorm groups (reference)

def _eight_per_group() -> UNet2DModel:
    """1x8x8, no attention, 16 channels in 2 GroupNorm groups of 8 at every level."""
    return build_unet(TeacherConfig(block_out_channels=[16, 16], attention=[False, False], layers_per_block=1,
                                    norm_num_groups=2), DataConfig(image_size=8))


def _kept(teacher_bias: torch.Tensor, pruned_bias: torch.Tensor) -> list[int]:
    """Teacher channel index of every channel the pruned layer kept (biases are distinct)."""
    return [int((teacher_bias == b).nonzero().item()) for b in pruned_bias]


def _resnet_conv1s(model: UNet2DModel) -> dict[str, nn.Conv2d]:
    return {n: m.conv1 for n, m in model.named_modules() if isinstance(m, ResnetBlock2D)}


@pytest.mark.parametrize("importance", ["diff-pruning", "magnitude"])
def test_each_groupnorm_group_loses_floor_ratio_channels(importance: str) -> None:
    teacher = _seeded(_eight_per_group)
    pruned, _ = prune_unet(teacher, _scheduler(), _images(teacher), _cfg(importance=importance, ratio=0.3))
    norms = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.GroupNorm)}
    for n, m in norms.items():  # 8 -> 6 per group (upstream's rounding kept int(0.7 * 8) = 5)
        assert m.num_channels == teacher.get_submodule(n).num_channels * 6 // 8, n
    before, after = _resnet_conv1s(teacher), _resnet_conv1s(pruned)
    for n, conv in after.items():
        kept = _kept(before[n].bias.detach(), conv.bias.detach())
        assert [sum(k // 8 == g for k in kept) for g in range(2)] == [6, 6], n  # 2 of 8 in EACH group


@pytest.mark.parametrize("importance", ["diff-pruning", "taylor", "magnitude"])
def test_selection_within_a_group_follows_importance(importance: str) -> None:
    teacher = _seeded(_eight_per_group)
    block = teacher.down_blocks[0].resnets[0]
    with torch.no_grad():  # channel 11 (second group) owns no weight anywhere: it scores 0
        for w in (block.conv1.weight[11], block.conv1.bias[11:12], block.time_emb_proj.weight[11],
                  block.time_emb_proj.bias[11:12], block.norm2.weight[11:12], block.conv2.weight[:, 11]):
            w.zero_()
    pruned, _ = prune_unet(teacher, _scheduler(), _images(teacher), _cfg(importance=importance, ratio=0.15))
    kept = _kept(block.conv1.bias.detach(), pruned.down_blocks[0].resnets[0].conv1.bias.detach())
    assert sorted(set(range(16)) - set(kept))[1] == 11 and 11 not in kept  # floor(0.15 * 8) = 1 per group


def test_score_sums_squared_taylor_terms_including_groupnorm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 1))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 1, 2, 2))
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net[1].weight.data = torch.tensor([1.0, 2.0, 3.0, 4.0])
    net[1].weight.grad = torch.tensor([0.0, 0.0, 3.0, 0.0])  # only GroupNorm's affine weight has a gradient
    assert torch.equal(ReferenceTaylorImportance()(group), torch.tensor([0.0, 0.0, 81.0, 0.0]))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    sq = [(p.detach() * p.grad) ** 2 for p in (net[0].weight, net[1].weight, net[2].weight)]
    expected = sq[0].flatten(1).sum(1) + sq[1] + sq[2].transpose(0, 1).flatten(1).sum(1)  # biases excluded
    assert torch.allclose(ReferenceTaylorImportance()(group), expected)


def test_rank_within_blocks() -> None:
    score = torch.tensor([3.0, 1.0, 2.0, 0.5, 9.0, 9.0])
    assert rank_within_blocks(score, 2).tolist() == [2.0, 0.0, 1.0, 0.0, 1.0, 2.0]  # ties: lower index first
    with pytest.raises(PruningError, match="into 4 equal blocks"):
        rank_within_blocks(score, 4)


# ----------------------------------------------------------------------------- MACs target

@pytest.mark.parametrize("target", [0.56, 0.39])
def test_search_ratio_meets_a_macs_target(target: float) -> None:
    # 8 channels per GroupNorm group: the MACs move in steps (~(1 - k/8)^2: 1, 0.77, 0.56, 0.39, ...)
    teacher = _seeded(_eight_per_group)
    found = search_ratio(teacher, _images(teacher), _cfg(), target)
    assert found.within and abs(found.macs_ratio - target) <= 0.02 * target and 0 < found.ratio < 1
    _, rep = prune_unet(teacher, _scheduler(), _images(teacher), _cfg(ratio=found.ratio))
    assert rep["macs_after"] / rep["macs_before"] == pytest.approx(found.macs_ratio)  # importance-independent


def test_search_ratio_says_when_a_target_falls_between_steps() -> None:
    teacher = _seeded(_eight_per_group)
    found = search_ratio(teacher, _images(teacher), _cfg(), 0.47)
    assert not found.within and abs(found.macs_ratio - 0.47) > 0.02 * 0.47
    assert found.macs_ratio == pytest.approx(0.39, abs=0.01) or found.macs_ratio == pytest.approx(0.56, abs=0.01)
    with pytest.raises(ConfigError, match="target_macs_ratio = 1.0"):
        search_ratio(teacher, _images(teacher), _cfg(), 1.0)


def test_target_macs_ratio_config() -> None:
    assert TaylorConfig().target_macs_ratio is None
    assert TaylorConfig(target_macs_ratio=0.56).target_macs_ratio == 0.56
    with pytest.raises(ConfigError, match="taylor.target_macs_ratio"):
        TaylorConfig(target_macs_ratio=1.5)
