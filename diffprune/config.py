"""Frozen, validated configuration: one pydantic dataclass per pipeline stage, loaded from params.yaml.

Every value is checked at the edge: a bad one raises :class:`ConfigError` naming key and value. Defaults
equal params.yaml; ``params.schema.json`` is generated from these classes (:func:`write_schema`).
"""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field, Strict, TypeAdapter, model_validator

from .config_families import AutoencoderConfig, ClipConfig, DitConfig, LdmConfig, SdConfig  # noqa: F401  (sections of params.yaml)
from .config_base import (ALIAS, BATCH, DEVICE, MAX_EVAL_BYTES, MAX_PARAMS_BYTES, MAX_REPR, MAX_YAML_NODES,  # noqa: F401
                          NAME, PATH_LEN, SECTION_CLASSES, STEPS, TIMESTEPS, WIDTH, Batch, Channels, ConfigError,
                          Decay, Float, Fraction, Int, Name, Positive, Precision, Seed, Steps, Str, Weight01,
                          _one_or_three, _r, _section)


@_section("project")
class ProjectConfig:
    device: Str = Field("cpu", pattern=DEVICE)  # must exist on this machine
    seed: Seed = 0
    mixed_precision: Precision = "no"          # autocast of training's forward; fp16: CUDA only

    @model_validator(mode="after")
    def _device_exists(self) -> "ProjectConfig":
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError(f"project.mixed_precision = 'fp16': needs a CUDA device, not {self.device!r}")
        if self.device != "cpu":  # cpu always exists (and needs no torch import)
            resolve_device(self.device)
        return self


@_section("data")
class DataConfig:
    source: Str = Field("digits", pattern=r"\S", max_length=PATH_LEN)  # "digits" | image folder | Hub id
    image_size: Int = Field(8, ge=4, le=1024)   # <= 1024: activations grow with its square
    channels: Annotated[Int, AfterValidator(_one_or_three)] = Field(1, json_schema_extra={"enum": [1, 3]})
    ref_fraction: Float = Field(0.2, gt=0.0, lt=1.0)  # held-out reference split
    max_images: Int = Field(0, ge=0)            # 0 = all (more than the dataset holds = all)
    seed: Seed = 0


@_section("teacher")
class TeacherConfig:
    # the model family (diffprune/families.py): "unet" an unconditional pixel UNet2DModel; "dit" a
    # class-conditional DiTTransformer2DModel on the latents of the `latents` stage's VAE (section dit);
    # "sd" a text-to-image UNet2DConditionModel on those latents, prompted by captions (section sd);
    # "ldm" a UNet2DModel of this section's layout on those latents, class-conditional or not (section ldm)
    family: Literal["unet", "dit", "sd", "ldm"] = "unet"
    pretrained: Optional[Str] = Field(None, max_length=PATH_LEN)  # Hub id or diffusers folder; None = train
    block_out_channels: list[Channels] = Field([32, 64, 64], min_length=1, max_length=8)  # <= 8 levels
    attention: list[Annotated[bool, Strict()]] = Field([False, True, False], min_length=1, max_length=8)
    layers_per_block: Int = Field(1, ge=1, le=8)
    norm_num_groups: Int = Field(8, ge=1, le=WIDTH)
    num_train_timesteps: Int = Field(1000, ge=2, le=TIMESTEPS)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    steps: Steps = 1000
    batch_size: Batch = 128
    lr: Positive = 2e-3
    warmup_steps: Int = Field(50, ge=0, le=STEPS)
    ema_decay: Decay = 0.995
    checkpoint_every: Steps = 200
    seed: Seed = 0

    @model_validator(mode="after")
    def _levels_agree(self) -> "TeacherConfig":
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(f"teacher.attention = {_r(self.attention)}: needs one entry per "
                              f"block_out_channels ({len(self.block_out_channels)})")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"teacher.block_out_channels = {_r(self.block_out_channels)}: each must be a "
                              f"positive multiple of norm_num_groups={self.norm_num_groups}")
        return self


