"""Pickle-free model checkpoints: ``model.safetensors`` + ``config.json``.

``config.json`` holds the diffusers base config *and* the structure of every module whose shape
or attributes may have been changed by pruning (channel counts, heads, dropped sub-blocks). Loading
builds the base model, re-creates every module whose recorded structure differs, restores the
recorded attributes, then loads the weights strictly. So a pruned network round-trips without
pickle and produces bit-identical outputs. The file carries the SHA-256 of the weights, checked on
load: a truncated or corrupted checkpoint is refused with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
import importlib
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import ArtifactError, atomic_path, read_json, sha256_file
from .blocks import ShortcutBlock, SkippedBlock, ZeroBranch

FORMAT = "diffprune-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SCHEDULER = "scheduler.json"

# Integer attributes that pruning may make stale; recorded when present on a module.
_ATTRS = (
    "in_channels", "out_channels", "channels", "groups", "in_features", "out_features",
    "num_groups", "num_channels", "heads", "inner_dim", "inner_kv_dim", "query_dim", "out_dim",
)

# Every model class a checkpoint may name: class name -> "module:attribute" of a class with
# ``from_config(dict)``. Imported only when such a checkpoint is loaded, so loading needs no other
# import first and this module does not depend on the method packages.
MODEL_CLASSES: dict[str, str] = {
    "UNet2DModel": "diffusers:UNet2DModel",
    "DiTTransformer2DModel": "diffusers:DiTTransformer2DModel",
    "UNet2DConditionModel": "diffusers:UNet2DConditionModel",
    "ExpertMixtureModel": "diffprune.pruning.experts.prune:ExpertMixtureModel",
}

# Every module type that may stand in for a library module (a dropped sub-block); rebuilt from the
# keyword arguments its ``structure_init()`` recorded.
REPLACEMENTS: dict[str, type[nn.Module]] = {"SkippedBlock": SkippedBlock, "ShortcutBlock": ShortcutBlock,
                                             "ZeroBranch": ZeroBranch}


def model_class(name: str) -> type[nn.Module]:
    """The class a checkpoint's ``"class"`` names, imported from :data:`MODEL_CLASSES`.

    Raises:
        ArtifactError: ``name`` is not in the table.
    """
    if name not in MODEL_CLASSES:
        raise ArtifactError(f"model class {name!r} is not known (known: {sorted(MODEL_CLASSES)})")
    module, _, attr = MODEL_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        rec: dict[str, Any] = {"type": type(m).__name__}
        for a in () if isinstance(m, ConfigMixin) else _ATTRS:  # a diffusers model's attributes live in its config
            v = getattr(m, a, None)
            if isinstance(v, int) and not isinstance(v, bool):
                rec[a] = v
        if isinstance(m, nn.Conv2d):
            rec.update(kernel_size=list(m.kernel_size), stride=list(m.stride), padding=list(m.padding),
                       bias=m.bias is not None)
        if isinstance(m, nn.Linear):
            rec["bias"] = m.bias is not None
        if isinstance(m, nn.GroupNorm):
            rec.update(eps=m.eps, affine=m.affine)
        if isinstance(m, nn.LayerNorm):  # the transformer blocks of text-to-image UNets and DiTs
            rec.update(normalized_shape=list(m.normalized_shape), eps=m.eps, affine=m.elementwise_affine,
                       bias=m.bias is not None)
        if isinstance(m, nn.Embedding):  # a latent UNet's class embedding follows its pruned time embedding
            rec.update(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim)
        if hasattr(m, "structure_init"):
            rec["init"] = m.structure_init()
        out[name] = rec
    return out


def _rebuild(rec: dict[str, Any], old: nn.Module) -> nn.Module:
    t = rec["type"]
    if t == "Conv2d":
        return nn.Conv2d(rec["in_channels"], rec["out_channels"], tuple(rec["kernel_size"]), tuple(rec["stride"]),
                         tuple(rec["padding"]), groups=rec["groups"], bias=rec["bias"])
    if t == "Linear":
        return nn.Linear(rec["in_features"], rec["out_features"], bias=rec["bias"])
    if t == "GroupNorm":
        return nn.GroupNorm(rec["num_groups"], rec["num_channels"], eps=rec["eps"], affine=rec["affine"])
    if t == "LayerNorm":
        return nn.LayerNorm(tuple(rec["normalized_shape"]), eps=rec["eps"], elementwise_affine=rec["affine"],
                            bias=rec["bias"])
    if t == "Embedding":
        return nn.Embedding(rec["num_embeddings"], rec["embedding_dim"])
    if t in REPLACEMENTS:
        return REPLACEMENTS[t](**rec.get("init", {}))
    raise ArtifactError(f"checkpoint records a module of type {t!r} that cannot be rebuilt (was {type(old).__name__})")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted, list indices allowed) of ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Reshape a freshly built ``model`` to the recorded ``structure`` (in place; returns it)."""
    fresh = _structure(model)
    for name in sorted(structure, key=lambda n: n.count(".")):
        rec = structure[name]
        cur = fresh.get(name)
        if cur is None:
            continue  # lives inside a replaced parent; rebuilt with it
        try:
            mod = model.get_submodule(name) if name else model
        except AttributeError:
            continue
        # a LayerNorm or an Embedding recorded before its shape was (older checkpoints) was never
        # pruned: kept as built
        resized = rec["type"] in ("Conv2d", "Linear", "GroupNorm") or (rec["type"] == "LayerNorm"
                                                                        and "normalized_shape" in rec) or (
            rec["type"] == "Embedding" and "embedding_dim" in rec)
        if cur != rec and resized or rec["type"] != cur["type"]:
            set_module(model, name, _rebuild(rec, mod))
            continue
        for a in () if isinstance(mod, ConfigMixin) else _ATTRS:
            if a in rec and getattr(mod, a, None) != rec[a]:
                setattr(mod, a, rec[a])
    return model


