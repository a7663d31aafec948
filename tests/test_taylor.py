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
from diffprune.pruning.taylor import (
    _heads_to_remove,
    accumulate_timestep_gradients,
    finetune_spec,
    make_importance,
    prune_unet,
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
    assert _heads_to_remove(heads, ratio) == removed


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
    # NCSN++-style skip blocks: torch-pruning cannot group the FIR skip path's channels
    torch.manual_seed(0)
    skip = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "SkipUpBlock2D"), norm_num_groups=4, add_attention=False)
    before = copy.deepcopy(skip.state_dict())
    with pytest.raises(PruningError, match=r"channel group of down_blocks\.0\.skip_conv"):
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
