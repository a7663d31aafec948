"""FID with clean-fid, on Inception features when its weights file is present, else on a feature
network trained on the dataset's own classes (always for digits). The extractor's name is returned
with every FID so no number is ever shown without saying what it measured.

Images are quantised to uint8 before feature extraction, as clean-fid does with saved images.
"""

from __future__ import annotations

import json
import logging
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
    """A small CNN classifier; its pooled penultimate activations ``(B, width*4)`` are FID features."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.hparams = {"channels": channels, "image_size": image_size, "num_classes": num_classes, "width": width}
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
        self.feature_dim = c_out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` in [-1, 1] -> ``(B, feature_dim)``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> the float image a uint8 PNG would hold (values k/127.5 - 1)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    ys = torch.arange(4).repeat_interleave(x.shape[0])
    return xs, ys


def train_feature_net(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      *, epochs: int = 30, seed: int = 0, progress: bool = True) -> tuple[FeatureNet, float, str]:
    """Train the feature network; returns (net, held-out accuracy, task).

    With class labels (``train_y >= 0``) it learns the classes; without, it learns to predict which
    of 4 rotations was applied (a self-supervised task), so unlabelled folders still get features.
    """
    torch.manual_seed(seed)
    task = "classes"
    if (train_y < 0).any() or (test_y < 0).any():
        task = "rotation"
        train_x, train_y = _rotations(train_x)
        test_x, test_y = _rotations(test_x)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    net = FeatureNet(train_x.shape[1], train_x.shape[-1], num_classes)
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
            loss = F.cross_entropy(net(xb), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(quantize(test_x)).argmax(1) == test_y).float().mean().item()
    return net, acc, task


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

    name = f"featnet-{doc.get('task', 'classes')}(dim={net.feature_dim}, heldout_acc={doc.get('accuracy', float('nan')):.3f})"
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
