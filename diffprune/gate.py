"""The promotion gate: does a newly registered version take its registered model's champion alias?

:func:`decide` is the policy (``params.yaml`` ``promotion:``), a pure function of two versions'
metrics. :func:`gate_version` applies it to a registered version: it reads the version's run metrics
and tags and those of the alias holder (through :mod:`diffprune.registry`), moves the alias only when
the candidate wins (:func:`diffprune.serving.promote`, which verifies the version first), and records
the decision as tags on the candidate version (:data:`TAG_DECISION`, :data:`TAG_REASONS`,
:data:`TAG_CHAMPION`, :data:`TAG_POLICY`).

The policy, in order:

1. a candidate passes when it is not degenerate (tag ``diffprune.degenerate``), its FID is at most
   ``max_fid_ratio`` x the teacher's in the same evaluation, and its paired PSNR against the teacher's
   samples is at least ``min_psnr`` dB; one that fails is ``rejected``;
2. a passing candidate is ``promoted`` when there is no champion, or the champion fails the policy
   (a tightened one), or it has fewer trajectory MACs, or equal MACs and a lower FID;
3. otherwise (more MACs, a higher FID at equal MACs, an exact tie) the champion is ``kept``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TypedDict

from .config import PromotionConfig, to_dict

TAG_DECISION = "diffprune.gate.decision"   # promoted | kept | rejected
TAG_REASONS = "diffprune.gate.reasons"     # the reasons, "; "-joined
TAG_CHAMPION = "diffprune.gate.champion"   # the version compared against ("" when there was none)
TAG_POLICY = "diffprune.gate.policy"       # the policy applied, JSON
OUTCOMES = ("promoted", "kept", "rejected")
MAX_TAG = 5000                             # characters of a model-version tag value MLflow accepts
_METRICS = ("fid", "fid_ratio_vs_teacher", "psnr_vs_teacher", "trajectory_macs")


class Standing(TypedDict, total=False):
    """What the gate knows of one version: its evaluation's metrics (names as in ``metrics.json``)."""

    version: int
    fid: float
    fid_ratio_vs_teacher: float  # fid / the teacher's fid, same evaluation protocol
    psnr_vs_teacher: float       # dB, paired against the teacher's samples from the same noises
    trajectory_macs: float       # MACs of one full sampling trajectory
    degenerate: str              # the evaluation's reason; absent (or empty) when not degenerate


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on a candidate: ``outcome`` (one of :data:`OUTCOMES`) and why."""

    outcome: str
    reasons: tuple[str, ...]

    @property
    def promote(self) -> bool:
        """Whether the alias moves to the candidate."""
        return self.outcome == "promoted"


def _number(s: Mapping[str, Any], key: str) -> Optional[float]:
    """``s[key]`` as a float; None when absent, not a number or NaN (inf stays: the teacher's PSNR)."""
    value = s.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def policy_failures(s: Mapping[str, Any], policy: PromotionConfig) -> list[str]:
    """Why version ``s`` is out of ``policy`` (empty: it passes): degenerate, a metric missing, FID
    above ``max_fid_ratio`` x the teacher's, PSNR below ``min_psnr``."""
    why = []
    if s.get("degenerate"):
        why.append(f"marked degenerate by its evaluation ({s['degenerate']})")
    missing = [k for k in _METRICS if _number(s, k) is None]
    if missing:
        why.append(f"no {', '.join(missing)} metric (a number each is needed)")
    ratio, psnr = _number(s, "fid_ratio_vs_teacher"), _number(s, "psnr_vs_teacher")
    if ratio is not None and ratio > policy.max_fid_ratio:
        why.append(f"FID {ratio:.3f}x the teacher's > max_fid_ratio {policy.max_fid_ratio}")
    if psnr is not None and psnr < policy.min_psnr:
        why.append(f"PSNR vs teacher {psnr:.2f} dB < min_psnr {policy.min_psnr} dB")
    return why


def decide(candidate: Mapping[str, Any], champion: Optional[Mapping[str, Any]],
           policy: PromotionConfig) -> Decision:
    """The gate's decision on ``candidate`` against the current ``champion`` (None: no alias holder)."""
    failures = policy_failures(candidate, policy)
    if failures:
        return Decision("rejected", tuple(failures))
    passed = (f"passes the policy (FID {candidate['fid_ratio_vs_teacher']:.3f}x the teacher's <= "
              f"{policy.max_fid_ratio}, PSNR {candidate['psnr_vs_teacher']:.2f} dB >= {policy.min_psnr})")
    if champion is None:
        return Decision("promoted", (passed, "no champion yet"))
    label = f"champion v{champion.get('version', '?')}"
    if champion.get("version") is not None and champion.get("version") == candidate.get("version"):
        return Decision("kept", (passed, f"already the {policy.alias}"))
    held = policy_failures(champion, policy)
    if held:
        return Decision("promoted", (passed, f"{label} fails the policy: {'; '.join(held)}"))
    return _compare(candidate, champion, label, passed)


def _compare(candidate: Mapping[str, Any], champion: Mapping[str, Any], label: str, passed: str) -> Decision:
    """Two versions within the policy: fewer trajectory MACs wins, then a lower FID; a tie keeps ``champion``."""
    macs, cmacs = float(candidate["trajectory_macs"]), float(champion["trajectory_macs"])
    fid, cfid = float(candidate["fid"]), float(champion["fid"])
    if macs != cmacs:
        wins = macs < cmacs
        return Decision("promoted" if wins else "kept", (passed, f"{'fewer' if wins else 'more'} trajectory MACs "
                                                                 f"than {label}: {macs:.6g} vs {cmacs:.6g}"))
    if fid != cfid:
        wins = fid < cfid
        return Decision("promoted" if wins else "kept", (passed, f"equal trajectory MACs ({macs:.6g}) and a "
                                                                 f"{'lower' if wins else 'higher'} FID than "
                                                                 f"{label}: {fid:.6g} vs {cfid:.6g}"))
    return Decision("kept", (passed, f"a tie with {label} (trajectory MACs {macs:.6g}, FID {fid:.6g}): "
                                     "the champion stays"))


# ----------------------------------------------------------------------------- the registry side

def standing(mv: Any) -> Standing:
    """The :class:`Standing` of a registered version: its run's metrics and its degenerate tag."""
    from . import registry
    from .serving import DEGENERATE_TAG

    tags = mv.tags or {}
    metrics = registry.run_metrics(mv)
    if tags.get("target") == "teacher":  # the reference itself: 1x its own FID, its own samples exactly
        metrics = {"fid_ratio_vs_teacher": 1.0, "psnr_vs_teacher": math.inf} | metrics
    out: dict[str, Any] = {k: metrics[k] for k in _METRICS if k in metrics} | {"version": int(mv.version)}
    if tags.get(DEGENERATE_TAG):
        out["degenerate"] = tags[DEGENERATE_TAG]
    return out  # type: ignore[return-value]


def gate_version(name: str, version: int | str, policy: PromotionConfig, dry_run: bool = False) -> dict[str, Any]:
    """Apply the gate to version ``version`` of ``name``: move ``policy.alias`` to it only when it wins,
    and (unless ``dry_run``) tag it with the decision. A winner that fails verification is rejected.

    Returns ``{name, version, alias, decision, reasons, champion (the version compared against, or None),
    dry_run}``.
    """
    from . import registry, serving

    mv = registry.get_version(name, version)
    holder = registry.alias_holder(name, policy.alias)
    decision = decide(standing(mv), standing(holder) if holder is not None else None, policy)
    if decision.promote and not dry_run:
        try:
            serving.promote(name, mv.version, policy.alias)
        except registry.RegistryError as e:
            decision = Decision("rejected", (f"verification failed: {e}",))
    if not dry_run:
        registry.set_version_tags(name, mv.version, {
            TAG_DECISION: decision.outcome, TAG_REASONS: "; ".join(decision.reasons)[:MAX_TAG],
            TAG_CHAMPION: holder.version if holder is not None else "",
            TAG_POLICY: json.dumps(to_dict(policy), sort_keys=True)})
    return {"name": name, "version": int(mv.version), "alias": policy.alias, "decision": decision.outcome,
            "reasons": list(decision.reasons), "champion": int(holder.version) if holder is not None else None,
            "dry_run": dry_run}


def decisions_markdown(decisions: list[Mapping[str, Any]]) -> str:
    """The gate's decisions as a markdown table (the flow's Prefect artifact)."""
    lines = ["| model | version | decision | compared with | reasons |", "|---|---|---|---|---|"]
    for d in decisions:
        champion = f"v{d['champion']}" if d.get("champion") is not None else "(no champion)"
        reasons = "; ".join(d["reasons"]).replace("|", "\\|")
        lines.append(f"| {d['name']} | {d['version']} | **{d['decision']}** | {champion} | {reasons} |")
    alias = decisions[0]["alias"] if decisions else "champion"
    return f"## Promotion gate (alias `{alias}`)\n\n" + "\n".join(lines) + "\n"
