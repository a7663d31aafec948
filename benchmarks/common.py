"""The benchmark harness: one teacher, one evaluation, one cache for every benchmark.

A benchmark file holds only what it compares; everything else is here:

* :func:`bench_teacher` trains the **benchmark teacher** to convergence (several times the demo's
  steps), separate from the demo's quick teacher, records its curve (FID on the feature net and the
  held-out denoising loss) and caches it under ``.work/`` keyed by its config, so every benchmark
  reuses it;
* :class:`Bench` evaluates any denoiser under the shared protocol (FID over 3 sampling seeds, KID,
  trajectory MACs counted while sampling) with **paired fidelity** to the teacher (same initial
  noises, per-image PSNR/SSIM, 95% CIs) and an **honest speedup** (timed against the teacher in the
  same process, interleaved); each finished run is cached, so an interrupted benchmark resumes;
* equal cost: methods are compared at trajectory MACs within :data:`MACS_TOLERANCE` of each other
  (a pruning ratio is searched with :func:`diffprune.pruning.taylor.search_ratio`; a pair that could
  not be matched is flagged in the tables).

Tables, significance and plots: :mod:`benchmarks.tables`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from torch import nn

from diffprune.config import Params, fingerprint, load_params, resolve_device, to_dict
from diffprune.data import load_split
from diffprune.env import quiet_defaults
from diffprune.io import atomic_path, read_json, write_json
from diffprune.metrics.evaluate import compare_to_teacher, evaluate, latency_probe, paired_latency
from diffprune.metrics.fid import fid, get_extractor
from diffprune.metrics.image import psnr
from diffprune.models.checkpoint import load_model, load_scheduler_config, read_config, save_model
from diffprune.models.unet import build_scheduler, build_unet, sampling_scheduler
from diffprune.sampling import Denoiser, ModelDenoiser, sample
from diffprune.stages.core import DATASET, FEATURES, run_data, run_features, work_dir
from diffprune.training import TrainSpec, denoising_loss, train_denoiser

log = logging.getLogger("benchmarks")

SEEDS = [0, 1, 2]  # sampling seeds: every benchmark reports FID as mean, spread and per seed
MACS_TOLERANCE = 0.02  # methods are compared at trajectory MACs within 2% of each other

# The spine part of every benchmark's tiny `--quick` setting: checks that a benchmark runs end to
# end, says nothing about the method. Each benchmark adds its own method sections.
QUICK_SPINE: dict[str, dict[str, Any]] = {
    "data": {"max_images": 240, "ref_fraction": 0.25},
    "teacher": {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "steps": 6, "batch_size": 16,
                "checkpoint_every": 3, "warmup_steps": 1},
    "evaluate": {"steps": 4, "num_samples": 40, "batch_size": 40, "grid_size": 16, "latency_batch": 4,
                 "latency_repeats": 1, "feature_epochs": 2, "min_feature_accuracy": 0.0},
}
BENCH_TEACHER_STEPS = 8000  # 8x the demo teacher: its curve (benchmarks/results/teacher.md) flattens before
QUICK_TEACHER_STEPS = 6


REPO = Path(__file__).resolve().parents[1]
QUICK_ROOT = REPO / ".work" / "bench-quick"  # every benchmark's --quick smoke run lives here


def start(name: str, *, quick: bool, root: Path, out: Path, overrides: dict[str, dict[str, Any]] | None,
          progress: bool = True) -> tuple[Bench, Path]:
    """What every benchmark's ``main`` does first: quiet defaults, logging, the smoke folder for
    ``--quick`` (``overrides`` then hold the tiny setting), the params, :func:`setup`.
    Returns the bench and the folder results go to."""
    quiet_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    steps = QUICK_TEACHER_STEPS if quick else BENCH_TEACHER_STEPS
    p = bench_params(root, overrides)  # a smoke run reads the project's params, writes to its own folder
    if quick:
        root, out = QUICK_ROOT, QUICK_ROOT / "results"
        root.mkdir(parents=True, exist_ok=True)
    return setup(name, root, p, teacher_steps=steps, progress=progress), out


def bench_params(root: Path, quick: dict[str, dict[str, Any]] | None) -> Params:
    """``root/params.yaml`` with the benchmark protocol (3 sampling seeds) and, for a smoke run, the
    ``quick`` overrides on top."""
    overrides = {k: dict(v) for k, v in (quick or {}).items()}
    overrides["evaluate"] = {"latency_repeats": 5, **overrides.get("evaluate", {}), "seeds": SEEDS}
    return load_params(root / "params.yaml", overrides)


def with_values(cfg: Any, **values: Any) -> Any:
    """A copy of a frozen config section with ``values`` replaced."""
    return dataclasses.replace(cfg, **values)


# ----------------------------------------------------------------------------- the benchmark teacher

def _val_loss(model: nn.Module, scheduler: DDPMScheduler, ref: torch.Tensor, device) -> float:
    """Held-out denoising loss on ``ref (N, C, H, W)`` at fixed noises and timesteps (seed 0)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (ref.shape[0],), generator=g)
    with torch.no_grad():
        return float(denoising_loss(model.eval(), ref.to(device), t.to(device), noise.to(device), scheduler))


