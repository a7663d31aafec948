"""Text-to-image latent UNets: diffusers' ``StableDiffusionPipeline`` (``UNet2DConditionModel`` +
``AutoencoderKL`` + CLIP text encoder and tokenizer).

A model of this family is a diffusers ``StableDiffusionPipeline`` folder. :func:`load_sd` loads one
from a local folder or a Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) with
``StableDiffusionPipeline.from_pretrained``; :func:`build_sd_pipeline` builds a tiny one of the same
classes from configs (tests, offline: a character-level CLIP tokenizer written locally), which
:func:`save_sd` writes in the same layout, so it is loaded back by the very same :func:`load_sd`.

:class:`GuidedSD` is the house denoiser ``(x_t, t, step) -> eps`` for one batch of prompts with the
pipeline's classifier-free guidance; :func:`sample_latents` runs it through
:func:`diffprune.sampling.trajectory` (the one loop) and :func:`decode` turns latents into images.
Every method touches the UNet only: the VAE and the text encoder are never pruned or trained.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ..config import ConfigError
from ..io import atomic_path
from ..sampling import initial_noise, trajectory
from .dit import TINY_VAE, to_unit
from .unet import check_pretrained_source

if TYPE_CHECKING:  # the pipeline class imports transformers: only where a pipeline is built or loaded
    from diffusers import StableDiffusionPipeline

HUB_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""The Hub preset of this family (512 x 512 images, latent 64 x 64 x 4, CLIP ViT-L/14 text encoder)."""

# unet/config.json of SD-1.5, every architectural key: the real UNet, built locally for counting
# (no weights needed). 860 M parameters: never built in tests.
SD15_UNET: dict = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

# A UNet of the same class, tiny: two levels (cross-attention in the first), width 8 / 16, 2 heads,
# text embeddings of width 16, latent 8 x 8 x 4 (the tiny VAE decodes it to 16 x 16 images).
TINY_SD_UNET: dict = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)

# A tiny CLIP text transformer (the encoder of SD-1.5 is CLIP ViT-L/14's: width 768, 12 layers).
TINY_TEXT: dict = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=24)
TOKENS = 24  # the tiny tokenizer's model_max_length (SD-1.5: 77)

