"""Model families as a workspace sees them: their presets and the shape of their ``dvc.yaml``.

The project's ``dvc.yaml`` is the pipeline of the default family (``unet``: an unconditional pixel
UNet). Another family's workspace (``diffprune init DEST --preset NAME``) gets that pipeline
transformed by :func:`family_dvc`: the ``latents`` stage (the VAE and the encoded dataset) inserted
after ``data``, its outputs and the family's stage module added to the deps of every stage that
reads them, and the stages the family does not have yet (:data:`UNSUPPORTED`) left out, with every
reference to their outputs. A preset (``presets/NAME.yaml``) is a mapping of params sections laid
over the project's ``params.yaml``. Light on purpose: no torch (``diffprune init`` stays fast).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from .config import ConfigError

PRESETS_DIR = "presets"
LATENT_OUTS = ("data/latents", "models/autoencoder")
# family -> the stages of the project's dvc.yaml it has no version of (stages/dit.py raises for them),
# as NAME or NAME@ITEM of a foreach stage
_NO_EXPERTS = ("intervals", "experts", "router", "prune-experts", "stack", "evaluate@experts", "register@experts",
               "evaluate@stack", "register@stack")
_NO_STACK = ("stack", "evaluate@stack", "register@stack")
UNSUPPORTED: dict[str, tuple[str, ...]] = {"unet": (), "dit": _NO_STACK, "sd": _NO_STACK, "ldm": _NO_STACK}
# family -> its stage modules, a dep of every stage it overrides or that reads the latents
_LATENT_CODE = ["diffprune/stages/conditional.py", "diffprune/stages/latent.py", "diffprune/stages/taylor.py",
                "diffprune/stages/dipgo.py"]
FAMILY_CODE = {"dit": ["diffprune/stages/dit.py", *_LATENT_CODE],
               "sd": ["diffprune/stages/sd.py", "diffprune/stages/dit.py", *_LATENT_CODE],
               "ldm": ["diffprune/stages/ldm.py", *_LATENT_CODE]}
# family -> the module that gives the timestep-expert stages its data (a dep of those stages only)
EXPERT_CODE = {"dit": ["diffprune/stages/dit_experts.py"], "ldm": ["diffprune/stages/ldm_experts.py"],
               "sd": ["diffprune/stages/sd_experts.py"]}
# family -> the frozen parts its latents stage writes beside the VAE (stages/sd.py TEXT_ENCODER)
FROZEN_OUTS = {"dit": (), "sd": ("models/text-encoder",), "ldm": ()}
READS_LATENTS = ("teacher", "taylor", "finetune", "dipgo", "evaluate", "register")
# the timestep-expert stages: they read the latents too where a family has them (ldm); the two that
# train take the family's section (its label dropout)
EXPERT_STAGES = ("intervals", "experts", "router", "prune-experts")
TRAINS_ON_LATENTS = ("teacher", "experts", "prune-experts")


def preset_path(name: str, top: Path) -> Path:
    """``top/presets/NAME.yaml`` for a preset name (letters, digits, ``-_``), or refuses it naming it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise ConfigError(f"--preset {name!r}: a preset name is letters, digits, '-' and '_' (see {PRESETS_DIR}/)")
    path = top / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (top / PRESETS_DIR).glob("*.yaml"))
        raise ConfigError(f"--preset {name!r}: no {path} (presets: {', '.join(have) or 'none'})")
    return path


def merge_preset(params: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each section of ``preset`` laid over it key by key (a new section is added)."""
    out = copy.deepcopy(params)
    for section, values in preset.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def preset_params(top: Path, text: str, preset: str) -> str:
    """The project's params text with ``top/presets/PRESET.yaml`` laid over it (rewritten as plain YAML,
    the ``$schema`` line kept)."""
    import yaml

    from .safe_yaml import read_yaml

    path = preset_path(preset, top)
    over = read_yaml(path) or {}
    if not isinstance(over, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections")
    schema = next((line for line in text.splitlines() if "$schema=" in line), None)
    body = yaml.safe_dump(merge_preset(yaml.safe_load(text), over), sort_keys=False, width=110)
    return "\n".join(filter(None, [schema, f"# the project's params.yaml with presets/{preset}.yaml over it", body]))


def _dropped_outs(stages: dict[str, Any], names: tuple[str, ...]) -> set[str]:
    outs: set[str] = set()
    for name in names:
        base, _, item = name.partition("@")
        st = stages.get(base) or {}
        if item and "foreach" in st:
            spec = st["foreach"].get(item) or {}
            outs |= {f"models/eval/{item}", f"models/registry/{item}.json"} | {
                v for k, v in spec.items() if k == "model"}
        else:
            for kind in ("outs", "metrics", "plots"):
                outs |= {next(iter(o)) if isinstance(o, dict) else o for o in st.get(kind) or []}
    return outs


def _refers(path: str, outs: set[str]) -> bool:
    return any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs)


def latents_stage(data_stage: dict[str, Any], family: str) -> dict[str, Any]:
    """The ``latents`` stage: the ``data`` stage's code deps, the dataset, the VAE's params (and the
    frozen parts the family writes beside the VAE: sd's text encoder)."""
    return {"cmd": "diffprune stage latents",
            "deps": ["data/dataset", *data_stage.get("deps", []), *FAMILY_CODE[family]],
            "params": ["data", "autoencoder", "teacher.family", "teacher.pretrained",
                       *(["sd"] if FROZEN_OUTS[family] else [])],
            "outs": [*LATENT_OUTS, *FROZEN_OUTS[family]]}


def family_dvc(doc: dict[str, Any], family: str) -> dict[str, Any]:
    """The project's parsed ``dvc.yaml`` as ``family``'s workspace runs it (see the module doc)."""
    if family not in UNSUPPORTED:
        raise ConfigError(f"teacher.family = {family!r}: unknown (known: {', '.join(UNSUPPORTED)})")
    if family == "unet":
        return doc
    doc = copy.deepcopy(doc)
    stages, drop = doc["stages"], UNSUPPORTED[family]
    gone = _dropped_outs(stages, drop)
    out: dict[str, Any] = {}
    for name, st in stages.items():
        if name in drop:
            continue
        if "foreach" in st:
            st["foreach"] = {k: v for k, v in st["foreach"].items() if f"{name}@{k}" not in drop}
        body = st["do"] if "foreach" in st else st
        body["deps"] = [d for d in body.get("deps") or [] if not _refers(next(iter(d)) if isinstance(d, dict) else d, gone)]
        if name in READS_LATENTS or name in EXPERT_STAGES:
            body["deps"] = [*LATENT_OUTS, *FROZEN_OUTS[family], *body["deps"], *FAMILY_CODE[family],
                            *(EXPERT_CODE.get(family, []) if name in EXPERT_STAGES else [])]
            if name in TRAINS_ON_LATENTS:
                body["params"] = [*body.get("params", []), family]
            if name == "evaluate" and FROZEN_OUTS[family]:  # a text-to-image family's CLIP score
                body["params"] = [*body.get("params", []), "clip"]
        out[name] = st
        if name == "data":
            out["latents"] = latents_stage(st, family)
    doc["stages"] = out
    doc["plots"] = [pl for pl in doc.get("plots") or [] if _keep_plot(pl, gone)]
    return doc


def _keep_plot(plot: Any, gone: set[str]) -> bool:
    if isinstance(plot, str):
        return not _refers(plot, gone)
    (name, spec), = plot.items()
    ys = spec.get("y")
    if isinstance(ys, dict):
        spec["y"] = {k: v for k, v in ys.items() if not _refers(k, gone)}
    return True
