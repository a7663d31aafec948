"""The promotion gate on a scripted sequence of candidates, on a real (temporary) MLflow registry.

Seven versions of one registered model arrive in turn, each with the metrics an evaluation would
give it; after each, :func:`diffprune.gate.gate_version` decides under the policy of ``params.yaml``
``promotion:`` whether it takes the ``champion`` alias. The table shows each decision, its reasons
(as recorded in the version's tags) and who holds the alias afterwards. No training: the versions
share one tiny checkpoint and differ in their metrics and content hash.

Usage::

    python -m benchmarks.gate            # benchmarks/results/gate.{json,md} (about 20 s)
    python -m benchmarks.gate --quick    # the same, in .work/bench-quick/results
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from diffprune.config import load_params

from benchmarks import common
from benchmarks.common import REPO
from benchmarks.tables import write_results

TEACHER_FID = 2.0
# (what it is, its metrics relative to a champion at 4e8 MACs, FID 2.6, PSNR 25 dB, degenerate or not)
SEQUENCE: list[tuple[str, dict[str, Any]]] = [
    ("first candidate, no champion yet", {"fid": 2.6, "psnr_vs_teacher": 25.0, "trajectory_macs": 4e8}),
    ("much cheaper, FID 3.5x the teacher's", {"fid": 7.0, "psnr_vs_teacher": 24.0, "trajectory_macs": 1e8}),
    ("more MACs, better FID", {"fid": 2.2, "psnr_vs_teacher": 27.0, "trajectory_macs": 5e8}),
    ("an exact tie with the champion", {"fid": 2.6, "psnr_vs_teacher": 25.0, "trajectory_macs": 4e8}),
    ("fewer MACs, within the policy", {"fid": 3.0, "psnr_vs_teacher": 23.0, "trajectory_macs": 3e8}),
    ("cheaper still, PSNR below the floor", {"fid": 3.2, "psnr_vs_teacher": 18.5, "trajectory_macs": 2e8}),
    ("equal MACs, lower FID", {"fid": 2.8, "psnr_vs_teacher": 23.5, "trajectory_macs": 3e8}),
]
MODEL = "gate-sequence"


def run_sequence(root: Path) -> list[dict[str, Any]]:
    """Register the :data:`SEQUENCE` one version at a time under ``root``'s sqlite registry and gate each."""
    from diffprune import gate, registry, tracking
    from diffprune.config import DataConfig, TeacherConfig
    from diffprune.models.checkpoint import save_model
    from diffprune.models.unet import build_scheduler, build_unet

    policy = load_params(REPO / "params.yaml").promotion
    # its own sqlite registry, whatever DIFFPRUNE_TRACKING_URI names: a script never writes to a real one
    tracking.configure(f"sqlite:///{root / 'mlruns.db'}", root=root, artifact_root=root / "mlartifacts")
    teacher = TeacherConfig(block_out_channels=[8, 16, 16], attention=[False, True, False], norm_num_groups=4)
    ckpt = save_model(build_unet(teacher, DataConfig(image_size=8)), root / "ckpt",
                      scheduler_config=dict(build_scheduler(TeacherConfig()).config))
    (root / "metrics.json").write_text("{}")
    rows = []
    for i, (what, m) in enumerate(SEQUENCE):
        metrics = {**m, "fid_ratio_vs_teacher": m["fid"] / TEACHER_FID}
        version = registry.register_model(name=MODEL, model_dir=ckpt, params={}, metrics=metrics, tags={},
                                          artifacts=[root / "metrics.json"], experiment="gate-sequence",
                                          content_hash=hashlib.sha256(f"candidate-{i}".encode()).hexdigest(),
                                          steps=2)["version"]
        d = gate.gate_version(MODEL, version, policy)
        holder = registry.alias_holder(MODEL, policy.alias)
        rows.append({**d, "what": what, "metrics": metrics, "champion_after": int(holder.version) if holder else None})
    return rows


def markdown(rows: list[dict[str, Any]], policy: dict[str, Any]) -> str:
    lines = ["# The promotion gate on a scripted sequence of candidates", "",
             f"Policy (params.yaml `promotion:`): {policy}. Teacher FID {TEACHER_FID}.", "",
             "| version | candidate | FID (x teacher) | PSNR dB | MACs | decision | reasons | champion after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| v{r['version']} | {r['what']} | {m['fid']:.1f} ({m['fid_ratio_vs_teacher']:.2f}x) | "
                     f"{m['psnr_vs_teacher']:.1f} | {m['trajectory_macs']:.0e} | **{r['decision']}** | "
                     f"{'; '.join(r['reasons'])} | v{r['champion_after']} |")
    return "\n".join(lines) + "\n"


def main(quick: Annotated[bool, typer.Option(help="write to .work/bench-quick/results")] = False,
         progress: Annotated[bool, typer.Option(help="unused (no training)")] = True) -> list[Path]:
    out = (common.QUICK_ROOT if quick else REPO / "benchmarks") / "results"
    policy = load_params(REPO / "params.yaml").promotion
    with tempfile.TemporaryDirectory(prefix="diffprune-gate-") as tmp:
        rows = run_sequence(Path(tmp))
    from diffprune.config import to_dict

    doc = {"quick": quick, "policy": to_dict(policy), "teacher_fid": TEACHER_FID, "decisions": rows}
    paths = write_results(out, "gate", doc, markdown(rows, to_dict(policy)))
    print(markdown(rows, to_dict(policy)))
    return paths


if __name__ == "__main__":
    typer.run(main)
