"""The MLflow pyfunc of every diffprune model, logged as *models from code* (nothing pickled).

:func:`diffprune.registry.register_model` logs this file as the model's code. MLflow copies it into
the model and, on load, runs it as a fresh module: the ``set_model`` call at the bottom hands MLflow
a :class:`DiffusionSampler`, whose :meth:`~DiffusionSampler.load_context` rebuilds the network
from the logged artifacts with the pickle-free :func:`~diffprune.models.checkpoint.load_model`.

Artifacts of a logged model:

- ``pyfunc``: ``pyfunc.json`` = ``{"format", "kind", "sampler", "steps", "batch_size"}``; ``kind``
  names the :data:`diffprune.targets.KINDS` entry that turns the artifacts into a denoiser;
- ``checkpoint``: the checkpoint folder (``model.safetensors`` + ``config.json`` + ``scheduler.json``);
- any extra artifacts a kind needs (a skip schedule JSON, a folder of experts, ...).

The ``diffprune`` package itself must be importable where the model is served
(``mlflow models serve --env-manager local``).

Input: a one-row DataFrame (or a dict) with ``num_images`` and optionally ``seed`` (default 0)
and ``steps`` (default from ``pyfunc.json``). Output: ``(N, H, W, C)`` uint8 images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from diffprune.config import resolve_device
from diffprune.models.unet import sampling_scheduler
from diffprune.sampling import sample
from diffprune.targets import KINDS, Loaded, load_target

SPEC_FORMAT = "diffprune-pyfunc/1"
SPEC_ARTIFACT = "pyfunc"          # artifact name of pyfunc.json
CHECKPOINT_ARTIFACT = "checkpoint"  # artifact name of the main checkpoint folder


def build(kind: str, artifacts: Mapping[str, Path], device: torch.device) -> Loaded:
    """Rebuild the model of ``kind`` from its artifacts with :func:`diffprune.targets.load_target`
    (the same loader the evaluation stage uses); the checkpoint artifact is the model's ``model``."""
    paths = {("model" if name == CHECKPOINT_ARTIFACT else name): p for name, p in artifacts.items()
             if name != SPEC_ARTIFACT}
    return load_target(kind, paths, device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` floats in [-1, 1] -> ``(N, H, W, C)`` uint8 in [0, 255]."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _scalar(value: Any) -> Any:
    """The single value of a column / list / array, or the value itself."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected one request (one row), got {len(value)}: {value!r}")
        value = value[0]
    return value


def parse_request(model_input: Any, default_steps: int) -> tuple[int, int, int]:
    """``(num_images, seed, steps)`` from a one-row DataFrame or a dict; errors show the bad value."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise ValueError(f"expected one request (one row), got {len(model_input)} rows")
        request = {str(c): model_input[c].iloc[0] for c in model_input.columns}
    elif isinstance(model_input, Mapping):
        request = {str(k): _scalar(v) for k, v in model_input.items()}
    else:
        raise TypeError(f"model input must be a DataFrame or a dict, got {type(model_input).__name__}")
    if "num_images" not in request:
        raise ValueError(f"model input {request!r}: missing 'num_images'")
    out = []
    for key, default, lo in (("num_images", None, 1), ("seed", 0, 0), ("steps", default_steps, 1)):
        value = request.get(key, default)
        if value is None or value != value:  # absent optional column comes back as None / NaN
            value = default
        if isinstance(value, bool) or not float(value).is_integer() or int(value) < lo:
            raise ValueError(f"{key} = {value!r}: expected an integer >= {lo}")
        out.append(int(value))
    return out[0], out[1], out[2]


class DiffusionSampler(PythonModel):
    """Sample images from a logged diffprune model (any kind in :data:`diffprune.targets.KINDS`)."""

    def load_context(self, context: Any) -> None:
        artifacts = {name: Path(p) for name, p in context.artifacts.items()}
        spec = json.loads(artifacts[SPEC_ARTIFACT].read_text())
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"{artifacts[SPEC_ARTIFACT]}: unknown format {spec.get('format')!r}")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise NotImplementedError(f"pyfunc kind = {kind!r}: expected one of {sorted(KINDS)}")
        config = dict(context.model_config or {})
        self.device = resolve_device(str(config.get("device", "auto")))
        self.spec = spec
        self.servable = build(kind, artifacts, self.device)
        self.scheduler = sampling_scheduler(self.servable.scheduler_config, spec["sampler"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """One request -> ``(num_images, H, W, C)`` uint8 images, deterministic in ``seed``."""
        num_images, seed, steps = parse_request(model_input, int(self.spec["steps"]))
        images = sample(
            self.servable.denoiser, self.scheduler, num_images=num_images,
            sample_shape=self.servable.sample_shape, steps=steps, seed=seed,
            batch_size=int(self.spec["batch_size"]), device=self.device,
        )
        return to_uint8(images)


mlflow.models.set_model(DiffusionSampler())
