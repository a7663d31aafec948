"""Class-conditional latent DiT: diffusers' ``DiTTransformer2DModel`` + ``AutoencoderKL`` + DDIM.

A DiT model is a diffusers ``DiTPipeline`` folder (``model_index.json``, ``transformer/``, ``vae/``,
``scheduler/``). :func:`load_dit` loads one from a local folder or a Hub id (``facebook/DiT-XL-2-256``)
with ``DiTPipeline.from_pretrained``; :func:`build_dit_pipeline` builds a tiny one of the same classes
from configs (tests, offline), which :func:`save_dit` writes in the same layout, so it is loaded back
by the very same :func:`load_dit`.

:class:`GuidedDiT` is the house denoiser ``(x_t, t, step) -> eps`` for one batch of class labels with
``DiTPipeline``'s classifier-free guidance; :func:`sample_latents` runs it through
:func:`diffprune.sampling.trajectory` (the one loop) and :func:`decode` turns latents into images.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Optional, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from ..config import ConfigError
from ..io import atomic_path
from ..sampling import initial_noise, trajectory
from .guidance import LabelGuided, ModelCall, bare_call_defaults
from .unet import check_pretrained_source

HUB_DIT = "facebook/DiT-XL-2-256"
"""The Hub preset of this family (ImageNet 256 x 256, 1000 classes, latent 32 x 32 x 4)."""

# transformer/config.json of facebook/DiT-XL-2-256, every architectural key: the real architecture,
# built locally for counting (no weights needed). 675 M parameters: never built in tests.
DIT_XL_2_256: dict = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
    patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    norm_elementwise_affine=False, attention_bias=True, dropout=0.0, upcast_attention=False,
)

# A DiT of the same class, tiny: 3 blocks, width 16 (2 heads of 8), 16 tokens of an 8 x 8 x 4 latent,
# learned sigma (8 output channels). It keeps DiT's 1000 classes + the null class, because
# DiTPipeline hard-codes the null class id 1000 (its class table is most of the ~45 k parameters).
TINY_DIT: dict = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
    patch_size=2, num_embeds_ada_norm=1000,
)

# A tiny AutoencoderKL: 4 latent channels, one downsampling (latent 8 x 8 -> image 16 x 16; SD's VAE has 3).
TINY_VAE: dict = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=16,
)

# scheduler/scheduler_config.json of facebook/DiT-XL-2-256 (DDIM, linear betas, no clipping of latents)
DIT_SCHEDULER: dict = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
)


def build_dit_pipeline(dit: Optional[dict] = None, vae: Optional[dict] = None, seed: int = 0) -> DiTPipeline:
    """A freshly initialised ``DiTPipeline`` (eval mode) from configs; defaults :data:`TINY_DIT`, :data:`TINY_VAE`.

    Seeded without touching the global RNG. The scheduler is :data:`DIT_SCHEDULER`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(**(TINY_DIT if dit is None else dit)).eval()
        autoencoder = AutoencoderKL(**(TINY_VAE if vae is None else vae)).eval()
    return DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=DDIMScheduler(**DIT_SCHEDULER))


def save_dit(pipe: DiTPipeline, path: str | Path) -> Path:
    """Write ``pipe`` atomically as a diffusers folder (safetensors, no pickle) that :func:`load_dit` reads."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return path


def load_dit(name_or_path: str | Path, device: str | torch.device = "cpu") -> DiTPipeline:
    """``DiTPipeline.from_pretrained`` of a local folder or a Hub id (``facebook/DiT-XL-2-256``), in eval mode.

    The Hub preset names its transformer ``Transformer2DModel``; diffusers maps that to
    ``DiTTransformer2DModel`` on load. Offline, a Hub id fails at once with a :class:`ConfigError`.
    """
    name_or_path = str(name_or_path)
    check_pretrained_source(name_or_path, "dit.pretrained")
    try:
        pipe = DiTPipeline.from_pretrained(name_or_path, use_safetensors=None)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"dit.pretrained = {name_or_path!r}: cannot load a DiTPipeline ({e})") from e
    if not isinstance(pipe.transformer, DiTTransformer2DModel):
        raise ConfigError(f"dit.pretrained = {name_or_path!r}: its transformer is a "
                          f"{type(pipe.transformer).__name__}, not a DiTTransformer2DModel")
    pipe.transformer.eval()
    pipe.vae.eval()
    return pipe.to(device)


class GuidedDiT(LabelGuided):
    """A DiT as a house denoiser ``(x_t (B, C, h, w), t (B,), step) -> eps (B, C, h, w)``, ``DiTPipeline``'s way.

    Guidance as :class:`~diffprune.models.guidance.LabelGuided` (DiTPipeline's switch and formula; a
    learned-sigma model's other ``C`` channels, the variance, are dropped, as DiTPipeline drops them:
    its DDIM step uses eps alone). Deviation: DiTPipeline keeps the doubled latents through its
    loop and steps the scheduler on both (identical) halves; here the loop carries the B latents
    and doubles them per call, which gives the same numbers (every scheduler op is elementwise).

    Args:
        transformer: a ``DiTTransformer2DModel`` in eval mode (training mode drops labels at random).
        class_labels: ``(B,)`` class ids in ``[0, num_classes)``, one per image of the batch.
        guidance_scale: g; ``<= 1`` runs the conditional model alone (batch B).
        call: the model call (default ``transformer(x, timestep=t, class_labels=y).sample``); a
            block-skip runner passes its own, so guidance and labels stay here.
    """

    def __init__(self, transformer: DiTTransformer2DModel, class_labels: Sequence[int] | torch.Tensor,
                 guidance_scale: float = 1.0, *, call: Optional[ModelCall] = None) -> None:
        cfg = transformer.config
        if transformer.training:
            raise ValueError("transformer is in training mode (its label embedding drops labels at random): call .eval()")
        c = int(cfg.in_channels)
        if transformer.out_channels not in (c, 2 * c):
            raise ValueError(f"out_channels = {transformer.out_channels}: expected {c} (eps) or {2 * c} "
                             "(eps + learned sigma)")
        self.transformer = transformer
        # DiTPipeline hard-codes the null class 1000 (DiT-XL's class count); the model's own count is
        # the same id there and the only valid one for other class counts
        n = int(cfg.num_embeds_ada_norm)
        super().__init__(class_labels, n, n, (c, int(cfg.sample_size), int(cfg.sample_size)), guidance_scale,
                         call=call)

    def _plain(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=y).sample


def sample_latents(denoiser: GuidedDiT, scheduler, *, steps: int, seed: int = 0,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Latents ``(B, C, h, w)`` for the denoiser's B class labels, through :func:`~diffprune.sampling.trajectory`.

    The start noise is :func:`~diffprune.sampling.initial_noise` of ``seed``: the same draw as
    ``DiTPipeline(..., generator=torch.Generator().manual_seed(seed))`` on the CPU. The latents are
    not clamped. Deviation: a stochastic scheduler's step noise comes from a generator seeded by
    ``seed`` (as :func:`~diffprune.sampling.sample` does for batch 0), not from the global RNG.
    """
    noise = initial_noise(len(denoiser.class_labels), denoiser.latent_shape, seed).to(device)
    gen = torch.Generator().manual_seed(seed * 100_003)
    return trajectory(denoiser, scheduler, noise, steps, generator=gen, clamp=False)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] from latents ``(B, C, h, w)``, as DiTPipeline decodes them.

    ``(1 / scaling_factor) * latents`` is written as DiTPipeline writes it (``latents / s`` rounds
    differently); like DiTPipeline, the VAE's ``shift_factor`` is not applied.
    """
    images = vae.decode((1 / vae.config.scaling_factor) * latents).sample
    return images.clamp(-1, 1)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``(B, C, h, w)`` of images ``(B, 3, H, W)`` in [-1, 1]: the posterior's mode times
    ``scaling_factor`` (DiT's training draws a sample of the posterior; the mode is deterministic)."""
    return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], DiTPipeline's ``output_type="pt"`` convention."""
    return (images / 2 + 0.5).clamp(0, 1)