@_section("evaluate")
class EvaluateConfig:
    """The one evaluation protocol shared by every model, so numbers are comparable."""

    sampler: Literal["ddim", "ddpm", "dpm"] = "ddim"
    steps: Int = Field(50, ge=1, le=TIMESTEPS)  # and <= teacher.num_train_timesteps
    num_samples: Int = Field(500, ge=2, le=1_000_000)  # <= 1e6: all are held in memory, then scored
    batch_size: Batch = 500
    seeds: list[Seed] = Field([0], min_length=1, max_length=100)  # <= 100: one full evaluation each
    grid_size: Int = Field(64, ge=1, le=1024)   # <= 1024 images in the preview grid
    latency_batch: Batch = 64
    latency_repeats: Int = Field(2, ge=1, le=1000)  # <= 1000 timed runs
    inception_weights: Optional[Str] = Field(None, max_length=PATH_LEN)  # clean-fid's .pt; None = feature net
    feature_epochs: Int = Field(20, ge=1, le=10_000)  # <= 1e4 epochs of the small feature net
    min_feature_accuracy: Weight01 = 0.95


@_section("register")
class RegisterConfig:
    model_name: Name = "diffprune-teacher"
    experiment: Name = "diffprune"


@_section("promotion")
class PromotionConfig:
    """The gate at the end of a flow run: each newly registered version against its model's alias holder.

    A candidate passes when it is not degenerate, its FID is at most ``max_fid_ratio`` x the teacher's
    (same evaluation) and its paired PSNR against the teacher is at least ``min_psnr`` dB; a passing
    candidate wins with fewer trajectory MACs, then (equal MACs) a lower FID; an exact tie keeps the holder.
    """

    enabled: Annotated[bool, Strict()] = True   # false: no gate; `diffprune promote` by hand only
    alias: Str = Field("champion", pattern=ALIAS)
    max_fid_ratio: Positive = 3.0               # candidate FID / teacher FID (the demo's models: 1.4-2.4)
    min_psnr: Float = Field(20.0, ge=0.0, le=200.0)  # dB vs the teacher's samples (the demo's: 24-32)

    @model_validator(mode="after")
    def _not_latest(self) -> "PromotionConfig":
        if self.alias.lower() == "latest":
            raise ConfigError(f"promotion.alias = {_r(self.alias)}: 'latest' is reserved by MLflow")
        return self


@_section("orchestration")
class OrchestrationConfig:
    """How the Prefect flow runs its stages (not a DVC stage: changing it reruns nothing).

    ``runner``: ``threads`` (Prefect's thread pool, ``max_workers`` at once), ``dask`` (prefect-dask:
    a local cluster of ``dask_workers`` processes, or the existing cluster at ``dask_address``),
    ``ray`` (prefect-ray, the optional extra ``diffprune[ray]``: a local Ray instance, or the cluster
    at ``ray_address``) or ``sequential`` (one stage at a time, in dvc.yaml order). ``gpu_slots``: the size of the Prefect
    global concurrency limit ``gpu`` that every stage training or sampling on a CUDA device holds a
    slot of (``diffprune slots`` creates it); CPU-only runs take none.
    """

    runner: Literal["threads", "dask", "ray", "sequential"] = "threads"
    max_workers: Int = Field(4, ge=1, le=256)
    dask_address: Optional[Str] = Field(None, pattern=r"^(tcp|tls|inproc|ucx)://\S+$", max_length=PATH_LEN)
    dask_workers: Int = Field(2, ge=1, le=256)
    ray_address: Optional[Str] = Field(None, pattern=r"^(ray|auto$|[A-Za-z0-9.-]+:\d+$)", max_length=PATH_LEN)
    gpu_slots: Int = Field(1, ge=1, le=1024)


