"""FID with clean-fid, on Inception features when its weights file is present, else on a feature
network trained on the dataset's own classes (always for digits). The extractor's name is returned
with every FID so no number is ever shown without saying what it measured.

A classifier alone learns features blind to image quality (issue 19: pure colour noise scored a
better FID than the teacher), so the feature network also learns to tell real images from
corrupted ones (``FeatureNet.quality``, :func:`corrupt`), and the ``features`` stage calibrates
every extractor against known-bad sets (:mod:`diffprune.metrics.calibration`).

Images are quantised to uint8 before feature extraction, as clean-fid does with saved images.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..io import ArtifactError, atomic_path, read_json, sha256_file

log = logging.getLogger(__name__)


class FeatureNet(nn.Module):
    """A small CNN; its pooled penultimate activations ``(B, width*4)`` are FID features.

    ``head`` predicts the dataset's classes (or rotations); ``quality``, when ``num_quality > 0``,
    predicts whether an input is real or which corruption of :data:`CORRUPTIONS` made it.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32,
                 num_quality: int = 0) -> None:
        super().__init__()
        self.hparams = {"channels": channels, "image_size": image_size, "num_classes": num_classes, "width": width,
                        "num_quality": num_quality}
        layers: list[nn.Module] = []
        c_in, c, size = channels, width, image_size
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
        while size > 4:  # halve the resolution until 4x4, doubling channels up to width*4
            c_out = min(c * 2, width * 4)
            layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c, size = c_out, (size + 1) // 2
        c_out = width * 4
        layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_out, num_classes)
        self.quality = nn.Linear(c_out, num_quality) if num_quality else None
        self.feature_dim = c_out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` in [-1, 1] -> ``(B, feature_dim)``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> the float image a uint8 PNG would hold (values k/127.5 - 1)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x``: ``(B, C, H, W)`` -> the same shape, blurred with a separable Gaussian (reflect padding)."""
    radius = max(1, min(int(math.ceil(3 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def shuffle_pixels(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x``: ``(B, C, H, W)`` -> the same pixels, positions permuted at random per image."""
    b, c, h, w = x.shape
    perm = torch.argsort(torch.rand(b, h * w, generator=g), dim=1)
    flat = x.reshape(b, c, h * w)
    return torch.gather(flat, 2, perm[:, None, :].expand(b, c, h * w)).reshape(b, c, h, w)


# The quality objective's classes: 0 = real, then one per corruption. Uniform noise and the
# dataset's mean image are left out on purpose: the calibration's sets of those kinds are unseen.
CORRUPTIONS = ("noise", "blur", "shuffle", "mix")


def corrupt(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt every image of ``x`` ``(B, C, H, W)`` -> (``(B, C, H, W)`` images, ``(B,)`` labels 1..4).

    Each image gets one kind (label ``1 + CORRUPTIONS.index(kind)``) blended in at a random strength
    ``a`` (``(1 - a) x + a c(x)``): Gaussian noise with the batch's per-channel pixel statistics, a
    heavy blur or its pixels shuffled (``a`` in [0.3, 1]), or another image of the batch superimposed
    (``a`` in [0.3, 0.7]), so the features grade how far an image is from real, not only whether it
    is pure noise.
    """
    b = x.shape[0]
    kind = torch.randint(len(CORRUPTIONS), (b,), generator=g)
    a = (0.3 + 0.7 * torch.rand(b, generator=g)).view(b, 1, 1, 1)  # noise, blur, shuffle: 30% .. 100%
    noise = x.mean(dim=(0, 2, 3), keepdim=True) + x.std(dim=(0, 2, 3), keepdim=True) * torch.randn(x.shape, generator=g)
    blur = gaussian_blur(x, 0.25 * x.shape[-1])
    other = x[torch.randperm(b, generator=g)]
    cands = torch.stack([noise, blur, shuffle_pixels(x, g), other])  # (4, B, C, H, W)
    c = cands[kind, torch.arange(b)]
    # mix: 30% .. 70% (at 0% or 100% it would be a real image)
    a = torch.where(kind.view(b, 1, 1, 1) == CORRUPTIONS.index("mix"), 0.3 + 0.4 * (a - 0.3) / 0.7, a)
    return ((1 - a) * x + a * c).clamp(-1, 1), kind + 1


def _rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    ys = torch.arange(4).repeat_interleave(x.shape[0])
    return xs, ys


def _step_loss(net: FeatureNet, xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The loss of one batch ``xb`` ``(B, C, H, W)``: labels, plus real-vs-corrupted when the net has it."""
    if net.quality is None:
        return F.cross_entropy(net(xb), yb)
    xc, qc = corrupt(xb[: (len(xb) + 1) // 2], g)  # half a batch of corruptions: ~1.5x the class-only cost
    feats = net.features(torch.cat([xb, quantize(xc)]))
    q = torch.cat([torch.zeros(len(xb), dtype=torch.long), qc])
    return F.cross_entropy(net.head(feats[: len(xb)]), yb) + F.cross_entropy(net.quality(feats), q)


def train_feature_net(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      *, epochs: int = 30, seed: int = 0, progress: bool = True,
                      quality: bool = True) -> tuple[FeatureNet, float, str]:
    """Train the feature network; returns (net, held-out accuracy, task).

    With class labels (``train_y >= 0``) it learns the classes; without, it learns to predict which
    of 4 rotations was applied (a self-supervised task), so unlabelled folders still get features.
    With ``quality`` (the default) a second head learns to tell real images from corrupted ones
    (:func:`corrupt`), so the features see image quality, not only class identity; see
    :func:`objective_name`. ``x``: ``(N, C, H, W)`` in [-1, 1]; ``y``: ``(N,)``.
    """
    torch.manual_seed(seed)
    task = "classes"
    if (train_y < 0).any() or (test_y < 0).any():
        task = "rotation"
        train_x, train_y = _rotations(train_x)
        test_x, test_y = _rotations(test_x)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    num_quality = 1 + len(CORRUPTIONS) if quality else 0
    net = FeatureNet(train_x.shape[1], train_x.shape[-1], num_classes, num_quality=num_quality)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(train_x) + 127) // 128))
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="feature net", disable=not progress, leave=False):
        net.train()
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(train_x), 128):
            idx = perm[i : i + 128]
            xb = quantize(train_x[idx])
            # small random shifts (+-1 px) make the features robust to sampler jitter
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = _step_loss(net, xb, train_y[idx], g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(quantize(test_x)).argmax(1) == test_y).float().mean().item()
    return net, acc, task


def objective_name(net: FeatureNet, task: str) -> str:
    """What the net was trained on: ``classes``, ``rotation``, or either ``+quality`` (real vs corrupted)."""
    return f"{task}+quality" if net.quality is not None else task


@dataclass(frozen=True)
class Extractor:
    """A named feature extractor: ``fn(images (B, C, H, W) in [-1, 1]) -> (B, D)`` numpy features."""

    name: str
    fn: Callable[[torch.Tensor], np.ndarray]


def save_feature_net(net: FeatureNet, path: str | Path, info: dict) -> Path:
    with atomic_path(path, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "featnet.safetensors"))
        doc = {"hparams": net.hparams, "sha256": sha256_file(tmp / "featnet.safetensors"), **info}
        (tmp / "featnet.json").write_text(json.dumps(doc, indent=2))
    return Path(path)


def load_feature_net(path: str | Path) -> tuple[FeatureNet, dict]:
    path = Path(path)
    doc = read_json(path / "featnet.json")
    weights = path / "featnet.safetensors"
    if not weights.exists() or sha256_file(weights) != doc["sha256"]:
        raise ArtifactError(f"{weights}: missing or content hash mismatch (corrupted feature network)")
    net = FeatureNet(**doc["hparams"])
    net.load_state_dict(load_file(str(weights)))
    return net.eval(), doc


def feature_net_extractor(path: str | Path, batch: int = 1000) -> Extractor:
    net, doc = load_feature_net(path)

    @torch.no_grad()
    def fn(x: torch.Tensor) -> np.ndarray:
        return torch.cat([net.features(quantize(x[i : i + batch])) for i in range(0, len(x), batch)]).numpy()

    objective = doc.get("objective", doc.get("task", "classes"))
    name = f"featnet-{objective}(dim={net.feature_dim}, heldout_acc={doc.get('accuracy', float('nan')):.3f})"
    return Extractor(name, fn)


def inception_extractor(weights_file: str | Path, device: str | torch.device = "cpu", batch: int = 64) -> Extractor:
    """clean-fid's Inception-v3 (``inception-2015-12-05.pt``) from a local file; no download."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    weights_file = Path(weights_file)
    if weights_file.name != "inception-2015-12-05.pt" or not weights_file.is_file():
        raise ArtifactError(f"evaluate.inception_weights = {str(weights_file)!r}: expected an existing "
                            "file named inception-2015-12-05.pt")
    model = InceptionV3W(str(weights_file.parent), download=False).to(device).eval()
    resize = build_resizer("clean")

    @torch.no_grad()
    def fn(x: torch.Tensor) -> np.ndarray:
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        feats = []
        for i in range(0, len(u8), batch):
            imgs = [resize(im.permute(1, 2, 0).numpy()) for im in u8[i : i + batch]]
            b = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
            feats.append(model(b.to(device)).cpu().numpy())
        return np.concatenate(feats)

    return Extractor("clean-fid inception-v3 (pool3, 2048-d)", fn)


def get_extractor(features_dir: str | Path, inception_weights: str | None, device="cpu") -> Extractor:
    """Inception when its weights file is configured, else the dataset's feature network."""
    if inception_weights:
        return inception_extractor(inception_weights, device)
    return feature_net_extractor(features_dir)


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance of two feature sets ``(N, D)``, computed by clean-fid."""
    from cleanfid.fid import fid_from_feats

    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(feats_a)} and {len(feats_b)}")
    return float(fid_from_feats(feats_a.astype(np.float64), feats_b.astype(np.float64)))
