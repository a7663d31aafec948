"""Frozen, validated configuration: one dataclass per pipeline stage, loaded from params.yaml.

Every value is checked at the edge; a bad one raises :class:`ConfigError` naming the key and the
value (``teacher.lr = 'abc': expected a float``). Stage code receives only validated, frozen objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A params.yaml value is missing, mistyped or out of range."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


def _f(default: Any, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ProjectConfig:
    device: str = _f("cpu")                 # "cpu", "cuda", "cuda:0", "mps"
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("digits", nonempty=True)  # "digits" | local image folder path | Hub dataset id
    image_size: int = _f(8, **_rng(4, 1024))   # side of the square images the models see
    channels: int = _f(1, choices=(1, 3))
    ref_fraction: float = _f(0.2, **_rng(0.0, 1.0, lo_open=True, hi_open=True))  # held-out reference split
    max_images: int = _f(0, **_rng(0))          # 0 = all
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class TeacherConfig:
    pretrained: Optional[str] = _f(None)        # Hub id or local diffusers folder; None = train from config
    block_out_channels: list[int] = _f([32, 64, 64], min_len=1)
    attention: list[bool] = _f([False, True, False], min_len=1)  # attention in down/up block i
    layers_per_block: int = _f(1, **_rng(1, 8))
    norm_num_groups: int = _f(8, **_rng(1))
    num_train_timesteps: int = _f(1000, **_rng(2))
    beta_schedule: str = _f("squaredcos_cap_v2", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    steps: int = _f(4000, **_rng(1))
    batch_size: int = _f(128, **_rng(1))
    lr: float = _f(2e-3, **_rng(0.0, lo_open=True))
    warmup_steps: int = _f(100, **_rng(0))
    ema_decay: float = _f(0.999, **_rng(0.0, 1.0, hi_open=True))
    checkpoint_every: int = _f(500, **_rng(1))
    seed: int = _f(0, **_rng(0))

    def __post_init__(self) -> None:
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(
                f"teacher.attention = {self.attention!r}: needs one entry per block_out_channels "
                f"({len(self.block_out_channels)})"
            )
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ConfigError(
                    f"teacher.block_out_channels = {self.block_out_channels!r}: each must be a positive "
                    f"multiple of norm_num_groups={self.norm_num_groups}"
                )


@dataclass(frozen=True)
class EvaluateConfig:
    """The one evaluation protocol shared by every model, so numbers are comparable."""

    sampler: str = _f("ddim", choices=("ddim", "ddpm", "dpm"))
    steps: int = _f(50, **_rng(1))
    num_samples: int = _f(1000, **_rng(2))
    batch_size: int = _f(500, **_rng(1))
    seeds: list[int] = _f([0], min_len=1)
    grid_size: int = _f(64, **_rng(1))
    latency_batch: int = _f(64, **_rng(1))
    latency_repeats: int = _f(3, **_rng(1))
    inception_weights: Optional[str] = _f(None)  # path to clean-fid's Inception .pt; None = feature net
    feature_epochs: int = _f(30, **_rng(1))
    min_feature_accuracy: float = _f(0.95, **_rng(0.0, 1.0))


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = _f("diffprune-teacher", nonempty=True)
    experiment: str = _f("diffprune", nonempty=True)


@dataclass(frozen=True)
class TaylorConfig:
    importance: str = _f("diff-pruning", choices=("diff-pruning", "taylor", "magnitude", "random"))
    ratio: float = _f(0.3, **_rng(0.0, 1.0, lo_open=True, hi_open=True))  # channel pruning ratio
    threshold: float = _f(0.05, **_rng(0.0, 1.0))  # T: stop once L_t / L_max < T (0 = all timesteps)
    batch_size: int = _f(128, **_rng(1))
    max_timesteps: int = _f(1000, **_rng(1))
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class FinetuneConfig:
    fraction: float = _f(0.2, **_rng(0.0, 1.0, lo_open=True))  # of the teacher's training steps
    lr: float = _f(1e-3, **_rng(0.0, lo_open=True))
    batch_size: int = _f(128, **_rng(1))
    warmup_steps: int = _f(0, **_rng(0))         # linear lr warm-up of the fine-tuning run
    ema_decay: float = _f(0.99, **_rng(0.0, 1.0, hi_open=True))  # horizon ~100 steps: runs are short
    checkpoint_every: int = _f(200, **_rng(1))
    distill: float = _f(0.0, **_rng(0.0, 1.0))  # weight of the teacher's prediction in the target (KD)
    model_name: str = _f("diffprune-diff-pruning", nonempty=True)
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class DipgoConfig:
    target_ratio: float = _f(0.33, **_rng(0.0, 1.0, lo_open=True))  # kept MACs / full MACs
    steps: int = _f(300, **_rng(1))
    lr: float = _f(0.1, **_rng(0.0, lo_open=True))
    momentum: float = _f(0.9, **_rng(0.0, 1.0, hi_open=True))  # SGD momentum
    weight_decay: float = _f(1e-4, **_rng(0.0))
    alpha_s: float = _f(1.0, **_rng(0.0))
    dim: int = _f(64, **_rng(1))
    batch_size: int = _f(16, **_rng(1))
    pool_size: int = _f(256, **_rng(0))  # noises whose full-model samples are drawn once; 0 = fresh each step
    loss: str = _f("ssim", choices=("ssim", "l1", "l2"))
    tolerance: float = _f(0.0125, **_rng(0.0, 1.0, lo_open=True))
    model_name: str = _f("diffprune-dipgo", nonempty=True)
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class IntervalsConfig:
    grid: int = _f(20, **_rng(2))            # G timesteps, evenly spaced over the training schedule
    k: int = _f(2, **_rng(1))                # number of contiguous intervals (experts)
    batches: int = _f(4, **_rng(1))          # gradient averaged over this many batches (fixed seeds)
    batch_size: int = _f(64, **_rng(1))
    min_size: int = _f(1, **_rng(1))         # fewest grid points per interval
    seed: int = _f(0, **_rng(0))

    def __post_init__(self) -> None:
        if self.k * self.min_size > self.grid:
            raise ConfigError(f"intervals.k = {self.k!r}: k * min_size ({self.k} * {self.min_size}) exceeds "
                              f"grid = {self.grid}")


@dataclass(frozen=True)
class ExpertsConfig:
    fraction: float = _f(0.2, **_rng(0.0, 1.0, lo_open=True))  # per expert, of the teacher's steps
    lr: float = _f(1e-3, **_rng(0.0, lo_open=True))
    batch_size: int = _f(128, **_rng(1))
    ema_decay: float = _f(0.995, **_rng(0.0, 1.0, hi_open=True))
    checkpoint_every: int = _f(100, **_rng(1))
    min_width: float = _f(0.25, **_rng(0.0, 1.0, lo_open=True))  # smallest width keep-ratio sampled
    depth_drop_prob: float = _f(0.2, **_rng(0.0, 1.0, hi_open=True))
    distill: float = _f(0.0, **_rng(0.0, 1.0))  # weight of the teacher's prediction in the target (KD)
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class RouterConfig:
    budget: float = _f(0.5, **_rng(0.0, 1.0, lo_open=True))  # of the teacher's trajectory MACs
    steps: int = _f(200, **_rng(1))
    lr: float = _f(1e-2, **_rng(0.0, lo_open=True))
    resource_weight: float = _f(2.0, **_rng(0.0))
    temperature: float = _f(0.5, **_rng(0.0, lo_open=True))
    hidden: int = _f(64, **_rng(1))
    batch_size: int = _f(64, **_rng(1))
    distill: float = _f(0.0, **_rng(0.0, 1.0))  # weight of the full expert's prediction in the target
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class PruneExpertsConfig:
    fraction: float = _f(0.1, **_rng(0.0, 1.0, lo_open=True))  # fine-tune per expert, of the teacher steps
    lr: float = _f(5e-4, **_rng(0.0, lo_open=True))
    batch_size: int = _f(128, **_rng(1))
    ema_decay: float = _f(0.995, **_rng(0.0, 1.0, hi_open=True))
    checkpoint_every: int = _f(100, **_rng(1))
    distill: float = _f(0.0, **_rng(0.0, 1.0))  # weight of the teacher's prediction in the target (KD)
    model_name: str = _f("diffprune-experts", nonempty=True)
    seed: int = _f(0, **_rng(0))


@dataclass(frozen=True)
class Params:
    project: ProjectConfig = field(default_factory=ProjectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    taylor: TaylorConfig = field(default_factory=TaylorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dipgo: DipgoConfig = field(default_factory=DipgoConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    prune_experts: PruneExpertsConfig = field(default_factory=PruneExpertsConfig)

    def section(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise ConfigError(f"unknown params section {name!r}") from None


# ----------------------------------------------------------------------------- validation

def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_meta(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    if meta.get("nonempty") and not str(value).strip():
        raise ConfigError(f"{key} = {value!r}: must not be empty")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key} = {value!r}: expected one of {list(meta['choices'])}")
    if "min_len" in meta and len(value) < meta["min_len"]:
        raise ConfigError(f"{key} = {value!r}: needs at least {meta['min_len']} item(s)")
    lo, hi = meta.get("lo"), meta.get("hi")
    vals = value if isinstance(value, list) else [value]
    for v in vals:
        if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
            raise ConfigError(f"{key} = {value!r}: must be {'>' if meta.get('lo_open') else '>='} {lo}")
        if hi is not None and (v > hi or (meta.get("hi_open") and v == hi)):
            raise ConfigError(f"{key} = {value!r}: must be {'<' if meta.get('hi_open') else '<='} {hi}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating every value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} = {raw!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, raw[f.name], key)
            continue
        value = _check_type(key, raw[f.name], tp)
        _check_meta(key, value, f.metadata)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix}: {e}") from e


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Load and validate params.yaml (missing file = all defaults)."""
    path = Path(path)
    raw: Any = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    return build(Params, raw, "params")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def fingerprint(*cfgs: Any) -> str:
    """Stable short hash of configs (used for cache keys and output folders)."""
    blob = json.dumps([to_dict(c) if dataclasses.is_dataclass(c) else c for c in cfgs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_device(name: str) -> "torch.device":  # noqa: F821
    """Turn a config device into a torch.device, failing clearly when it is not available."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"project.device = {name!r}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"project.device = {name!r}: MPS is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"project.device = {name!r}: {e}") from e
