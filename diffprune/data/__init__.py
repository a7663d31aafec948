"""Dataset caching with HF ``datasets``: digits (built in), local image folders, Hub ids.

The cache is a ``DatasetDict`` with a ``train`` split and a held-out ``ref`` split (for the FID
floor and the feature network's accuracy), written with ``save_to_disk`` atomically. Splits are a
deterministic function of the source and :class:`~diffprune.config.DataConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import ConfigError, DataConfig
from ..io import ArtifactError, atomic_path, read_json, sha256_file

CHECKSUMS = "checksums.json"
CLASS_NAMES = "class_names.json"  # the classes' names (folder names, a Hub ClassLabel's, the digits), or null
Labels = tuple[list[int] | None, list[str] | None]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """The dataset source is unusable (empty, corrupt images, unknown id)."""


def _digits() -> tuple[list[np.ndarray], list[int], list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1797 images, 8x8, values 0..16, bundled with scikit-learn (no network)
    imgs = [np.round(im * (255.0 / 16.0)).astype(np.uint8) for im in d.images]
    return imgs, [int(y) for y in d.target], [str(k) for k in range(10)]


def _folder(root: Path, channels: int) -> tuple[list[np.ndarray], list[int] | None, list[str] | None]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"data.source = {str(root)!r}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    labelled = len(classes) > 1
    imgs, labels = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert("L" if channels == 1 else "RGB")
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"data.source: cannot read image {p} ({type(e).__name__}: {e})") from e
        if arr.size == 0 or min(arr.shape[:2]) < 1:
            raise DataError(f"data.source: image {p} is empty (shape {arr.shape})")
        imgs.append(arr)
        labels.append(classes.index(p.parent.relative_to(root).as_posix()))
    return imgs, labels if labelled else None, classes if labelled else None


def _hub(name: str, channels: int, max_images: int) -> tuple[list[np.ndarray], list[int] | None, list[str] | None]:
    from ..models.unet import _hub_reachable

    if name.count("/") > 1 or not name.strip() or name.startswith((".", "/")):
        raise ConfigError(f"data.source = {name!r}: not a folder, 'digits', or a Hub dataset id")
    if not _hub_reachable():
        raise ConfigError(f"data.source = {name!r}: the Hugging Face Hub is not reachable (offline?); "
                          "use 'digits' or a local image folder")
    import datasets

    split = "train" if not max_images else f"train[:{max_images}]"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the Hub raises many types; surface one clear line
        raise ConfigError(f"data.source = {name!r}: cannot load this Hub dataset ({type(e).__name__}: {e})") from e
    img_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if img_col is None:
        raise DataError(f"data.source = {name!r}: the dataset has no image column")
    lab_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    imgs = [np.asarray(im.convert("L" if channels == 1 else "RGB")) for im in ds[img_col]]
    return imgs, (list(ds[lab_col]) if lab_col else None), (list(ds.features[lab_col].names) if lab_col else None)


def _resize(arr: np.ndarray, size: int, channels: int) -> np.ndarray:
    im = Image.fromarray(arr)
    if im.size != (size, size):
        w, h = im.size
        s = min(w, h)  # center crop to square, then resize
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
    out = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return out


def load_source(cfg: DataConfig) -> tuple[list[np.ndarray], list[int] | None, list[str] | None]:
    """Raw images (uint8, HxW or HxWx3), labels and the classes' names (both None when unlabelled)
    from the configured source."""
    if cfg.source == "digits":
        imgs, labels, names = _digits()
    elif Path(cfg.source).is_dir():
        imgs, labels, names = _folder(Path(cfg.source), cfg.channels)
    elif Path(cfg.source).exists():
        raise ConfigError(f"data.source = {cfg.source!r}: is a file, expected a folder of images")
    else:
        imgs, labels, names = _hub(cfg.source, cfg.channels, cfg.max_images)
    if cfg.max_images:
        imgs, labels = imgs[: cfg.max_images], (labels[: cfg.max_images] if labels else None)
    if len(imgs) < 2:
        raise DataError(f"data.source = {cfg.source!r}: needs at least 2 images, found {len(imgs)}")
    return [_resize(a, cfg.image_size, cfg.channels) for a in imgs], labels, names if labels else None


def cache_dataset(cfg: DataConfig, out_dir: str | Path) -> Path:
    """Cache the source as a DatasetDict(train, ref) at ``out_dir`` (atomic). Returns the path."""
    import datasets

    imgs, labels, names = load_source(cfg)
    n = len(imgs)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    n_ref = max(1, int(round(n * cfg.ref_fraction)))
    if n - n_ref < 1:
        raise DataError(f"data.ref_fraction = {cfg.ref_fraction}: leaves no training images out of {n}")
    parts = {"ref": order[:n_ref], "train": order[n_ref:]}
    feats = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.Value("int64"),
    })
    dd = {}
    for split, idx in parts.items():
        dd[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(imgs[i]) for i in idx],
             "label": [labels[i] if labels else -1 for i in idx]},
            features=feats,
        )
    with atomic_path(out_dir, is_dir=True) as tmp:
        datasets.DatasetDict(dd).save_to_disk(str(tmp))
        (tmp / CLASS_NAMES).write_text(json.dumps(names))
        files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / CHECKSUMS).write_text(json.dumps(files, indent=1))
    return Path(out_dir)


def class_names(path: str | Path) -> list[str] | None:
    """The class names a cached dataset records (None: unlabelled, or a cache written before names
    were recorded: the class ids stand in)."""
    f = Path(path) / CLASS_NAMES
    if not f.exists():
        return None
    names = read_json(f)
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) and len(n) <= 200 for n in names)):
        raise ArtifactError(f"{f}: expected null or a list of class names (strings of at most 200 characters)")
    return names


def verify_dataset(path: Path) -> None:
    """Refuse a cached dataset whose files are missing, truncated or changed (naming the file)."""
    sums = path / CHECKSUMS
    if not sums.exists():
        raise ArtifactError(f"{sums}: missing (not a diffprune dataset cache, or written by an interrupted run)")
    for name, digest in read_json(sums).items():
        f = path / name
        if not f.exists() or sha256_file(f) != digest:
            raise ArtifactError(f"{f}: missing or content hash mismatch (corrupted dataset cache; rerun the data stage)")


def load_split(path: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` float in [-1, 1] and labels ``(N,)`` (-1 = unlabelled) of a cached split."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no cached dataset here (run the data stage first)")
    verify_dataset(path)
    dd = datasets.load_from_disk(str(path))
    if split not in dd:
        raise DataError(f"{path}: no split {split!r} (have {list(dd)})")
    ds = dd[split].with_format("numpy")
    arr = np.stack([np.asarray(im) for im in dd[split]["image"]]).astype(np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    else:
        arr = arr.transpose(0, 3, 1, 2)
    x = torch.from_numpy(arr / 127.5 - 1.0)
    y = torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)
    return x, y
