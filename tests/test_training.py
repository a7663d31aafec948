import copy

import pytest
import torch

from diffprune.training import TrainSpec, train_denoiser


def _images(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _fresh(tiny_unet_factory):
    torch.manual_seed(0)
    return tiny_unet_factory()


def test_resume_continues_where_it_stopped_and_matches_uninterrupted(tmp_path, tiny_unet, tiny_scheduler):
    import copy

    spec = TrainSpec(steps=6, batch_size=8, lr=1e-3, ema_decay=0.9, checkpoint_every=2, seed=3, warmup_steps=1)
    images = _images()
    init = copy.deepcopy(tiny_unet.state_dict())

    full, full_ema = train_denoiser(copy.deepcopy(tiny_unet), images, tiny_scheduler, spec, tmp_path / "a", progress=False)

    m1 = copy.deepcopy(tiny_unet)
    m1.load_state_dict(init)
    train_denoiser(m1, images, tiny_scheduler, spec, tmp_path / "b", progress=False, stop_after=4)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000002", "step-00000004"]

    seen = []
    m2 = copy.deepcopy(tiny_unet)
    m2.load_state_dict(init)  # a brand-new process would start from scratch weights
    resumed, resumed_ema = train_denoiser(m2, images, tiny_scheduler, spec, tmp_path / "b", progress=False,
                                          on_progress=lambda d, t: seen.append(d))
    assert seen == [6], "the resumed run must start at step 4 and only do steps 5-6"
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    _assert_same_state(full_ema.state_dict(), resumed_ema.state_dict())
    assert resumed_ema.optimization_step == 6


def _assert_same_state(a, b, where="ema"):
    """Nested state dicts equal: tensors bit for bit, everything else by value."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}.{i}")
    else:
        assert a == b and type(a) is type(b), where


def test_corrupted_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_unet, tiny_scheduler):
    import copy

    spec = TrainSpec(steps=4, batch_size=8, lr=1e-3, ema_decay=0.9, checkpoint_every=2, seed=3)
    train_denoiser(copy.deepcopy(tiny_unet), _images(), tiny_scheduler, spec, tmp_path / "w", progress=False)
    newest = tmp_path / "w" / "step-00000004" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    seen = []
    train_denoiser(copy.deepcopy(tiny_unet), _images(), tiny_scheduler, spec, tmp_path / "w", progress=False,
                   on_progress=lambda d, t: seen.append(d))
    assert seen == [4], "must resume from step 2 (the last good checkpoint) and redo steps 3-4"


def test_training_lowers_the_loss(tmp_path, tiny_unet, tiny_scheduler):
    from diffprune.training import denoising_loss

    images = _images(64)
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    with torch.no_grad():
        before = denoising_loss(tiny_unet, images, t, noise, tiny_scheduler).item()
    spec = TrainSpec(steps=40, batch_size=32, lr=3e-3, ema_decay=0.0, checkpoint_every=40, seed=0)
    model, _ = train_denoiser(tiny_unet, images, tiny_scheduler, spec, tmp_path / "w", progress=False)
    with torch.no_grad():
        after = denoising_loss(model.eval(), images, t, noise, tiny_scheduler).item()
    assert after < before


def test_distillation_target_is_the_teachers_prediction(tmp_path, tiny_unet, tiny_scheduler):
    from diffprune.training import denoising_loss

    images = _images(16)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(images.shape, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    teacher = copy.deepcopy(tiny_unet).eval()
    with torch.no_grad():
        plain = denoising_loss(tiny_unet.eval(), images, t, noise, tiny_scheduler)
        assert denoising_loss(tiny_unet, images, t, noise, tiny_scheduler, teacher=teacher, distill=1.0) == 0.0
        half = denoising_loss(tiny_unet, images, t, noise, tiny_scheduler, teacher=teacher, distill=0.5)
    assert torch.isclose(half, plain / 4)  # (pred - (noise + pred) / 2)^2 = (pred - noise)^2 / 4
    with pytest.raises(ValueError, match="distill = 0.5 needs a teacher"):
        train_denoiser(tiny_unet, images, tiny_scheduler, TrainSpec(steps=1, batch_size=4, lr=1e-3, ema_decay=0.9,
                       checkpoint_every=1, distill=0.5), tmp_path / "w", progress=False)


def test_ema_warms_up_and_forgets_the_initial_weights(tiny_unet):
    """diffusers' EMA warm-up: decay min(d, (1 + s) / (10 + s)), 0 at the first step, so after 200
    steps at d = 0.99 nothing of the initial weights is left (a plain EMA keeps 0.99^200 = 13 %)."""
    from diffprune.models.ema import EMA

    probe = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        for q in probe.parameters():
            q.fill_(1.0)  # the "initial" weights: 1 everywhere
    ema = EMA(probe, 0.99)
    with torch.no_grad():
        for q in probe.parameters():
            q.zero_()  # every later weight: 0, so the average is the initial weights' share
    for _ in range(200):
        ema.update(probe)
    assert ema.cur_decay_value == pytest.approx(200 / 209)  # (1 + s) / (10 + s), s = 199: still warming up
    ema.copy_to(probe)
    assert all(torch.equal(q, torch.zeros_like(q)) for q in probe.parameters())
    with pytest.raises(ValueError, match="EMA decay = 1.0"):
        EMA(probe, 1.0)


def test_ema_state_round_trips_through_train_state(tmp_path, tiny_unet):
    from diffprune.models.ema import EMA
    from diffprune.training import TrainState

    ema = EMA(tiny_unet, 0.9)
    with torch.no_grad():
        for q in tiny_unet.parameters():
            q.add_(0.5)
    for _ in range(3):
        ema.update(tiny_unet)
    TrainState(tmp_path, {"ema": ema}).save(3)
    back = EMA(copy.deepcopy(tiny_unet), 0.5)
    assert TrainState(tmp_path, {"ema": back}).restore()[0] == 3
    _assert_same_state(ema.state_dict(), back.state_dict())
    smaller = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="EMA state does not match the model"):
        TrainState(tmp_path, {"ema": EMA(smaller, 0.9)}).restore()


def test_distilling_leaves_the_teacher_prunable_as_before(tmp_path, tiny_unet, tiny_scheduler):
    """Regression: distillation used to switch the caller's teacher to requires_grad=False, after which
    torch-pruning traced no dependencies and the Taylor pass took no gradients, so a benchmark that
    pruned its teacher again after a distilled fine-tune got other nets (0.446 instead of 0.560 MACs)."""
    from diffprune.config import TaylorConfig
    from diffprune.pruning.taylor import prune_unet

    images = _images(16)
    cfg = TaylorConfig(importance="diff-pruning", ratio=0.5, threshold=0.0, batch_size=8, max_timesteps=4)
    before, rep_before = prune_unet(tiny_unet, tiny_scheduler, images, cfg)
    teacher = tiny_unet
    train_denoiser(copy.deepcopy(before).train(), images, tiny_scheduler,
                   TrainSpec(steps=2, batch_size=4, lr=1e-3, ema_decay=0.9, checkpoint_every=1, distill=1.0),
                   tmp_path / "w", progress=False, teacher=teacher)
    assert all(p.requires_grad for p in teacher.parameters())
    frozen = copy.deepcopy(tiny_unet).requires_grad_(False)  # a frozen model prunes like a trainable one
    for model in (teacher, frozen):
        after, rep = prune_unet(model, tiny_scheduler, images, cfg)
        assert rep["macs_after"] == rep_before["macs_after"] < rep["macs_before"]
        assert rep["losses"] == rep_before["losses"]
        assert all(torch.equal(a, b) for a, b in zip(after.state_dict().values(), before.state_dict().values()))
