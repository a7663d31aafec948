"""What a pipeline model *is* when it is sampled: a denoiser built from artifact folders.

A compressed model is not always one network: a DiP-GO model is the teacher plus a skip schedule,
a mixture is several experts plus interval boundaries. Each *kind* maps named artifact paths to a
:class:`Loaded` (denoiser, the networks it runs, the sampling scheduler config). The evaluation
stage, the registered MLflow model and the CLI all build models through :func:`load_target`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from .models.checkpoint import load_model, load_scheduler_config
from .sampling import Denoiser, ModelDenoiser


@dataclass
class Loaded:
    denoiser: Denoiser
    modules: list[nn.Module]
    scheduler_config: dict
    sample_shape: tuple[int, int, int]
    steps: Optional[int] = None  # the sampling steps the model is made for (a stacked model's); None: the protocol's


def _shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (cfg.in_channels, size, size)


def _unet(paths: dict[str, Path], device) -> Loaded:
    model = load_model(paths["model"], device)
    return Loaded(ModelDenoiser(model), [model], load_scheduler_config(paths["model"]), _shape(model))


def _dipgo(paths: dict[str, Path], device) -> Loaded:
    from .pruning.dipgo import Schedule, SkipScheduleDenoiser

    model = load_model(paths["model"], device)
    schedule = Schedule.load(paths["schedule"])
    return Loaded(SkipScheduleDenoiser(model, schedule), [model], load_scheduler_config(paths["model"]), _shape(model))


def _experts(paths: dict[str, Path], device) -> Loaded:
    from .pruning.experts import load_mixture

    mixture = load_mixture(paths["model"], device)
    experts = list(mixture.experts)
    return Loaded(mixture.denoiser(), experts, load_scheduler_config(paths["model"]), _shape(experts[0]))


def _stack(paths: dict[str, Path], device) -> Loaded:
    """A stacked model: its base network ``model`` (a UNet or a mixture of experts) and ``stack``
    (``stack.json``: its skip schedule if it has one, the sampling steps it was made for)."""
    from .io import read_json
    from .pruning.dipgo import Schedule
    from .pruning.stack import stacked_denoiser

    doc = read_json(paths["stack"])
    net = load_model(paths["model"], device).eval()
    schedule = None if doc.get("schedule") is None else Schedule.from_json(doc["schedule"])
    modules = list(getattr(net, "experts", [net]))
    return Loaded(stacked_denoiser(net, schedule), modules, load_scheduler_config(paths["model"]), _shape(modules[0]),
                  steps=int(doc["chosen"]["steps"]))


def load_vae(path: Path, device="cpu"):
    """The ``AutoencoderKL`` folder of a latent model (safetensors only: a pickled ``.bin`` is refused)."""
    from diffusers import AutoencoderKL

    from .io import ArtifactError

    try:
        # low_cpu_mem_usage=False: diffusers' default builds the model under accelerate's
        # init_empty_weights, which patches nn.Module globally, so a model built at the same time in
        # another thread (the flow runs evaluate@X and register@X concurrently) got meta parameters
        return AutoencoderKL.from_pretrained(str(path), use_safetensors=True, low_cpu_mem_usage=False).to(device).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise ArtifactError(f"{path}: not a safetensors AutoencoderKL folder ({str(e).splitlines()[0]})") from e


def conditioning(model_dir: Path) -> dict:
    """``{"num_classes", "guidance_scale"}`` a conditional checkpoint records in its meta."""
    from .io import ArtifactError
    from .models.checkpoint import read_config

    cond = read_config(model_dir)["meta"].get("conditioning")
    if not isinstance(cond, dict) or not {"num_classes", "guidance_scale"} <= set(cond):
        raise ArtifactError(f"{model_dir}: a conditional model's checkpoint must record meta.conditioning "
                            f"(num_classes, guidance_scale)")
    return cond


def _mixture(model: nn.Module, where: Path) -> list[nn.Module]:
    """The experts of a mixture checkpoint (refusing any other model)."""
    from .pruning.experts import ExpertMixtureModel

    if not isinstance(model, ExpertMixtureModel):
        from .io import ArtifactError

        raise ArtifactError(f"{where}: holds a {type(model).__name__}, not an ExpertMixtureModel")
    return list(model.experts)


def _dit(paths: dict[str, Path], device, schedule: bool = False, experts: bool = False) -> Loaded:
    """A class-conditional DiT (plain, running a DiP-GO skip schedule, or a mixture of timestep
    experts, each step's call routed to the expert of its interval) sampling a balanced class cycle."""
    from .models.dit import ClassCycle, GuidedDiT

    model = load_model(paths["model"], device)
    cond = conditioning(paths["model"])
    labels = list(range(int(cond["num_classes"])))
    if experts:
        nets = _mixture(model, paths["model"])
        guided = GuidedDiT(nets[0], labels, cond["guidance_scale"],
                           call=lambda x, t, y, step: model.expert_for(t)(x, timestep=t, class_labels=y).sample)
        return Loaded(ClassCycle(guided, len(labels), load_vae(paths["vae"], device)), nets,
                      load_scheduler_config(paths["model"]), _shape(nets[0]))
    if schedule:
        from .pruning.dipgo import Schedule
        from .pruning.dipgo.dit import SkipScheduleDiT

        guided: GuidedDiT = SkipScheduleDiT(model, Schedule.load(paths["schedule"]), labels, cond["guidance_scale"])
    else:
        guided = GuidedDiT(model, labels, cond["guidance_scale"])
    denoiser = ClassCycle(guided, len(labels), load_vae(paths["vae"], device))
    return Loaded(denoiser, [model], load_scheduler_config(paths["model"]), _shape(model))


def captions_of(model_dir: Path) -> list[str]:
    """The class captions a text-to-image checkpoint records (``meta.conditioning.captions``)."""
    from .io import ArtifactError

    caps = conditioning(model_dir).get("captions")
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and len(c) <= 1000 for c in caps):
        raise ArtifactError(f"{model_dir}: a text-to-image checkpoint must record meta.conditioning.captions "
                            f"(a list of strings; rerun its teacher stage)")
    return caps


