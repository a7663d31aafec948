"""Stage ``router``: the Expert Routing Agent picks every expert's sub-network under the MACs budget.

Reads the frozen elastic experts (``models/experts/elastic/``) and the intervals; writes the
agent, ``router.json`` (the selected sub-networks, their MACs, the loss history) and a plot to
``models/experts/router/``. Its training resumes from ``.work/router-*`` after an interruption.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from ..config import ConfigError, Params, resolve_device, to_dict
from ..io import ArtifactError, atomic_path, write_json
from ..models.checkpoint import load_model, load_scheduler_config, read_config
from ..pruning.experts import ElasticSpace, RouterResult, SubnetConfig, mixture_macs, steps_per_expert, train_router
from . import core, safe_subpath, stage
from .expert_data import expert_family
from .experts import ELASTIC, ROUTER, _expert_dir, _interval_ranges, _read_intervals, sampling_timesteps

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 20  # router steps between training checkpoints


@stage("router")
def run_router(p: Params, root: Path, progress: bool = True, on_progress: Any = None, **_: Any) -> dict:
    """Train the Expert Routing Agent on the frozen elastic experts; select their sub-networks."""
    device = resolve_device(p.project.device)
    doc = _read_intervals(root)
    intervals = _interval_ranges(doc)
    experts, space = _load_elastic(root, len(intervals), device)
    sched_cfg = load_scheduler_config(_expert_dir(root, ELASTIC, 0))
    ts = sampling_timesteps(sched_cfg, p)
    steps = steps_per_expert(ts, doc["boundaries"])
    images, cond = expert_family(p).load(p, root)
    r = p.router
    shas = [read_config(_expert_dir(root, ELASTIC, k))["sha256"] for k in range(len(intervals))]
    work = core.work_dir(root, "router", shas, intervals, steps, p.data, r, p.teacher.family)
    res = train_router(experts, space, intervals, steps, images, DDPMScheduler.from_config(sched_cfg),
                       budget=r.budget, train_steps=r.steps, lr=r.lr, resource_weight=r.resource_weight,
                       tau=r.temperature, hidden=r.hidden, batch_size=r.batch_size, seed=r.seed, device=device,
                       progress=progress, distill=r.distill, work_dir=work, checkpoint_every=CHECKPOINT_EVERY,
                       resource=r.resource_loss, on_progress=on_progress, conditions=cond)
    out_doc = _router_doc(res, space, r.budget, intervals, ts, steps, doc["boundaries"]) | {"params": to_dict(r)}
    out = safe_subpath(root, ROUTER)
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in res.agent.state_dict().items()},
                  str(tmp / "router.safetensors"))
        write_json(tmp / "router.json", out_doc)
        _save_router_plot(res.history, space, res.configs, tmp / "router.png")
    log.info("router: MACs ratio %.4f (budget %.4f; the agent's own %.4f), per expert %s", res.ratio, r.budget,
             res.learned_ratio, res.macs)
    return {"router": str(out), "ratio": res.ratio, "ratio_learned": res.learned_ratio, "macs_per_expert": res.macs}


def _router_doc(res: RouterResult, space: ElasticSpace, budget: float, intervals: Sequence[tuple[int, int]],
                ts: list[int], steps: list[int], boundaries: list[int]) -> dict:
    """``router.json``: the selection, its MACs and share per expert, and the training history.
    ``ratio_learned`` is the agent's own selection, ``ratio`` the one after the adjustment
    (:func:`~diffprune.pruning.experts.selection.calibrate`), ``adjustment`` their difference over
    the budget."""
    traj = mixture_macs(res.macs, steps)
    return {
        "budget": budget,
        "ratio": res.ratio,
        "ratio_learned": res.learned_ratio,
        "adjustment": (res.ratio - res.learned_ratio) / budget,
        "offset": res.offset,
        "intervals": [list(iv) for iv in intervals],
        "boundaries": boundaries,
        "sampling_timesteps": ts,
        "steps_per_expert": steps,
        "configs": [c.to_json() for c in res.configs],
        "learned_configs": [c.to_json() for c in res.learned],
        "macs_per_expert": res.macs,
        "macs_teacher": space.full_macs(),
        "macs_share": [m * n / traj if traj else 0.0 for m, n in zip(res.macs, steps)],
        "unit_names": [u.name for u in space.units],
        "stream_names": [s.name for s in space.streams],
        "history": res.history,
    }


def _load_elastic(root: Path, k_count: int, device: torch.device) -> tuple[list[torch.nn.Module], ElasticSpace]:
    experts, space = [], None
    for k in range(k_count):
        path = _expert_dir(root, ELASTIC, k)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path}: missing (run the experts stage for every expert first)")
        s = ElasticSpace.from_json(read_config(path)["meta"]["space"])
        if space is not None and s != space:
            raise ArtifactError(f"{path}: its elastic space differs from expert 0's")
        space = s
        experts.append(load_model(path, device))
    assert space is not None
    return experts, space


def _save_router_plot(history: list[dict], space: ElasticSpace, configs: Sequence[SubnetConfig], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    ax1.plot([h["denoise"] for h in history], label="denoising loss (sum)")
    ax1.plot([h["ratio"] for h in history], label="MACs / teacher")
    ax1.set_xlabel("router step")
    ax1.legend(fontsize=7)
    keep = [[(w / u.units if d else 0.0) for u, w, d in zip(space.units, c.width, c.depth)]
            + [k / seg.size for seg, k in zip(space.streams, space.stream_of(c))] for c in configs]
    names = [u.name for u in space.units] + [f"stream {seg.name}" for seg in space.streams]
    im = ax2.imshow(keep, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax2.set_yticks(range(len(configs)), [f"expert {k}" for k in range(len(configs))])
    ax2.set_xticks(range(len(names)), [n.replace("_blocks", "").replace("attentions", "attn")
                                       .replace("resnets", "res").replace("samplers", "s") for n in names],
                   rotation=60, ha="right", fontsize=6)
    ax2.set_title("kept width per sub-block (0 = dropped) and stream segment", fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.03)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
