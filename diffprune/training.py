"""One resumable denoising fine-tuning loop, for the teacher, pruned nets and experts.

Every ``checkpoint_every`` steps the full training state is saved atomically: model, EMA,
optimizer, learning-rate schedule, step, and the RNG state that drives data order and noise. A
rerun (a Prefect retry, a second ``dvc repro``) resumes from the newest valid checkpoint and ends
with weights identical to an uninterrupted run. The two newest checkpoints are kept so a corrupted
newest one falls back to the one before it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .distributed import local_batch, make_accelerator, run_device, unwrap
from .models.ema import EMA
from .sampling import Predictor, predict
from .train_state import TrainState  # noqa: F401  (re-exported: every resumable run imports it from here)

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

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
ConditionalCall = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``call(model, x_t (B, C, H, W), t (B,), conditions (B, ...)) -> prediction``: a conditional model's
training call (DiT: its labels as ``class_labels`` and the eps channels of its output)."""


def _lr_lambda(spec: TrainSpec) -> Callable[[int], float]:
    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        prog = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))  # cosine to 0

    return f




def denoising_loss(model: Predictor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, scheduler, *,
                   teacher: Optional[Predictor] = None, distill: float = 0.0) -> torch.Tensor:
    """The DDPM objective for the scheduler's prediction type (epsilon, sample or v).

    With a ``teacher`` and ``distill = w > 0`` the target is ``(1 - w) * target + w * teacher(x_t, t)``:
    output-level knowledge distillation (the teacher's prediction is a lower-variance target than
    the sampled noise, which is what a short fine-tune of a pruned net needs most). The model runs
    first, then the teacher (without gradients), so a teacher that reconfigures the model itself (the
    full expert of an elastic sub-network) may share its weights.

    Args:
        model: the network trained, or any callable ``(x_t, t) -> prediction``.
        x0: clean images ``(B, C, H, W)``.
        t: timesteps ``(B,)``.
        noise: ``(B, C, H, W)``, the noise added to ``x0``.
        scheduler: a diffusers noise scheduler (``add_noise``, ``config.prediction_type``).
        teacher: a frozen network or callable ``(x_t, t) -> prediction`` giving the distillation target.
        distill: weight ``w`` in ``[0, 1]`` of the teacher's prediction in the target.

    Returns:
        The scalar mean squared error.
    """
    if distill and teacher is None:
        raise ValueError(f"distill = {distill!r} needs a teacher")
    xt = scheduler.add_noise(x0, noise, t)
    pred = predict(model, xt, t)
    target = denoising_target(x0, noise, t, scheduler)
    if distill:
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
    mixed_precision: str = "no",
    conditions: Optional[torch.Tensor] = None,
    call: Optional[ConditionalCall] = None,
) -> tuple[nn.Module, EMA]:
    """Train ``model`` to denoise ``images`` ``(N, C, H, W)`` in [-1, 1]; resumable.

    Runs through ``accelerate`` (:mod:`diffprune.distributed`): one process, or several (``accelerate launch``)
    on shards of each global batch; only the main one checkpoints and reports.

    Args:
        work_dir: where training checkpoints live; a rerun resumes from the newest valid one.
        before_step: called as ``before_step(step, generator)`` before each forward (elastic experts
            use it to pick a sub-network; it must draw randomness only from ``generator``).
        stop_after: stop (after checkpointing) at this step (tests simulating an interrupted run).
        on_progress: called as ``on_progress(done, total)`` at every checkpoint (a Prefect artifact).
        teacher: the frozen network ``spec.distill > 0`` distils from; mixed_precision: ``"no"``,
            ``"bf16"`` or ``"fp16"`` (CUDA only), the autocast dtype of the forward.
        conditions: ``(N, ...)`` one condition per image (class labels, text embeddings), drawn with
            it; the model (and a teacher) is then called as ``call(model, x_t, t, conditions)``.

    Returns ``(model, ema)``: the final raw weights and the EMA of them.
    """
    _check_inputs(spec, teacher, images, conditions, call)
    acc = make_accelerator(device, mixed_precision, find_unused_parameters=before_step is not None)
    device = run_device(acc, device)
    teacher = teacher.to(device).eval() if teacher is not None else None  # no_grad; requires_grad: the caller's
    run = _Run.begin(acc, model.to(device).train(), images.to(device), spec, work_dir, desc,
                     None if conditions is None else conditions.to(device))
    t_max = spec.t_max if spec.t_max is not None else scheduler.config.num_train_timesteps
    bar = tqdm(total=spec.steps, initial=run.start, desc=desc, disable=not progress or not acc.is_main_process)
    for step in range(run.start, spec.steps):
        # 1. the next global minibatch, noise, timesteps: one generator, so resumes and all processes agree
        x0, noise, t, c = run.batches.draw(step, spec.t_min, t_max)
        if before_step is not None:
            before_step(step, run.batches.gen)
        # 2. one optimiser step on this process's shard of it, then the EMA
        loss = run.step(x0, noise, t, scheduler, teacher, spec, c, call)
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        # 3. checkpoint
        if (done := step + 1) % spec.checkpoint_every == 0 or done == spec.steps or done == stop_after:
            run.checkpoint(done, spec.steps, on_progress)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    return unwrap(acc, run.wrapped), run.ema