def _curve_point(model: nn.Module, ema, p: Params, scheduler, ref: torch.Tensor, extractor, train_feats,
                 device) -> dict[str, float]:
    """FID (one seed) and held-out loss of the EMA weights of ``model`` at this point of training."""
    net = copy.deepcopy(model)
    ema.copy_to(net)
    net.eval()
    x = sample(ModelDenoiser(net), sampling_scheduler(dict(scheduler.config), p.evaluate.sampler),
               num_images=p.evaluate.num_samples, sample_shape=tuple(ref.shape[1:]), steps=p.evaluate.steps,
               seed=0, batch_size=p.evaluate.batch_size, device=device)
    return {"fid": fid(extractor.fn(x), train_feats), "val_loss": _val_loss(net, scheduler, ref, device)}


def converged(curve: Sequence[dict], rel_fid: float = 0.10, rel_loss: float = 0.01) -> bool:
    """Whether training stopped improving: the last point's FID is within ``rel_fid`` of the best
    before it and its held-out loss within ``rel_loss`` of the best before it."""
    if len(curve) < 3:
        return False
    *before, last = curve
    return (last["fid"] >= min(c["fid"] for c in before) * (1 - rel_fid)
            and last["val_loss"] >= min(c["val_loss"] for c in before) * (1 - rel_loss))


def overfitting(curve: Sequence[dict], rel_loss: float = 0.05) -> str | None:
    """A sentence when the held-out loss at the end is more than ``rel_loss`` above its minimum (the
    teacher memorises its training images past that point), else None."""
    if len(curve) < 2:
        return None
    best = min(curve, key=lambda c: c["val_loss"])
    rise = curve[-1]["val_loss"] / best["val_loss"] - 1
    if rise <= rel_loss:
        return None
    low = min(curve, key=lambda c: c["fid"])
    return (f"over-fits: held-out loss lowest at step {best['step']}, {rise:+.0%} by step {curve[-1]['step']} "
            f"(FID lowest at step {low['step']})")