# scheduler/scheduler_config.json of SD-1.5 (its pipeline ships PNDM; the house samples with DDIM on
# the same betas, as the DiP-GO paper's SD runs do)
SD_SCHEDULER: dict = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def tiny_tokenizer(max_length: int = TOKENS):
    """A character-level ``CLIPTokenizer`` (lower-case letters, digits, punctuation; no merges), built
    from a vocabulary written here: captions such as "a handwritten 7" need nothing downloaded."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>",
                                             "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def build_sd_pipeline(unet: Optional[dict] = None, vae: Optional[dict] = None, text: Optional[dict] = None,
                      seed: int = 0) -> StableDiffusionPipeline:
    """A freshly initialised ``StableDiffusionPipeline`` (eval mode) from configs; defaults
    :data:`TINY_SD_UNET`, the tiny VAE of the DiT family, :data:`TINY_TEXT` with :func:`tiny_tokenizer`.

    Seeded without touching the global RNG; no safety checker (nothing to download). The UNet's
    ``cross_attention_dim`` must equal the text encoder's width.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    tcfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **(TINY_TEXT if text is None else text))
    ucfg = TINY_SD_UNET if unet is None else unet
    if ucfg["cross_attention_dim"] != tcfg.hidden_size:
        raise ValueError(f"unet cross_attention_dim = {ucfg['cross_attention_dim']}: must equal the text "
                         f"encoder's hidden_size = {tcfg.hidden_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**ucfg).eval()
        autoencoder = AutoencoderKL(**(TINY_VAE if vae is None else vae)).eval()
        encoder = CLIPTextModel(tcfg).eval()
    return StableDiffusionPipeline(vae=autoencoder, text_encoder=encoder, tokenizer=tokenizer, unet=model,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_sd(pipe: StableDiffusionPipeline, path: str | Path) -> Path:
    """Write ``pipe`` atomically as a diffusers folder (safetensors, no pickle) that :func:`load_sd` reads."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return path


def load_sd(name_or_path: str | Path, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained`` of a local folder or a Hub id, in eval mode, with its
    scheduler replaced by DDIM on the same betas; safetensors weights only. Offline, a Hub id fails at
    once with a :class:`ConfigError`."""
    from diffusers import StableDiffusionPipeline

    name_or_path = str(name_or_path)
    check_pretrained_source(name_or_path, "sd.pretrained")
    try:
        # safetensors only: a folder of pickled .bin weights is refused, never unpickled
        pipe = StableDiffusionPipeline.from_pretrained(name_or_path, use_safetensors=True, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"sd.pretrained = {name_or_path!r}: cannot load a StableDiffusionPipeline ({e})") from e
    if not isinstance(pipe.unet, UNet2DConditionModel):
        raise ConfigError(f"sd.pretrained = {name_or_path!r}: its unet is a {type(pipe.unet).__name__}, "
                          "not a UNet2DConditionModel")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    return pipe.to(device)


ModelCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``call(x (B', C, h, w), t (B',), text (B', L, D), step) -> eps (B', C, h, w)``."""


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: Sequence[str], guided: bool,
                   negative: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Text embeddings of the model call: ``(B, L, D)``, or ``(2B, L, D)`` ``[negative, prompt]`` when
    ``guided`` (the pipeline's order), through the pipeline's own ``encode_prompt``."""
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts = {list(prompts)!r}: need >= 1 strings")
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1, guided,
                                      negative_prompt=None if negative is None else list(negative))
    return torch.cat([uncond, cond]) if guided else cond


class GuidedSD:
    """A text-to-image UNet as a house denoiser ``(x_t (B, C, h, w), t (B,), step) -> eps``, the
    ``StableDiffusionPipeline`` way: with ``guidance_scale > 1`` each call runs ONE UNet call on the
    doubled batch ``[x, x]`` with the text ``[negative, prompt]`` and returns
    ``eps_uncond + g * (eps_text - eps_uncond)``. Deviation: the pipeline carries the B latents and
    doubles them per call too, and passes the timestep as a scalar; here ``t`` is the ``(2B,)`` batch
    of the same value (the same time embedding, row for row).

    Args:
        unet: a ``UNet2DConditionModel`` in eval mode.
        text: the embeddings of :func:`encode_prompts` (``(2B, L, D)`` when guided).
        guidance_scale: g; ``<= 1`` runs the UNet on the prompts alone (batch B).
        call: the model call (default ``unet(x, t, encoder_hidden_states=text).sample``); a
            block-skip runner passes its own, so guidance and text stay here.
    """

    def __init__(self, unet: UNet2DConditionModel, text: torch.Tensor, guidance_scale: float = 1.0, *,
                 call: Optional[ModelCall] = None) -> None:
        self.guidance_scale = float(guidance_scale)
        rows = len(text) // 2 if self.guided else len(text)
        if text.dim() != 3 or rows < 1 or (self.guided and len(text) % 2):
            raise ValueError(f"text embeddings of shape {tuple(text.shape)}: need (B, L, D), or (2B, L, D) when guided")
        if text.shape[-1] != unet.config.cross_attention_dim:
            raise ValueError(f"text embeddings of width {text.shape[-1]}: the UNet attends to width "
                             f"{unet.config.cross_attention_dim}")
        self.unet, self.text, self.batch = unet, text, rows
        cfg = unet.config
        self.latent_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        self._call = call if call is not None else self._plain

    @property
    def guided(self) -> bool:
        """Whether each call doubles the batch with the negative prompt (``guidance_scale > 1``)."""
        return self.guidance_scale > 1

    def _plain(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, step: int) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=text).sample

    def model_inputs(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, t, text)`` of the UNet call: batch B, or 2B ``[uncond, cond]`` when guided."""
        if x.shape[0] != self.batch:
            raise ValueError(f"batch of {x.shape[0]} latents, but {self.batch} prompts")
        text = self.text.to(x.device)
        return (torch.cat([x, x]), torch.cat([t, t]), text) if self.guided else (x, t, text)

    def guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Raw ``(B', C, h, w)`` -> guided eps ``(B, C, h, w)``, the pipeline's formula term for term."""
        if not self.guided:
            return eps
        uncond, cond = eps.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        x_in, t_in, text = self.model_inputs(x, t)
        return self.guide(self._call(x_in, t_in, text, step))


def sample_latents(denoiser: GuidedSD, scheduler, *, steps: int, seed: int = 0,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Latents ``(B, C, h, w)`` for the denoiser's prompts through :func:`~diffprune.sampling.trajectory`,
    from :func:`~diffprune.sampling.initial_noise` of ``seed`` (``StableDiffusionPipeline``'s draw with
    ``generator=torch.Generator().manual_seed(seed)`` on the CPU; DDIM's ``init_noise_sigma`` is 1)."""
    noise = initial_noise(denoiser.batch, denoiser.latent_shape, seed).to(device) * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(seed * 100_003)
    return trajectory(denoiser, scheduler, noise, steps, generator=gen, clamp=False)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] from latents, as ``StableDiffusionPipeline`` decodes them
    (``latents / scaling_factor``: the pipeline divides where DiTPipeline multiplies by the inverse)."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


__all__ = ["HUB_SD", "SD15_UNET", "SD_SCHEDULER", "TINY_SD_UNET", "TINY_TEXT", "GuidedSD", "build_sd_pipeline",
           "decode", "encode_prompts", "load_sd", "sample_latents", "save_sd", "tiny_tokenizer", "to_unit"]
