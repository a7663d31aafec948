"""The resumable state of one optimisation run: safetensors + JSON checkpoints, no pickle.

:class:`TrainState` is what every run of the house resumes through (the teacher, fine-tunes, experts,
the router, the DiP-GO pruner); :mod:`diffprune.training` re-exports it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .io import ArtifactError, atomic_path, read_json, sha256_file

log = logging.getLogger("diffprune.training")


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON skeleton of ``obj`` (nested dicts/lists/scalars) with its tensors moved to ``tensors``.

    Dicts keep their key types (an optimizer's state is keyed by int), so :func:`_unflatten` gives
    back exactly what ``state_dict()`` returned.
    """
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot save a {type(obj).__name__} in a training state (tensors and JSON only)")


def _unflatten(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {k: _unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__list__" in skel:
            items = [_unflatten(v, tensors) for v in skel["__list__"]]
            return tuple(items) if skel.get("tuple") else items
    return skel


class TrainState:
    """The resumable state of one optimisation run, saved atomically as safetensors + JSON (no pickle).

    It holds named *stateful* objects (anything with ``state_dict()`` / ``load_state_dict()``: models,
    optimizers, LR schedules, EMAs), named ``torch.Generator`` s, optionally the global torch RNG,
    and whatever extra tensors / JSON the caller passes at save time (a data order, a loss history).
    Every run of the house resumes through it: the teacher, fine-tunes, experts, the router and the
    DiP-GO pruner. Checkpoints live in ``root/step-NNNNNNNN/``; the ``keep`` newest are kept, so a
    corrupted newest one falls back to the one before it.

    Args:
        root: the folder of this run's checkpoints.
        objects: ``name -> stateful object``; restored in place by :meth:`restore`.
        generators: ``name -> torch.Generator``; restored in place.
        global_rng: also save / restore ``torch.get_rng_state()`` (for code that draws from it).
        keep: how many checkpoints to keep.
    """

    def __init__(self, root: str | Path, objects: dict[str, Any], generators: Optional[dict[str, torch.Generator]] = None,
                 *, global_rng: bool = False, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep = {keep!r}: must be >= 1")
        self.root, self.objects, self.generators = Path(root), objects, dict(generators or {})
        self.global_rng, self.keep = global_rng, keep

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, newest first."""
        if not self.root.exists():
            return []
        return sorted(self.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)

    def save(self, step: int, *, tensors: Optional[dict[str, torch.Tensor]] = None, meta: Optional[dict] = None) -> Path:
        """Write checkpoint ``step`` (atomically) with the extra ``tensors`` and JSON ``meta``."""
        flat: dict[str, torch.Tensor] = {}
        skeleton = {name: _flatten(obj.state_dict(), flat, f"obj.{name}") for name, obj in self.objects.items()}
        for name, g in self.generators.items():
            flat[f"rng.{name}"] = g.get_state()
        if self.global_rng:
            flat["rng.<torch>"] = torch.get_rng_state()
        flat |= {f"extra.{k}": v.detach().contiguous().cpu() for k, v in (tensors or {}).items()}
        record = {"step": step, "objects": skeleton, "meta": meta or {}}
        with atomic_path(self.root / f"step-{step:08d}", is_dir=True) as tmp:
            tmp.mkdir(parents=True)
            save_file(flat, str(tmp / "state.safetensors"))
            record["sha256"] = sha256_file(tmp / "state.safetensors")
            (tmp / "meta.json").write_text(json.dumps(record, sort_keys=True))
        for old in self.checkpoints()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return self.root / f"step-{step:08d}"

    def restore(self, device: torch.device | str | None = None) -> Optional[tuple[int, dict[str, torch.Tensor], dict]]:
        """Load the newest valid checkpoint into the registered objects and generators.

        Returns ``(step, extra tensors, meta)``, or ``None`` when there is no usable checkpoint
        (unusable ones are skipped with a warning).
        """
        for ck in self.checkpoints():
            try:
                record = read_json(ck / "meta.json")
                if sha256_file(ck / "state.safetensors") != record["sha256"]:
                    raise ArtifactError(f"{ck / 'state.safetensors'}: content hash mismatch")
                flat = load_file(str(ck / "state.safetensors"), device=str(device) if device is not None else "cpu")
            except (ArtifactError, OSError, KeyError, ValueError) as e:
                log.warning("skipping unusable training checkpoint %s: %s", ck, e)
                continue
            for name, obj in self.objects.items():
                obj.load_state_dict(_unflatten(record["objects"][name], flat))
            for name, g in self.generators.items():
                g.set_state(flat[f"rng.{name}"].cpu())
            if self.global_rng:
                torch.set_rng_state(flat["rng.<torch>"].cpu())
            extra = {k[6:]: v for k, v in flat.items() if k.startswith("extra.")}
            return int(record["step"]), extra, record["meta"]
        return None
