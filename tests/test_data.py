import time

import numpy as np
import pytest
from PIL import Image

from diffprune.config import ConfigError, DataConfig
from diffprune.data import DataError, cache_dataset, load_split


def test_digits_cache_is_deterministic_with_disjoint_splits(tmp_path):
    cfg = DataConfig(max_images=200, ref_fraction=0.25)
    cache_dataset(cfg, tmp_path / "a")
    cache_dataset(cfg, tmp_path / "b")
    xa, ya = load_split(tmp_path / "a", "train")
    xb, yb = load_split(tmp_path / "b", "train")
    ref, _ = load_split(tmp_path / "a", "ref")
    assert xa.shape == (150, 1, 8, 8) and ref.shape == (50, 1, 8, 8)
    assert (xa.equal(xb)) and ya.equal(yb)
    assert xa.min() >= -1 and xa.max() <= 1
    assert set(ya.tolist()) <= set(range(10))
    # no image of the reference split is also a training image
    train_rows = {tuple(r) for r in xa.flatten(1).numpy().round(4).tolist()}
    dup = sum(tuple(r) in train_rows for r in ref.flatten(1).numpy().round(4).tolist())
    assert dup <= 2  # digits has a handful of exact duplicates in the raw data


def _folder(root, n=6, size=12, mode="L"):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((np.random.default_rng(i).random((size, size)) * 255).astype(np.uint8)).convert(mode).save(
                root / c / f"{i}.png")


def test_image_folder_with_class_subfolders(tmp_path):
    _folder(tmp_path / "imgs", mode="RGB")
    cache_dataset(DataConfig(source=str(tmp_path / "imgs"), image_size=8, ref_fraction=0.25), tmp_path / "out")
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (1, 8, 8) and set(y.tolist()) <= {0, 1}


def test_corrupt_image_is_named_and_nothing_is_written(tmp_path):
    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="bad.png"):
        cache_dataset(DataConfig(source=str(tmp_path / "imgs")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        cache_dataset(DataConfig(source=str(tmp_path / "empty")), tmp_path / "out")


def test_offline_hub_id_fails_at_once(tmp_path, monkeypatch):
    import diffprune.models.unet  # noqa: F401  (what is timed is the refusal, not importing diffusers)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ConfigError, match="not reachable"):
        cache_dataset(DataConfig(source="someone/some-dataset"), tmp_path / "out")
    assert time.time() - t0 < 5


def test_unknown_source_that_is_not_an_id(tmp_path):
    with pytest.raises(ConfigError, match="data.source"):
        cache_dataset(DataConfig(source="no/such/dir/here"), tmp_path / "out")


def test_corrupted_dataset_cache_is_refused_naming_the_file(tmp_path):
    from diffprune.io import ArtifactError

    cache_dataset(DataConfig(max_images=40, ref_fraction=0.25), tmp_path / "ds")
    arrow = next((tmp_path / "ds" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-64])
    with pytest.raises(ArtifactError, match=arrow.name):
        load_split(tmp_path / "ds", "train")


def test_the_cache_records_the_class_names_and_captions_take_them(tmp_path):
    from diffprune.data import class_names
    from diffprune.models.sd import class_captions
    from tests.rgb_folder import CLASSES, make_rgb_folder

    cache_dataset(DataConfig(source=str(make_rgb_folder(tmp_path / "shapes", per_class=3, size=8)), image_size=8,
                             channels=3, ref_fraction=0.25), tmp_path / "folder")
    assert class_names(tmp_path / "folder") == sorted(CLASSES)  # the label ids index the sorted folder names
    labels = load_split(tmp_path / "folder", "train")[1]
    assert set(labels.tolist()) <= {0, 1, 2}
    assert class_captions("a photo of a {label}", 3, class_names(tmp_path / "folder")) == [
        "a photo of a disc", "a photo of a square", "a photo of a triangle"]
    cache_dataset(DataConfig(max_images=40, ref_fraction=0.25), tmp_path / "digits")
    assert class_names(tmp_path / "digits") == [str(k) for k in range(10)]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(flat / f"{i}.png")
    cache_dataset(DataConfig(source=str(flat), image_size=8, ref_fraction=0.25), tmp_path / "unlabelled")
    assert class_names(tmp_path / "unlabelled") is None and class_captions("a {label}", 2) == ["a 0", "a 1"]
    (tmp_path / "folder" / "class_names.json").write_text('{"not": "a list"}')
    with pytest.raises(Exception, match="class_names.json"):
        class_names(tmp_path / "folder")