def _check_inputs(spec: TrainSpec, teacher: Optional[nn.Module], images: torch.Tensor,
                  conditions: Optional[torch.Tensor], call: Optional[ConditionalCall]) -> None:
    if spec.distill and teacher is None:
        raise ValueError(f"distill = {spec.distill!r} needs a teacher")
    if (conditions is None) != (call is None) or (conditions is not None and len(conditions) != len(images)):
        raise ValueError(f"conditions ({None if conditions is None else len(conditions)}) for {len(images)} images "
                         f"and call ({call is not None}): give both, one condition per image, or neither")


@dataclass
class _Run:
    """The stateful parts of one :func:`train_denoiser` run, restored from its newest checkpoint."""

    acc: Accelerator
    model: nn.Module    # the plain module (EMA, checkpoints)
    wrapped: nn.Module  # the prepared one (DDP under several processes, autocast under mixed precision)
    ema: EMA
    opt: torch.optim.Optimizer  # the plain optimiser (checkpoints, LR schedule)
    step_opt: torch.optim.Optimizer  # the prepared one (gradient scaling under fp16)
    sched: torch.optim.lr_scheduler.LambdaLR
    batches: _Batches
    state: TrainState
    start: int  # the first step still to do

    @classmethod
    def begin(cls, acc: Accelerator, model: nn.Module, images: torch.Tensor, spec: TrainSpec, work_dir: str | Path,
              desc: str, conditions: Optional[torch.Tensor] = None) -> "_Run":
        """Fresh optimiser, LR schedule, EMA and data order, then the newest checkpoint, if any."""
        ema = EMA(model, spec.ema_decay)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec))
        batches = _Batches(images, spec.batch_size, spec.seed, conditions)
        objects = {"model": model, "ema": ema, "opt": opt, "lr_sched": sched, "data": batches}
        if acc.scaler is not None:  # fp16: the loss scale resumes too
            objects["scaler"] = acc.scaler
        state = TrainState(work_dir, objects, {"data": batches.gen}, global_rng=True)
        start = 0
        if (resumed := state.restore()) is not None:
            start = resumed[0]
            log.info("resuming %s from step %d", desc, start)
        wrapped, step_opt = acc.prepare(model, opt)
        return cls(acc, model, wrapped, ema, opt, step_opt, sched, batches, state, start)

    def step(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler, teacher: Optional[nn.Module],
             spec: TrainSpec, c: Optional[torch.Tensor] = None, call: Optional[ConditionalCall] = None) -> float:
        """One optimiser step on this process's shard of the global batch (DDP averages the shards'
        gradients), then the EMA; returns the shard's loss. ``c``: the batch's conditions, if any."""
        if c is None:
            x0, noise, t, weight = local_batch(self.acc, x0, noise, t)
            model, ref = self.wrapped, teacher
        else:
            x0, noise, t, c, weight = local_batch(self.acc, x0, noise, t, c)
            model = _bind(call, self.wrapped, c)
            ref = _bind(call, teacher, c) if teacher is not None else None
        with self.acc.autocast():
            loss = denoising_loss(model, x0, t, noise, scheduler, teacher=ref, distill=spec.distill)
        self.step_opt.zero_grad(set_to_none=True)
        self.acc.backward(loss if weight == 1 else loss * weight)
        if spec.grad_clip:
            self.acc.clip_grad_norm_(self.wrapped.parameters(), spec.grad_clip)
        self.step_opt.step()
        if not self.acc.optimizer_step_was_skipped:  # fp16: a step skipped for overflow keeps its LR
            self.sched.step()
        self.ema.update(self.model)
        return loss.item()

    def checkpoint(self, done: int, total: int, on_progress: Optional[Callable[[int, int], None]]) -> None:
        """Save checkpoint ``done`` of ``total`` and report it (the main process; the others wait)."""
        if self.acc.is_main_process:
            self.state.save(done)
            if on_progress is not None:
                on_progress(done, total)
        self.acc.wait_for_everyone()


