"""DiP-GO stage: learn a block-skip schedule for the frozen teacher; the model is teacher + schedule."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import Params, resolve_device, to_dict
from ..io import atomic_path, write_json
from ..models.checkpoint import load_model, load_scheduler_config
from ..pruning.dipgo import save_heatmap, train_pruner
from . import safe_subpath, stage
from ..models.checkpoint import read_config
from .core import TEACHER, data_shape, work_dir

SCHEDULE_DIR = "models/dipgo"

@stage("dipgo")
def run_dipgo(p: Params, root: Path, progress: bool = True, on_progress: Any = None, **_: Any) -> dict:
    """Train the pruner network on the teacher's sampling trajectory (evaluate.steps DDIM steps) and
    write models/dipgo/{schedule.json, heatmap.png, training.json}."""
    device = resolve_device(p.project.device)
    teacher_dir = safe_subpath(root, TEACHER)
    teacher = load_model(teacher_dir, device)
    t0 = time.time()
    schedule, info = train_pruner(teacher, load_scheduler_config(teacher_dir), p.dipgo, steps=p.evaluate.steps,
                                  sample_shape=data_shape(p), device=device, progress=progress,
                                  sampler=p.evaluate.sampler, on_progress=on_progress,
                                  # resumable: keyed by the config and the teacher's weights
                                  work_dir=work_dir(root, "dipgo", p.dipgo, p.evaluate.steps, p.evaluate.sampler,
                                                    read_config(teacher_dir)["sha256"]))
    return write_schedule(p, root, schedule, info, time.time() - t0)


def write_schedule(p: Params, root: Path, schedule, info: dict, seconds: float) -> dict:
    """models/dipgo/{schedule.json, heatmap.png, training.json}, atomically; the stage's result."""
    out = safe_subpath(root, SCHEDULE_DIR)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        schedule.save(tmp / "schedule.json")
        save_heatmap(schedule, tmp / "heatmap.png",
                     title=f"DiP-GO schedule: {schedule.macs_ratio:.3f} of the teacher's MACs")
        write_json(tmp / "training.json", {"seconds": seconds, "config": to_dict(p.dipgo),
                                           **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}})
    return {"schedule": str(out / "schedule.json"), "macs_ratio": schedule.macs_ratio, "seconds": seconds}