def save_model(model: nn.Module, path: str | Path, *, scheduler_config: dict | None = None,
               meta: dict | None = None) -> Path:
    """Save ``model`` atomically to the folder ``path`` (replacing it).

    Raises:
        ArtifactError: :func:`load_model` could not rebuild ``model``'s class (it is not the one
            :data:`MODEL_CLASSES` names): refused now, not at load.
    """
    path = Path(path)
    if model_class(type(model).__name__) is not type(model):
        raise ArtifactError(f"model class {type(model).__name__!r} is not the one MODEL_CLASSES names "
                            f"({MODEL_CLASSES[type(model).__name__]})")
    structure = _structure(model)
    config = dict(getattr(model, "config", {}) or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp / WEIGHTS))
        doc = {
            "format": FORMAT,
            "class": type(model).__name__,
            "base_config": {k: v for k, v in config.items() if not k.startswith("_")} | {
                k: v for k, v in config.items() if k == "_class_name"},
            "structure": structure,
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "sha256": sha256_file(tmp / WEIGHTS),
            "meta": meta or {},
        }
        # sorted keys and sets: the same model writes the same bytes (DVC and the registry hash them)
        (tmp / CONFIG).write_text(json.dumps(doc, indent=1, sort_keys=True, default=_json_default))
        if scheduler_config is not None:
            (tmp / SCHEDULER).write_text(json.dumps(dict(scheduler_config), indent=1, sort_keys=True,
                                                    default=_json_default))
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG).exists():
        raise ArtifactError(f"{path}: not a diffprune checkpoint (no {CONFIG})")
    doc = read_json(path / CONFIG)
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{path / CONFIG}: unknown checkpoint format {doc.get('format')!r}")
    return doc


def verify(path: str | Path) -> dict:
    """Check the weights file against the recorded hash; return the config document."""
    path = Path(path)
    doc = read_config(path)
    weights = path / WEIGHTS
    if not weights.exists():
        raise ArtifactError(f"{weights}: file not found")
    digest = sha256_file(weights)
    if digest != doc["sha256"]:
        raise ArtifactError(f"{weights}: content hash mismatch (truncated or corrupted checkpoint)")
    return doc


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (verified, pickle-free) in eval mode."""
    path = Path(path)
    doc = verify(path)
    try:
        cls = model_class(doc["class"])
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from e
    model = cls.from_config(dict(doc["base_config"]))
    apply_structure(model, doc["structure"])
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS}: cannot read weights ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{path}: weights do not fit the recorded structure: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def load_scheduler_config(path: str | Path) -> dict:
    p = Path(path) / SCHEDULER
    return read_json(p)