def _bind(call: ConditionalCall, model: nn.Module, c: torch.Tensor) -> Predictor:
    return lambda x, t: call(model, x, t, c)


@dataclass(frozen=True)
class Conditions:
    """One condition per training image (class labels, text embeddings) and the call that feeds a
    batch of them to a model: what a conditional family's data adds to its images, for the code that
    draws its own batches (the timestep-expert stages)."""

    values: torch.Tensor
    call: ConditionalCall

    def bind(self, model: nn.Module, idx: torch.Tensor) -> Predictor:
        """``(x_t, t) -> prediction`` of ``model`` with rows ``idx`` of the conditions."""
        return _bind(self.call, model, self.values[idx.to(self.values.device)])


def conditioned(model: nn.Module, conditions: Optional[Conditions], idx: torch.Tensor) -> Predictor:
    """``model`` itself without conditions, else the model with rows ``idx`` of them bound."""
    return model if conditions is None else conditions.bind(model, idx)


def random_rows(images: torch.Tensor, batch_size: int, t_min: int, t_max: int, gen: torch.Generator,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`random_batch` and the rows it drew ``idx (B,)`` (their conditions go with them)."""
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
    x0 = images[idx].to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(t_min, t_max, (batch_size,), generator=gen).to(device)
    return x0, noise, t, idx


def random_batch(images: torch.Tensor, batch_size: int, t_min: int, t_max: int, gen: torch.Generator,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` images drawn with replacement from ``images (N, C, H, W)``, their noise and
    timesteps ``t ~ U[t_min, t_max)``, all from ``gen``: ``(x0 (B, C, H, W), noise (B, C, H, W), t (B,))``."""
    return random_rows(images, batch_size, t_min, t_max, gen, device)[:3]


class _Batches:
    """Minibatches of ``images (N, ...)`` (and their ``conditions (N, ...)``, if any) in a seeded epoch
    order, reshuffled each epoch; stateful."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int,
                 conditions: Optional[torch.Tensor] = None) -> None:
        if images.shape[0] == 0:
            raise ValueError("cannot train on an empty dataset")
        self.images, self.conditions, self.batch_size = images, conditions, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(images.shape[0], generator=self.gen)

    def next(self, step: int) -> torch.Tensor:
        """The indices of minibatch ``step``."""
        n = self.images.shape[0]
        pos = (step * self.batch_size) % n
        if pos + self.batch_size > n:
            self.perm = torch.randperm(n, generator=self.gen)
            pos = 0
        return self.perm[pos : pos + self.batch_size]

    def draw(self, step: int, t_min: int, t_max: int) -> tuple[torch.Tensor, ...]:
        """Minibatch ``x0 (B, C, H, W)``, its noise ``(B, C, H, W)``, timesteps ``t (B,)`` in
        ``[t_min, t_max)``, all drawn from :attr:`gen` (so a resumed run draws the same ones), and its
        conditions ``(B, ...)`` (``None`` without)."""
        idx = self.next(step)
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=self.gen).to(x0.device)
        t = torch.randint(t_min, t_max, (x0.shape[0],), generator=self.gen).to(x0.device)
        return x0, noise, t, None if self.conditions is None else self.conditions[idx.to(self.conditions.device)]

    def state_dict(self) -> dict:
        return {"perm": self.perm}

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"].long()


def spec_json(spec: TrainSpec) -> dict:
    return asdict(spec)