def build_dit(num_layers: int, num_heads: int, head_dim: int, patch_size: int,
              latent_shape: Sequence[int], seed: int = 0) -> DiTTransformer2DModel:
    """A fresh class-conditional ``DiTTransformer2DModel`` (eps only, no learned sigma) for latents of
    ``latent_shape = (C, h, w)``; seeded, the global RNG untouched.

    It keeps 1000 classes + the null class whatever the dataset's class count (``DiTPipeline``
    hard-codes the null id 1000): a dataset's labels 0 .. n-1 use the first n rows of the table.
    In training mode its label embedding drops 10% of the labels to the null class (DiT's
    ``class_dropout_prob``), which is what classifier-free guidance needs.
    """
    c, h, w = (int(v) for v in latent_shape)
    if h != w or h % patch_size:
        raise ConfigError(f"dit.patch_size = {patch_size}: must divide the square latent side ({h} x {w})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiTTransformer2DModel(num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=c,
                                     out_channels=c, num_layers=num_layers, sample_size=h, patch_size=patch_size,
                                     num_embeds_ada_norm=1000)


def null_label_by_default(transformer: DiTTransformer2DModel) -> ContextManager[None]:
    """Within it, a bare call ``transformer(x, t)`` runs the null class (MACs counting, shape checks)."""
    null = int(transformer.config.num_embeds_ada_norm)
    return bare_call_defaults(transformer, lambda x: {"class_labels": torch.full((x.shape[0],), null, dtype=torch.long,
                                                                                 device=x.device)})


def dit_call(model: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training call (:data:`diffprune.training.ConditionalCall`): eps ``(B, C, h, w)`` for labels ``(B,)``."""
    return model(x, timestep=t, class_labels=labels).sample[:, : model.config.in_channels]


class ClassCycle:
    """A guided DiT denoiser for :func:`diffprune.sampling.sample`: image ``i`` is drawn as class
    ``i % num_classes`` (a balanced set, the same classes for every model at the same seed), and the
    final latents are decoded by ``vae`` into images.

    ``sample`` calls :meth:`condition` with the image indices of each batch before its trajectory,
    and :meth:`decode` after it (no clamping of latents in between).

    Args:
        guided: a :class:`GuidedDiT` (or a subclass: a skip-schedule runner); its labels are set here.
        num_classes: how many classes the dataset has (labels 0 .. n-1).
        vae: the ``AutoencoderKL`` whose latents the model denoises.
    """

    def __init__(self, guided: GuidedDiT, num_classes: int, vae: AutoencoderKL) -> None:
        if not 1 <= num_classes <= guided.num_classes:
            raise ValueError(f"num_classes = {num_classes}: the model has {guided.num_classes} classes")
        self.guided, self.num_classes, self.vae = guided, int(num_classes), vae

    def condition(self, indices: range) -> None:
        self.guided.class_labels = torch.arange(indices.start, indices.stop) % self.num_classes

    def start(self, num_steps: int) -> None:
        if hasattr(self.guided, "start"):
            self.guided.start(num_steps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return self.guided(x, t, step)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, latents)


def dit_pipeline(transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler_config: dict) -> DiTPipeline:
    """diffusers' own ``DiTPipeline`` around a (possibly pruned) transformer: what users sample with."""
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler.from_config(scheduler_config))