def _sd(paths: dict[str, Path], device, schedule: bool = False, experts: bool = False) -> Loaded:
    """A text-to-image UNet (plain, running a DiP-GO skip schedule, or a mixture of timestep experts,
    each step's call routed to the expert of its interval) prompting image i with caption ``i % n`` of
    its checkpoint's ``conditioning.captions``, through its frozen text encoder (``text``)."""
    import torch

    from .models.sd import CaptionTable, GuidedSD, PromptCycle, load_text_encoder, sd_pipeline

    model = load_model(paths["model"], device)
    cond = conditioning(paths["model"])
    encoder, tokenizer = load_text_encoder(paths["text"], device)
    table = CaptionTable(sd_pipeline(None, None, encoder, tokenizer), captions_of(paths["model"]))
    g = float(cond["guidance_scale"])
    text = table.text(torch.arange(len(table.captions)), g > 1)
    if experts:
        nets = _mixture(model, paths["model"])
        guided = GuidedSD(nets[0], text, g, call=lambda x, t, c, step: model.expert_for(t)(
            x, t, encoder_hidden_states=c).sample)
        return Loaded(PromptCycle(guided, table, load_vae(paths["vae"], device)), nets,
                      load_scheduler_config(paths["model"]), _shape(nets[0]))
    if schedule:
        from .pruning.dipgo import Schedule
        from .pruning.dipgo.sd import SkipScheduleSD

        guided: GuidedSD = SkipScheduleSD(model, Schedule.load(paths["schedule"]), text, g)
    else:
        guided = GuidedSD(model, text, g)
    return Loaded(PromptCycle(guided, table, load_vae(paths["vae"], device)), [model],
                  load_scheduler_config(paths["model"]), _shape(model))


def _ldm(paths: dict[str, Path], device, schedule: bool = False, experts: bool = False) -> Loaded:
    """A latent UNet (plain, running a DiP-GO skip schedule, or a mixture of timestep experts, each
    step's call routed to the expert of its interval) sampling a balanced class cycle."""
    from .models.dit import ClassCycle
    from .models.ldm import GuidedUNet, unet_forward

    model = load_model(paths["model"], device)
    cond = conditioning(paths["model"])
    labels = list(range(int(cond["num_classes"])))
    if experts:
        nets = _mixture(model, paths["model"])
        guided = GuidedUNet(nets[0], labels, cond["guidance_scale"],
                            call=lambda x, t, y, step: unet_forward(model.expert_for(t), x, t, y))
        return Loaded(ClassCycle(guided, len(labels), load_vae(paths["vae"], device)), nets,
                      load_scheduler_config(paths["model"]), _shape(nets[0]))
    if schedule:
        from .pruning.dipgo import Schedule
        from .pruning.dipgo.ldm import SkipScheduleGuidedUNet

        guided: GuidedUNet = SkipScheduleGuidedUNet(model, Schedule.load(paths["schedule"]), labels,
                                                    cond["guidance_scale"])
    else:
        guided = GuidedUNet(model, labels, cond["guidance_scale"])
    return Loaded(ClassCycle(guided, len(labels), load_vae(paths["vae"], device)), [model],
                  load_scheduler_config(paths["model"]), _shape(model))


KINDS: dict[str, Callable[[dict[str, Path], object], Loaded]] = {
    "unet": _unet, "dipgo": _dipgo, "experts": _experts, "stack": _stack,
    "dit": _dit, "dit-dipgo": lambda paths, device: _dit(paths, device, schedule=True),
    "dit-experts": lambda paths, device: _dit(paths, device, experts=True),
    "sd": _sd, "sd-dipgo": lambda paths, device: _sd(paths, device, schedule=True),
    "sd-experts": lambda paths, device: _sd(paths, device, experts=True),
    "ldm": _ldm, "ldm-dipgo": lambda paths, device: _ldm(paths, device, schedule=True),
    "ldm-experts": lambda paths, device: _ldm(paths, device, experts=True),
}


def load_target(kind: str, paths: dict[str, str | Path], device="cpu") -> Loaded:
    """Build the model of ``kind`` from its artifact ``paths`` (e.g. ``{"model": dir}``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} (known: {sorted(KINDS)})")
    return KINDS[kind]({k: Path(v) for k, v in paths.items()}, device)
