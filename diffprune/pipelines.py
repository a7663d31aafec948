"""diffprune's compressed models inside diffusers' own pipelines: what users sample with.

``to_pipeline(kind, paths)`` builds ``DiTPipeline`` or ``StableDiffusionPipeline`` (DDIM, as
:func:`diffprune.models.dit.dit_pipeline` / :func:`diffprune.models.sd.sd_pipeline`) around a model
of any method, from the same artifacts :func:`diffprune.targets.load_target` reads:

- the plain or Diff-Pruned network (kinds ``dit``, ``sd``) as the pipeline's network;
- a DiP-GO skip schedule (``dit-dipgo``, ``sd-dipgo``) as a
  :class:`~diffprune.pruning.dipgo.pipeline.ScheduledNetwork` bound to the pipeline's scheduler
  (run it with ``num_inference_steps`` = the schedule's steps);
- a mixture of timestep experts (``dit-experts``, ``sd-experts``) as a
  :class:`~diffprune.models.routed.TimestepRouted` network.

The pipeline draws the house sampler's images for the same labels or prompts, seed and steps
(tested per family, from the registry, in a fresh process). A registered model becomes one with
:func:`pipeline_from_registry`, which downloads and verifies it first (:func:`diffprune.serving.resolve`).
The other kinds (the pixel UNet, the class-conditional latent UNet) have no diffusers pipeline of
their class: they sample through their MLflow model or :func:`diffprune.sampling.sample`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .models.checkpoint import load_model, load_scheduler_config

PIPELINE_KINDS = ("dit", "dit-dipgo", "dit-experts", "sd", "sd-dipgo", "sd-experts")


def to_pipeline(kind: str, paths: dict[str, str | Path], device: Any = "cpu") -> Any:
    """The diffusers pipeline of the model of ``kind`` whose artifacts are ``paths`` (``model``,
    ``vae``, ``text`` for ``sd*``, ``schedule`` for ``*-dipgo``)."""
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"kind = {kind!r}: no diffusers pipeline takes it (these do: {', '.join(PIPELINE_KINDS)}); "
                         "sample it with its MLflow model or diffprune.sampling.sample")
    from .models.unet import sampling_scheduler
    from .targets import load_vae

    family, _, method = kind.partition("-")
    paths = {k: Path(v) for k, v in paths.items()}
    model = load_model(paths["model"], device)
    net = model
    if method == "experts":
        from .models.routed import TimestepRouted

        if not hasattr(model, "experts"):
            raise ValueError(f"{paths['model']}: kind {kind!r} needs a mixture of experts, got {type(model).__name__}")
        net = TimestepRouted(list(model.experts), model.boundaries)
    scheduler_config = dict(sampling_scheduler(load_scheduler_config(paths["model"]), "ddim").config)
    vae = load_vae(paths["vae"], device)
    if family == "dit":
        from .models.dit import dit_pipeline

        pipe = dit_pipeline(net, vae, scheduler_config)
    else:
        from .models.sd import load_text_encoder, sd_pipeline

        encoder, tokenizer = load_text_encoder(paths["text"], device)
        pipe = sd_pipeline(net, vae, encoder, tokenizer, scheduler_config)
    if method == "dipgo":
        from .pruning.dipgo import Schedule
        from .pruning.dipgo.pipeline import ScheduledNetwork

        scheduled = ScheduledNetwork(model, Schedule.load(paths["schedule"]), pipe.scheduler)
        pipe.register_modules(**{"transformer" if family == "dit" else "unet": scheduled})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_from_registry(uri: str, device: Any = "cpu", cache_dir: str | Path | None = None) -> Any:
    """The diffusers pipeline of the registered model at ``uri`` (``models:/NAME/VERSION`` or an alias),
    downloaded and verified first (:func:`diffprune.serving.resolve`): :func:`to_pipeline` on its artifacts."""
    from .serving import resolve

    paths = resolve(uri, cache_dir=cache_dir)
    kind = json.loads(paths["pyfunc"].read_text()).get("kind")
    artifacts = {("model" if k == "checkpoint" else k): v for k, v in paths.items() if k not in ("model", "pyfunc")}
    return to_pipeline(str(kind), artifacts, device)
