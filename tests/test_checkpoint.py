import torch

import pytest

from diffprune.io import ArtifactError
from diffprune.models.checkpoint import load_model, save_model


def test_round_trip_reproduces_outputs_exactly(tmp_path, tiny_unet, tiny_scheduler):
    save_model(tiny_unet, tmp_path / "ck", scheduler_config=dict(tiny_scheduler.config))
    fresh = load_model(tmp_path / "ck")
    assert fresh is not tiny_unet
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(tiny_unet(x, t).sample, fresh(x, t).sample)
    assert not list(tmp_path.glob(".*tmp*")), "temporary folders must not be left behind"


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path, tiny_unet):
    save_model(tiny_unet, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_model(tmp_path / "ck")


def test_flipped_byte_is_refused(tmp_path, tiny_unet):
    save_model(tiny_unet, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash mismatch"):
        load_model(tmp_path / "ck")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="not a diffprune checkpoint"):
        load_model(tmp_path / "nothing")


def test_failed_save_leaves_previous_checkpoint(tmp_path, tiny_unet, monkeypatch):
    save_model(tiny_unet, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import diffprune.models.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_model(tiny_unet, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_the_same_model_writes_the_same_bytes(tmp_path, tiny_unet, tiny_scheduler):
    """Byte-deterministic checkpoints: a set in the scheduler config and dict order do not leak into
    the files (DVC and the registry's content hash read them)."""
    cfg = dict(tiny_scheduler.config)
    a = {**cfg, "_class_name": "DDPMScheduler", "extra_set": {"b", "a", "c", "d", "e", "f"}}
    b = dict(reversed(list({**cfg, "_class_name": "DDPMScheduler", "extra_set": {"f", "e", "d", "c", "b", "a"}}.items())))
    save_model(tiny_unet, tmp_path / "one", scheduler_config=a, meta={"x": 1, "y": 2})
    save_model(tiny_unet, tmp_path / "two", scheduler_config=b, meta={"y": 2, "x": 1})
    for name in ("model.safetensors", "config.json", "scheduler.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
