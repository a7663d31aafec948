"""One resumable denoising fine-tuning loop, for the teacher, pruned nets and experts.

Every ``checkpoint_every`` steps the full training state is saved atomically: model, EMA,
optimizer, learning-rate schedule, step, and the RNG state that drives data order and noise. A
rerun (a Prefect retry, a second ``dvc repro``) resumes from the newest valid checkpoint and ends
with weights identical to an uninterrupted run. The two newest checkpoints are kept so a corrupted
newest one falls back to the one before it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .io import ArtifactError, atomic_path, read_json, sha256_file
from .models.ema import EMA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    ema_decay: float
    checkpoint_every: int
    seed: int = 0
    warmup_steps: int = 0
    t_min: int = 0              # timesteps are drawn uniformly from [t_min, t_max)
    t_max: Optional[int] = None  # None = num_train_timesteps
    grad_clip: float = 1.0
    distill: float = 0.0        # weight of the teacher's prediction in the target (0 = plain DDPM loss)

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} = {getattr(self, k)!r}: must be >= 1")
        if self.t_max is not None and not 0 <= self.t_min < self.t_max:
            raise ValueError(f"timestep range [{self.t_min}, {self.t_max}) is empty")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill = {self.distill!r}: must be in [0, 1]")


StepHook = Callable[[int, torch.Generator], None]


def _lr_lambda(spec: TrainSpec) -> Callable[[int], float]:
    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        prog = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))  # cosine to 0

    return f


def predict(model: nn.Module, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's output tensor (a diffusers output's ``.sample``)."""
    out = model(xt, t)
    return out.sample if hasattr(out, "sample") else out


def denoising_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, scheduler, *,
                   teacher: Optional[nn.Module] = None, distill: float = 0.0) -> torch.Tensor:
    """The DDPM objective for the scheduler's prediction type (epsilon, sample or v).

    With a ``teacher`` and ``distill = w > 0`` the target is ``(1 - w) * target + w * teacher(x_t, t)``:
    output-level knowledge distillation (the teacher's prediction is a lower-variance target than
    the sampled noise, which is what a short fine-tune of a pruned net needs most).
    """
    xt = scheduler.add_noise(x0, noise, t)
    pred = predict(model, xt, t)
    target = denoising_target(x0, noise, t, scheduler)
    if distill:
        if teacher is None:
            raise ValueError(f"distill = {distill!r} needs a teacher")
        with torch.no_grad():
            target = torch.lerp(target, predict(teacher, xt, t), distill)
    return F.mse_loss(pred, target)


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """What the network should predict for the scheduler's prediction type (noise, x0 or v)."""
    ptype = scheduler.config.get("prediction_type", "epsilon")
    if ptype == "epsilon":
        target = noise
    elif ptype == "sample":
        target = x0
    elif ptype == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:  # pragma: no cover
        raise ValueError(f"unknown prediction_type {ptype!r}")
    return target


class _State:
    """Save/restore of the whole training state as safetensors + JSON (no pickle)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoints(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(self.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)

    def save(self, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, perm: torch.Tensor, keep: int = 2) -> None:
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tensors |= {f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
        tensors["rng.generator"] = gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["data.perm"] = perm.cpu()
        meta = {"step": step, "param_groups": osd["param_groups"], "lr_sched": sched.state_dict()}
        with atomic_path(self.root / f"step-{step:08d}", is_dir=True) as tmp:
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "state.safetensors"))
            meta["sha256"] = sha256_file(tmp / "state.safetensors")
            (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        for old in self.checkpoints()[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self) -> tuple[int, dict, dict] | None:
        for ck in self.checkpoints():
            try:
                meta = read_json(ck / "meta.json")
                if sha256_file(ck / "state.safetensors") != meta["sha256"]:
                    raise ArtifactError(f"{ck / 'state.safetensors'}: content hash mismatch")
                return meta["step"], meta, load_file(str(ck / "state.safetensors"))
            except (ArtifactError, OSError, KeyError, ValueError) as e:
                log.warning("skipping unusable training checkpoint %s: %s", ck, e)
        return None


def train_denoiser(
    model: nn.Module,
    images: torch.Tensor,
    scheduler,
    spec: TrainSpec,
    work_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    before_step: Optional[StepHook] = None,
    progress: bool = True,
    desc: str = "training",
    stop_after: Optional[int] = None,
    on_progress: Optional[Callable[[int, int], None]] = None,
    teacher: Optional[nn.Module] = None,
) -> tuple[nn.Module, EMA]:
    """Train ``model`` to denoise ``images`` ``(N, C, H, W)`` in [-1, 1]; resumable.

    Args:
        work_dir: where training checkpoints live; a rerun resumes from the newest valid one.
        before_step: called as ``before_step(step, generator)`` before each forward (elastic experts
            use it to pick a sub-network; it must draw randomness only from ``generator``).
        stop_after: stop (after checkpointing) once this step is reached — used by tests that
            simulate an interrupted run.
        on_progress: called as ``on_progress(done, total)`` at every checkpoint (orchestrators
            show it, e.g. as a Prefect progress artifact).
        teacher: the frozen network ``spec.distill > 0`` distils from (run in eval mode, no grads).

    Returns:
        The model with its final raw weights, and the EMA of its weights.
    """
    if spec.distill and teacher is None:
        raise ValueError(f"distill = {spec.distill!r} needs a teacher")
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    work = _State(Path(work_dir))
    model = model.to(device).train()
    ema = EMA(model, spec.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec))
    gen = torch.Generator().manual_seed(spec.seed)
    n = images.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    perm = torch.randperm(n, generator=gen)
    start = 0
    resumed = work.load_latest()
    if resumed is not None:
        start, meta, t = resumed
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        ostate: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                ostate.setdefault(int(pid), {})[name] = v.to(device) if name != "step" else v
        opt.load_state_dict({"state": ostate, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["lr_sched"])
        gen.set_state(t["rng.generator"])
        torch.set_rng_state(t["rng.torch"])
        perm = t["data.perm"].long()
        log.info("resuming %s from step %d", desc, start)
    t_max = spec.t_max if spec.t_max is not None else scheduler.config.num_train_timesteps
    images = images.to(device)
    bar = tqdm(total=spec.steps, initial=start, desc=desc, disable=not progress)
    for step in range(start, spec.steps):
        # 1. the next minibatch in a seeded epoch order (reshuffled each epoch)
        pos = (step * spec.batch_size) % n
        if pos + spec.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + spec.batch_size]
        x0 = images[idx]
        # 2. noise and timesteps from the same generator, so a resumed run draws the same ones
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(spec.t_min, t_max, (x0.shape[0],), generator=gen).to(device)
        if before_step is not None:
            before_step(step, gen)
        loss = denoising_loss(model, x0, t, noise, scheduler, teacher=teacher, distill=spec.distill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        done = step + 1
        if done % spec.checkpoint_every == 0 or done == spec.steps or done == stop_after:
            work.save(done, model, ema, opt, sched, gen, perm)
            if on_progress is not None:
                on_progress(done, spec.steps)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    return model, ema


def spec_json(spec: TrainSpec) -> dict:
    return asdict(spec)
