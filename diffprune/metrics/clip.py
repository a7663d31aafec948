"""CLIP score of text-to-image samples on a CLIP model the user has.

``CLIPScore(I, C) = max(100 cos(E_I, E_C), 0)`` averaged over the pairs (Hessel et al. 2021; the
DiP-GO paper reports 30.30 for SD-1.5 on COCO with ViT-L/14), with ``E_I``, ``E_C`` the projected
embeddings ``CLIPModel`` returns. Deviation, named: torchmetrics' ``clip_score`` (1.9) breaks on
transformers 5, whose ``get_image_features`` returns an output object rather than a tensor; the
formula is computed here from ``CLIPModel``'s own ``image_embeds`` / ``text_embeds`` instead. The CLIP weights are never
downloaded at run time: :func:`clip_score` takes a local folder (``CLIPModel`` + ``CLIPProcessor``
saved with ``save_pretrained``) or a Hub id while the Hub is reachable, and when there are none it
says so in its label instead of returning a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

HUB_CLIP = "openai/clip-vit-large-patch14"
"""The CLIP of the DiP-GO paper's SD-1.5 table (ViT-L/14)."""


@dataclass(frozen=True)
class ClipResult:
    """The mean CLIP score (``None`` when not measured) and what it was measured with, or why not."""

    score: Optional[float]
    label: str


def _load(weights: str):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(weights).eval()
    return model, CLIPProcessor.from_pretrained(weights)


def clip_score(images: torch.Tensor, prompts: Sequence[str], weights: str | Path | None,
               setting: str = "clip.weights") -> ClipResult:
    """Mean CLIP score of ``images (N, 3, H, W)`` in [-1, 1] (grey ``(N, 1, H, W)`` repeated to RGB)
    against their ``prompts`` (N strings).

    ``weights``: a folder holding a CLIP model and processor, or a Hub id (``setting``: the params
    key it came from, named in the label); ``None``, a missing folder or an unreachable Hub gives
    ``ClipResult(None, "not measured: ...")``.
    """
    if images.ndim == 4 and images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and {len(prompts)} prompts: need (N, 3, H, W) and N prompts")
    from ..config import ConfigError
    from ..models.unet import check_pretrained_source

    if weights is None:
        return ClipResult(None, f"CLIP score not measured: no CLIP weights given ({setting})")
    try:
        check_pretrained_source(str(weights), setting)
    except ConfigError as e:
        return ClipResult(None, f"CLIP score not measured: {e}")
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # what CLIP's processor expects
    model, processor = _load(str(weights))
    inputs = processor(text=list(prompts), images=list(pixels), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)  # (N,)
    return ClipResult(float((100 * cos).clamp_min(0).mean()), f"CLIP score ({weights})")