def bench_teacher(root: Path, p: Params, steps: int, *, points: int = 8, progress: bool = True) -> tuple[Path, dict]:
    """The benchmark teacher (trained ``steps`` steps, the demo's recipe otherwise) and its curve.

    Trained in ``points`` resumable chunks; after each, the EMA weights are scored (FID, held-out
    loss). Cached under ``.work/bench-teacher-<key>/`` (``teacher.json`` written last marks it done).
    """
    tcfg = with_values(p.teacher, steps=steps)
    work = work_dir(root, "bench-teacher", p.data, tcfg, p.evaluate.steps, p.evaluate.num_samples)
    if (work / "teacher.json").exists():
        return work / "model", read_json(work / "teacher.json")
    device = resolve_device(p.project.device)
    images, _ = load_split(root / DATASET, "train")
    ref, _ = load_split(root / DATASET, "ref")
    extractor = get_extractor(root / FEATURES, p.evaluate.inception_weights, device)
    train_feats = extractor.fn(images)
    torch.manual_seed(tcfg.seed)
    model, scheduler = build_unet(tcfg, p.data), build_scheduler(tcfg)
    ends = sorted({max(1, round(k * steps / points)) for k in range(1, points + 1)})  # where the curve is scored
    spec = TrainSpec(steps=steps, batch_size=tcfg.batch_size, lr=tcfg.lr, ema_decay=tcfg.ema_decay,
                     checkpoint_every=max(1, steps // points), seed=tcfg.seed, warmup_steps=tcfg.warmup_steps)
    curve, t0 = [], time.perf_counter()
    for stop in ends:
        model, ema = train_denoiser(model, images, scheduler, spec, work / "train", device=device, stop_after=stop,
                                    progress=progress, desc=f"bench teacher {stop}/{steps}")
        seconds = time.perf_counter() - t0
        curve.append({"step": stop, "train_seconds": seconds,
                      **_curve_point(model, ema, p, scheduler, ref, extractor, train_feats, device)})
        log.info("bench teacher step %d: FID %.3f, held-out loss %.4f", stop, curve[-1]["fid"], curve[-1]["val_loss"])
    ema.copy_to(model)
    save_model(model.cpu(), work / "model", scheduler_config=dict(scheduler.config),
               meta={"source": "bench-teacher", "params": to_dict(tcfg)})
    info = {"steps": steps, "train_seconds": curve[-1]["train_seconds"], "curve": curve,
            "converged": converged(curve), "device": str(device), "params": to_dict(tcfg)}
    write_json(work / "teacher.json", info)
    return work / "model", info


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One evaluated model: protocol metrics, paired fidelity per image, what it cost."""

    method: str
    metrics: dict
    psnr_per_image: np.ndarray              # (N,) PSNR of each sample vs the teacher's from the same noise
    extra: dict = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        return float(self.metrics["macs_ratio_vs_teacher"])

    def to_json(self) -> dict:
        return {"method": self.method, "metrics": self.metrics, **self.extra}


@dataclass
class Bench:
    """Everything the runs of one benchmark share: the teacher, the data, the FID reference, the
    teacher's reference samples, the cache."""

    name: str
    p: Params
    root: Path
    device: torch.device
    teacher: nn.Module
    teacher_dir: Path                    # its checkpoint folder
    teacher_info: dict                   # training steps, time, convergence curve
    scheduler_config: dict
    images: torch.Tensor                 # (N, C, H, W) training images in [-1, 1]
    extractor: Any
    train_feats: np.ndarray              # (N, D) FID reference features
    key: str                             # teacher weights + protocol: part of every cache key
    teacher_runs: dict[int, tuple[dict, torch.Tensor]] = field(default_factory=dict)
    # how the teacher samples (a conditional latent teacher: its class cycle and VAE); None: ModelDenoiser
    teacher_denoiser: Optional[Denoiser] = None

    def teacher_sampler(self) -> Denoiser:
        """The teacher as a denoiser: the reference of every run and of its latency."""
        return self.teacher_denoiser if self.teacher_denoiser is not None else ModelDenoiser(self.teacher)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def train_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def sampler(self):
        return sampling_scheduler(self.scheduler_config, self.p.evaluate.sampler)

    def protocol(self, steps: int | None = None):
        return self.p.evaluate if steps is None else with_values(self.p.evaluate, steps=steps)

    def reference(self) -> tuple[dict, torch.Tensor]:
        """The teacher's metrics and first-seed samples under the full protocol (cached)."""
        steps = self.p.evaluate.steps
        if steps not in self.teacher_runs:
            cache = work_dir(self.root, f"bench-{self.name}-teacher", self.key)
            if (cache / "metrics.json").exists():
                self.teacher_runs[steps] = (read_json(cache / "metrics.json"),
                                            load_file(str(cache / "samples.safetensors"))["samples"])
            else:
                m, x = evaluate(self.teacher_sampler(), self.sampler(), [self.teacher], self.protocol(),
                                self.extractor, self.train_feats, sample_shape=self.sample_shape,
                                device=self.device, progress=False)
                with atomic_path(cache / "samples.safetensors") as tmp:
                    save_file({"samples": x.contiguous()}, str(tmp))
                write_json(cache / "metrics.json", m)
                self.teacher_runs[steps] = (m, x)
        return self.teacher_runs[steps]

    def run(self, method: str, denoiser: Denoiser, modules: Sequence[nn.Module], *, steps: int | None = None,
            key: Any = None, extra: dict | None = None) -> Run:
        """Evaluate ``denoiser`` (the networks it runs: ``modules``) with ``steps`` sampling steps
        against the teacher's full-protocol samples; cached under ``key`` (the method's configs)."""
        cache = work_dir(self.root, f"bench-{self.name}-{method}", self.key, key, steps)
        if (cache / "result.json").exists():
            doc = read_json(cache / "result.json")
            per = load_file(str(cache / "psnr.safetensors"))["psnr"].numpy()
            return Run(method, doc["metrics"], per, {**doc["extra"], **(extra or {})})  # descriptions: today's
        t_metrics, t_samples = self.reference()
        metrics, x = evaluate(denoiser, self.sampler(), modules, self.protocol(steps), self.extractor,
                              self.train_feats, sample_shape=self.sample_shape, reference=t_samples,
                              device=self.device, progress=False)
        metrics |= compare_to_teacher(metrics, t_metrics)
        metrics |= paired_latency(latency_probe(denoiser, self.sampler(), self.protocol(steps), self.sample_shape,
                                                self.device),
                                  latency_probe(self.teacher_sampler(), self.sampler(), self.protocol(),
                                                self.sample_shape, self.device),
                                  repeats=self.p.evaluate.latency_repeats)
        per = psnr(x, t_samples, reduce=False)
        with atomic_path(cache / "psnr.safetensors") as tmp:
            save_file({"psnr": per.contiguous()}, str(tmp))
        write_json(cache / "result.json", {"metrics": metrics, "extra": extra or {}})  # last: marks it done
        return Run(method, metrics, per.numpy(), extra or {})


def setup(name: str, root: Path, p: Params, *, teacher_steps: int, progress: bool = True) -> Bench:
    """Data, feature net and the benchmark teacher under ``root`` (each reused when present)."""
    root = Path(root).resolve()
    if not (root / DATASET).exists():
        run_data(p, root)
    if not (root / FEATURES / "floor.json").exists():
        run_features(p, root, progress=progress)
    device = resolve_device(p.project.device)
    # fractions of "the teacher's steps" (fine-tunes, experts) are of the benchmark teacher's
    p = with_values(p, teacher=with_values(p.teacher, steps=teacher_steps))
    teacher_dir, info = bench_teacher(root, p, teacher_steps, progress=progress)
    teacher = load_model(teacher_dir, device).eval()
    images, _ = load_split(root / DATASET, "train")
    extractor = get_extractor(root / FEATURES, p.evaluate.inception_weights, device)
    key = fingerprint(read_config(teacher_dir)["sha256"], p.data, p.evaluate)
    info = {**info, "fid_floor": read_json(root / FEATURES / "floor.json")["fid_floor"]}
    return Bench(name, p, root, device, teacher, teacher_dir, info, load_scheduler_config(teacher_dir), images,
                 extractor, extractor.fn(images), key)
