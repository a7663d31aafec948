"""GPU slots: the Prefect global concurrency limit ``gpu`` that keeps concurrent stages from
oversubscribing a device.

Every stage that trains or samples with torch on ``project.device`` (:data:`DEVICE_STAGES`) holds one
slot of the limit while it runs, when that device is CUDA (``cuda``, ``cuda:N``); on ``cpu`` and
``mps`` it takes none and asks no server. The limit is shared by every run on the same Prefect API:
with ``orchestration.gpu_slots: 1`` the CUDA stages of all of them take turns, with N at most N run
at once. ``diffprune slots`` creates it (or sets its size); a CUDA stage refuses to start without it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

from .config import ConfigError

GPU_LIMIT = "gpu"

# The stages that train or sample with torch on project.device, named here and nowhere else
# (tests/test_slots.py checks every registered stage is in exactly one of the two sets).
DEVICE_STAGES = frozenset({"latents", "teacher", "taylor", "finetune", "dipgo", "intervals", "experts", "router",
                           "prune-experts", "stack", "evaluate"})
# The rest: data (caches files), features (trains the small FID feature net on the CPU whatever the
# device), register (logs files to MLflow), report (plots): no slot, whatever the device.
HOST_STAGES = frozenset({"data", "features", "register", "report"})

LEASE_S = 300.0  # the slot's lease, renewed in the background while the stage runs


def stage_uses_device(stage: str) -> bool:
    """Whether stage ``stage`` (``evaluate@teacher`` = stage ``evaluate``) trains or samples on the device."""
    return stage.partition("@")[0] in DEVICE_STAGES


def is_cuda(device: str) -> bool:
    """Whether ``device`` (a ``project.device`` string) names a CUDA device; torch is not asked."""
    return device == "cuda" or device.startswith("cuda:")


def needs_slot(stage: str, device: str) -> bool:
    """Whether stage ``stage`` run on ``device`` holds a slot of the ``gpu`` limit."""
    return is_cuda(device) and stage_uses_device(stage)


def api_url() -> str:
    """The Prefect API the slots live on, for messages."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "the ephemeral Prefect API (PREFECT_API_URL unset)"


def _holder():
    """The task run taking the slot (shown by the Prefect UI beside the limit); None outside a task."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ConcurrencyLeaseHolder(type="task_run", id=ctx.task_run.id) if ctx else None


@contextlib.contextmanager
def gpu_slot(stage: str, device: str, timeout_seconds: float | None = None) -> Iterator[bool]:
    """Hold one slot of the ``gpu`` limit while the block runs when stage ``stage`` works on CUDA
    ``device`` (yields True), waiting for a free one (at most ``timeout_seconds``, then TimeoutError);
    otherwise take nothing and ask no server (yields False).

    A limit missing from the Prefect API is a :class:`ConfigError` (never retried) naming
    ``diffprune slots``. A failed lease renewal does not stop a running stage (hours of training
    are not given up for a moment without the server).
    """
    if not needs_slot(stage, device):
        yield False
        return
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(concurrency(GPU_LIMIT, occupy=1, timeout_seconds=timeout_seconds, strict=True,
                                            lease_duration=LEASE_S, holder=_holder(),
                                            raise_on_lease_renewal_failure=False))
        except ConcurrencySlotAcquisitionError as e:
            if "must be created" not in str(e):
                raise
            raise ConfigError(f"stage {stage} on project.device = {device!r} needs the Prefect global concurrency "
                              f"limit {GPU_LIMIT!r}, which {api_url()} lacks: run `diffprune slots` "
                              f"to create it") from None
        yield True


def configured_slots(params_path: str | Path) -> int:
    """``orchestration.gpu_slots`` of ``params_path`` (the default when there is no such file), checking
    that section only: the host of the Prefect server need not have the device the stages run on."""
    from .config import OrchestrationConfig
    from .safe_yaml import read_yaml

    raw = read_yaml(params_path) if Path(params_path).is_file() else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_path}: expected a mapping of sections, got {type(raw).__name__}")
    section = raw.get("orchestration") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"orchestration = {section!r:.200}: expected a mapping")
    return OrchestrationConfig(**section).gpu_slots


def wait_for_api(timeout: float) -> None:
    """Return once the Prefect API answers its health check; ConnectionError after ``timeout`` seconds."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while (err := client.api_healthcheck()) is not None:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"Prefect API {api_url()}: no answer within {timeout:g} s ({err})")
            time.sleep(0.5)


def ensure_gpu_limit(size: int) -> str:
    """Create the ``gpu`` limit with ``size`` slots on the configured Prefect API, or give an existing
    one that size (and make it active); idempotent. Returns what it did, in one line."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    what = f"Prefect global concurrency limit {GPU_LIMIT!r} on {api_url()}"
    try:
        with get_client(sync_client=True) as client:
            try:
                old = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=size))
                    return f"created {what}: {size} slot(s)"
                except ObjectAlreadyExists:  # created meanwhile by another `diffprune slots`
                    old = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            if old.limit == size and old.active:
                return f"{what} already has {size} slot(s): unchanged"
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=size, active=True))
            was = f"{old.limit} slot(s)" + ("" if old.active else ", inactive")
            return f"updated {what}: {was} -> {size} slot(s)"
    except httpx.HTTPError as e:
        raise ConnectionError(f"Prefect API {api_url()}: {type(e).__name__}: {e}") from e