@_section("taylor")
class TaylorConfig:
    importance: Literal["diff-pruning", "taylor", "magnitude", "random"] = "diff-pruning"
    ratio: Float = Field(0.3, gt=0.0, lt=1.0)   # channel pruning ratio
    threshold: Weight01 = 0.05                  # T: stop once L_t / L_max < T (0 = all timesteps)
    batch_size: Batch = 128
    max_timesteps: Int = Field(1000, ge=1, le=TIMESTEPS)  # one gradient pass per timestep
    seed: Seed = 0
    target_macs_ratio: Optional[Fraction] = None  # pruned / teacher MACs; set: ratio is searched; None: use ratio


@_section("finetune")
class FinetuneConfig:
    fraction: Fraction = 0.2                    # of the teacher's training steps
    lr: Positive = 1e-3
    batch_size: Batch = 128
    warmup_steps: Int = Field(0, ge=0, le=STEPS)  # linear lr warm-up of the fine-tuning run
    ema_decay: Decay = 0.99                     # horizon ~100 steps: runs are short
    checkpoint_every: Steps = 100
    distill: Weight01 = 0.0                     # weight of the teacher's prediction in the target (KD)
    model_name: Name = "diffprune-diff-pruning"
    seed: Seed = 0


@_section("dipgo")
class DipgoConfig:
    target_ratio: Fraction = 0.33               # kept MACs / full MACs
    steps: Int = Field(100, ge=1, le=1_000_000)  # <= 1e6: each step runs the full sampler
    lr: Positive = 0.2                          # the reference: 0.1, doubled by --scale_lr
    momentum: Decay = 0.0                       # SGD momentum (the reference: none)
    warmup_steps: Int = Field(10, ge=0, le=STEPS)  # linear lr warm-up, then cosine decay
    clip_grad: Float = Field(1.0, ge=0.0)       # max gradient norm; 0 = no clipping
    weight_decay: Float = Field(1e-4, ge=0.0)
    alpha_s: Float = Field(1.0, ge=0.0)
    dim: Int = Field(512, ge=1, le=WIDTH)       # query dimension D (heads: D -> D/4 -> D/4 -> 2)
    batch_size: Batch = 8
    pool_size: Int = Field(256, ge=0, le=BATCH)  # noises whose full-model samples are drawn once; 0 = fresh
    loss: Literal["ssim", "l1", "l2"] = "ssim"  # ssim: a window that fits the image (3 taps on 8 x 8)
    tolerance: Float = Field(0.0125, gt=0.0, lt=1.0)
    model_name: Name = "diffprune-dipgo"
    seed: Seed = 0


@_section("intervals")
class IntervalsConfig:
    grid: Int = Field(20, ge=2, le=TIMESTEPS)   # G timesteps over the schedule (<= num_train_timesteps)
    k: Annotated[int, Strict(), Field(ge=1, le=1000)] | Literal["auto"] = 2  # intervals (experts), or "auto"
    k_max: Int = Field(6, ge=1, le=1000)        # J and steps served shown for K = 1 .. k_max; "auto" picks one
    k_penalty: Float = Field(0.03, ge=0.0, le=1.0)  # "auto": K maximising J(K) - k_penalty (K - 1)
    batches: Int = Field(16, ge=1, le=10_000)   # gradient averaged over this many batches (fixed seeds; 4 is seed-unstable)
    batch_size: Batch = 64
    min_size: Int = Field(1, ge=1, le=TIMESTEPS)  # fewest grid points per interval
    stability_seeds: Int = Field(0, ge=0, le=100)  # > 0: boundaries also for gradient seeds 0 .. n-1 (seed_boundaries)
    seed: Seed = 0

    @model_validator(mode="after")
    def _fits_grid(self) -> "IntervalsConfig":
        if self.k != "auto" and self.k * self.min_size > self.grid:
            raise ConfigError(f"intervals.k = {self.k!r}: k * min_size ({self.k} * {self.min_size}) exceeds "
                              f"grid = {self.grid}")
        return self


