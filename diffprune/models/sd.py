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
from typing import TYPE_CHECKING, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ..config import ConfigError
from ..io import atomic_path
from ..sampling import initial_noise, trajectory
from .dit import TINY_VAE, to_unit
from .guidance import bare_call_defaults
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


# ----------------------------------------------------------------------------- the pipeline's family

def build_sd_unet(block_out_channels: Sequence[int], layers_per_block: int, attention_head_dim: int,
                  norm_num_groups: int, cross_attention_dim: int, latent_shape: Sequence[int],
                  seed: int = 0) -> UNet2DConditionModel:
    """A fresh ``UNet2DConditionModel`` laid out as SD-1.5's (cross-attention in every level but the
    deepest, :data:`SD15_UNET`) for latents ``(C, h, w)``; seeded, the global RNG untouched."""
    c, h, w = (int(v) for v in latent_shape)
    levels = len(block_out_channels)
    if h != w or h % 2 ** (levels - 1):
        raise ConfigError(f"sd.block_out_channels = {list(block_out_channels)}: {levels - 1} downsamplings do "
                          f"not divide the square latent side ({h} x {w})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=h, in_channels=c, out_channels=c, layers_per_block=layers_per_block,
            block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim)


def build_text_encoder(width: int, layers: int, heads: int, seed: int = 0):
    """``(CLIPTextModel, tokenizer)``: a CLIP text transformer of ``width`` initialised here (seeded,
    frozen in eval mode: the family's methods never train it) and :func:`tiny_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(cfg).eval(), tokenizer


def save_text_encoder(encoder, tokenizer, path: str | Path) -> Path:
    """``path/text_encoder`` (safetensors) and ``path/tokenizer`` (JSON vocabulary), the layout of a
    ``StableDiffusionPipeline`` folder's two sub-folders; written atomically."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
    return path


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu"):
    """``(CLIPTextModel, CLIPTokenizer)`` of :func:`save_text_encoder`'s folder (or a pipeline folder);
    safetensors only: pickled ``.bin`` weights are refused, never unpickled."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..io import ArtifactError

    try:
        encoder = CLIPTextModel.from_pretrained(str(Path(path) / "text_encoder"), use_safetensors=True,
                                                low_cpu_mem_usage=False)  # (see targets.load_vae)
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(path) / "tokenizer"))
    except (OSError, ValueError, EnvironmentError) as e:
        raise ArtifactError(f"{path}: not a text encoder folder (text_encoder/ safetensors, tokenizer/) "
                            f"({str(e).splitlines()[0]})") from e
    return encoder.to(device).eval(), tokenizer


def sd_pipeline(unet: Optional[UNet2DConditionModel], vae: Optional[AutoencoderKL], text_encoder, tokenizer,
                scheduler_config: Optional[dict] = None) -> StableDiffusionPipeline:
    """diffusers' own ``StableDiffusionPipeline`` around a (possibly pruned) UNet: what users sample with
    (DDIM on ``scheduler_config``'s betas; no safety checker). ``unet``/``vae`` may be ``None`` for a
    pipeline that only encodes prompts."""
    from diffusers import StableDiffusionPipeline

    sched = DDIMScheduler.from_config(scheduler_config) if scheduler_config else DDIMScheduler(**SD_SCHEDULER)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def class_captions(template: str, num_classes: int, names: Optional[Sequence[str]] = None) -> list[str]:
    """One caption per class: ``template`` with ``{label}`` replaced by the class's name (``names[k]``:
    a folder's name, a Hub ClassLabel's; the digits': "a handwritten 7"), or by its id without names."""
    if names is not None and len(names) < num_classes:
        raise ConfigError(f"{len(names)} class names for {num_classes} classes: the dataset cache is inconsistent "
                          f"(rerun the data stage)")
    return [template.replace("{label}", str(k) if names is None else names[k]) for k in range(num_classes)]


class CaptionTable:
    """The text embeddings of a family's class captions, computed once by the pipeline's own
    ``encode_prompt``: ``cond`` ``(n, L, D)`` (row k: caption k) and ``negative`` ``(1, L, D)`` (the empty
    prompt, the pipeline's negative and the caption dropped in training)."""

    def __init__(self, pipe: StableDiffusionPipeline, captions: Sequence[str]) -> None:
        both = encode_prompts(pipe, list(captions), guided=True)
        self.captions = list(captions)
        self.negative, self.cond = both[:1].clone(), both[len(captions):].clone()

    def text(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        """The model call's text for ``labels`` ``(B,)``: ``(B, L, D)``, or ``(2B, L, D)`` ``[negative, caption]``."""
        cond = self.cond[labels.cpu()]
        return torch.cat([self.negative.expand(len(labels), -1, -1), cond]) if guided else cond


def empty_prompt_by_default(unet: nn.Module, table: "CaptionTable") -> ContextManager[None]:
    """Within it, a bare call ``unet(x, t)`` attends to the empty prompt's embeddings (its MACs are
    any prompt's: the text length is the tokenizer's)."""
    return bare_call_defaults(unet, lambda x: {"encoder_hidden_states": table.negative.to(
        device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)})


class CaptionCall:
    """The training call (:data:`diffprune.training.ConditionalCall`) of a text-to-image UNet: labels
    ``(B,)`` -> their captions' embeddings; in training mode each caption is dropped to the empty
    prompt with probability ``dropout`` (the global RNG, as DiT's label dropout), which is what
    classifier-free guidance needs. A teacher (eval mode) always sees the captions."""

    def __init__(self, table: CaptionTable, dropout: float = 0.0) -> None:
        self.table, self.dropout = table, float(dropout)

    def __call__(self, model: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        text = self.table.cond.to(x.device)[labels]
        if model.training and self.dropout > 0:
            drop = torch.rand(len(labels), device=x.device) < self.dropout
            text = torch.where(drop[:, None, None], self.table.negative.to(x.device), text)
        return model(x, t, encoder_hidden_states=text).sample


class PromptCycle:
    """A guided text-to-image denoiser for :func:`diffprune.sampling.sample`: image ``i`` is prompted
    with caption ``i % n`` (the same prompts for every model at the same seed); the final latents
    are decoded by ``vae``. ``guided``: a :class:`GuidedSD` (or a skip-schedule runner) whose text
    is set here per batch."""

    def __init__(self, guided: GuidedSD, table: CaptionTable, vae: AutoencoderKL) -> None:
        self.guided, self.table, self.vae = guided, table, vae
        self.num_classes = len(table.captions)

    def prompts(self, n: int) -> list[str]:
        """The prompts of images ``0 .. n-1`` (what their CLIP score is measured against)."""
        return [self.table.captions[i % self.num_classes] for i in range(n)]

    def condition(self, indices: range) -> None:
        labels = torch.arange(indices.start, indices.stop) % self.num_classes
        self.guided.text, self.guided.batch = self.table.text(labels, self.guided.guided), len(labels)

    def start(self, num_steps: int) -> None:
        if hasattr(self.guided, "start"):
            self.guided.start(num_steps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return self.guided(x, t, step)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, latents)


__all__ = ["CaptionCall", "CaptionTable", "PromptCycle", "build_sd_unet", "build_text_encoder", "class_captions",
           "load_text_encoder", "save_text_encoder", "sd_pipeline", "HUB_SD", "SD15_UNET", "SD_SCHEDULER", "TINY_SD_UNET", "TINY_TEXT", "GuidedSD", "build_sd_pipeline",
           "decode", "encode_prompts", "load_sd", "sample_latents", "save_sd", "tiny_tokenizer", "to_unit"]