@_section("experts")
class ExpertsConfig:
    fraction: Fraction = 0.2                    # per expert, of the teacher's steps
    lr: Positive = 1e-3
    batch_size: Batch = 128
    ema_decay: Decay = 0.995
    checkpoint_every: Steps = 100
    min_width: Fraction = 0.25                  # smallest width keep-ratio sampled
    depth_drop_prob: Decay = 0.2
    distill: Weight01 = 0.0                     # weight of the teacher's prediction in the target (KD)
    split: Literal["equal", "served"] = "equal"  # steps per expert: equal, or the K x fraction total by steps served
    min_share: Weight01 = 0.1                   # "served": each expert at least this share of the total
    seed: Seed = 0


@_section("router")
class RouterConfig:
    budget: Fraction = 0.5                      # of the teacher's trajectory MACs
    steps: Steps = 400
    lr: Positive = 0.02
    resource_weight: Float = Field(2.0, ge=0.0)
    resource_loss: Literal["log", "squared"] = "log"  # |log(ratio / budget)|, or (ratio / budget - 1)^2
    temperature: Positive = 0.5
    hidden: Int = Field(64, ge=1, le=WIDTH)
    batch_size: Batch = 64
    distill: Weight01 = 1.0                     # weight of the full expert's prediction in the target
    seed: Seed = 0


@_section("prune_experts")
class PruneExpertsConfig:
    fraction: Fraction = 0.5                    # fine-tune per expert, of the teacher's steps
    lr: Positive = 5e-4
    batch_size: Batch = 128
    ema_decay: Decay = 0.995
    checkpoint_every: Steps = 50
    distill: Weight01 = 0.0                     # weight of the teacher's prediction in the target (KD)
    split: Literal["equal", "served"] = "equal"  # steps per expert: equal, or the K x fraction total by steps served
    min_share: Weight01 = 0.1                   # "served": each expert at least this share of the total
    model_name: Name = "diffprune-experts"
    seed: Seed = 0


STACK_NETS = ("teacher", "diff-pruning", "prune-experts", "experts-prune")


@_section("stack")
class StackConfig:
    budget: Fraction = 0.2                      # trajectory MACs of the stacked model / the teacher's
    # base networks tried. experts-prune (one Diff-Pruning selection per interval) is off by default: with the
    # plain fine-tune it trailed prune-experts on bench-stack's validation noises at 0.3x (23.22 vs 24.10 dB), and
    # its per-interval Taylor passes are the stage's dearest step; with finetune.distill = 1 it led (25.46 vs 25.28)
    nets: list[Literal[STACK_NETS]] = Field(["teacher", "diff-pruning", "prune-experts"], min_length=1, max_length=4)
    skip_ratios: list[Fraction] = Field([1.0, 0.5], min_length=1, max_length=8)  # nominal DiP-GO kept fractions (1.0: none)
    min_steps: Int = Field(4, ge=1, le=TIMESTEPS)  # fewest sampling steps a split may use
    validation_samples: Int = Field(64, ge=2, le=BATCH)  # noises the split is chosen on (their own seed)
    # what the split is chosen by: paired fidelity to the teacher on those noises, `psnr` (pixels) or `features`
    # (squared distance of a sample's FID features to the teacher's sample from the same noise, over twice their
    # variance), or `fid`: FID of validation_fid_samples samples of the validation seed (not paired: the best
    # quality, however far from the teacher's images). On bench-stack at 0.2x both paired criteria rank the
    # candidates nearly against their FID (benchmarks/results/stack.md, each budget's candidates table)
    fidelity: Literal["psnr", "features", "fid"] = "psnr"
    validation_fid_samples: Int = Field(0, ge=0, le=BATCH)  # > 1: each candidate's validation FID too (`fid` needs it)
    model_name: Name = "diffprune-stack"

    @model_validator(mode="after")
    def _fid_needs_samples(self) -> "StackConfig":
        if self.fidelity == "fid" and self.validation_fid_samples < 2:
            raise ConfigError(f"stack.fidelity = 'fid' needs stack.validation_fid_samples >= 2, got "
                              f"{self.validation_fid_samples!r}")
        return self


@_section("")
class Params:
    """All of params.yaml; ``Params()`` is the defaults (equal to the committed params.yaml)."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    dit: DitConfig = Field(default_factory=DitConfig)
    sd: SdConfig = Field(default_factory=SdConfig)
    ldm: LdmConfig = Field(default_factory=LdmConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    taylor: TaylorConfig = Field(default_factory=TaylorConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    dipgo: DipgoConfig = Field(default_factory=DipgoConfig)
    intervals: IntervalsConfig = Field(default_factory=IntervalsConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    prune_experts: PruneExpertsConfig = Field(default_factory=PruneExpertsConfig)
    stack: StackConfig = Field(default_factory=StackConfig)

    def section(self, name: str) -> Any:
        """The config of section ``name`` (``p.section("teacher")``)."""
        if name not in SECTIONS:
            raise ConfigError(f"unknown params section {_r(name)} (known: {', '.join(SECTIONS)})")
        return getattr(self, name)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        T = self.teacher.num_train_timesteps
        for key, v in (("evaluate.steps", self.evaluate.steps), ("intervals.grid", self.intervals.grid)):
            if v > T:
                raise ConfigError(f"{key} = {v!r}: must be <= teacher.num_train_timesteps = {T}")
        e, d = self.evaluate, self.data
        per_image = 4 * d.channels * d.image_size**2  # float32 bytes of one (C, H, W) sample
        # samples and reference held for scoring, plus ~16 activation-sized tensors per batch image
        est = per_image * (2 * e.num_samples + 16 * max(e.batch_size, e.latency_batch))
        if est > MAX_EVAL_BYTES:
            raise ConfigError(f"evaluate.batch_size = {e.batch_size!r}: evaluation would need ~{est / 2**30:.1f} GiB"
                              f" (> {MAX_EVAL_BYTES >> 30} GiB) with evaluate.num_samples = {e.num_samples}, "
                              f"evaluate.latency_batch = {e.latency_batch}, data.channels = {d.channels}, "
                              f"data.image_size = {d.image_size}: lower them")
        return self


SECTIONS = tuple(f.name for f in dataclasses.fields(Params))
SECTION_CLASSES.update({f.name: f.type for f in dataclasses.fields(Params)})
_CLASSES = {f.name: f.type for f in dataclasses.fields(Params)}
def resolve_device(name: str) -> "torch.device":  # noqa: F821
    """A torch.device for ``name`` ("auto" = CUDA if available, else CPU); refuses one this machine lacks."""
    import torch

    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = ["cpu"] + ["cuda"] * (n > 0) + [f"cuda:{i}" for i in range(n)] + ["mps"] * torch.backends.mps.is_available()
    if name not in have:
        raise ConfigError(f"project.device = {_r(name)}: not available on this machine (it has: {', '.join(have)})")
    return torch.device(name)


def load_params(path: str | Path | None = "params.yaml", overrides: dict | None = None) -> Params:
    """Load and validate params.yaml, ``overrides`` (nested mapping) merged over it; ``path=None``: defaults."""
    from .safe_yaml import read_yaml

    raw: Any = (None if path is None else read_yaml(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw = {str(k): v for k, v in raw.items() if not (k in SECTIONS and v is None)}  # `section:` alone = defaults
    for name, sec in (overrides or {}).items():  # {section: {key: value}} over the file's sections
        raw[name] = {**raw[name], **sec} if isinstance(sec, dict) and isinstance(raw.get(name), dict) else sec
    return Params(**raw)


def to_dict(cfg: Any) -> dict:
    """A config (section or :class:`Params`) as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def fingerprint(*cfgs: Any) -> str:
    """Stable short hash of configs and plain values (cache keys, output folders); key order is ignored."""
    blob = json.dumps([to_dict(c) if dataclasses.is_dataclass(c) else c for c in cfgs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_schema(path: str | Path = "params.schema.json") -> Path:
    """Write the JSON schema of params.yaml, generated from :class:`Params`, for editors (see the
    ``yaml-language-server`` line atop params.yaml); a test checks that the committed one is current."""
    schema = TypeAdapter(Params).json_schema() | {"title": "diffprune params.yaml"}
    Path(path).write_text(json.dumps(schema, indent=2) + "\n")
    return Path(path)
