"""``diffprune doctor``: what this machine has and lacks for a pipeline run, with the fix for each.

Every check is a small function of the project folder returning a :class:`Check`; none downloads
anything, and the whole report takes a few seconds offline (network probes time out in
:data:`TIMEOUT_S`). Statuses: ``ok``; ``warn`` (works, but worth a look); ``missing`` (an optional
thing is absent: the pipeline runs without it, as the line says); ``fail`` (a required thing is
unusable: runs would fail). Required: a usable MLflow tracking store, :data:`DISK_FLOOR_GIB` of free
disk, and the Inception weights file when ``params.yaml`` names one. A GPU is never required.

MLflow specifics come from :mod:`diffprune.tracking`, DVC ones from :mod:`diffprune.versioning`.
"""

from __future__ import annotations

import os
import platform
import shutil
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

OK, WARN, MISSING, FAIL = "ok", "warn", "missing", "fail"
TIMEOUT_S = 2.0
DISK_FLOOR_GIB = 1.0    # below it a run cannot write its checkpoints and samples: fail
DISK_WARN_GIB = 10.0    # below it a long run (benchmarks, caches) may fill the disk: warn
PACKAGES = ("torch", "diffusers", "mlflow", "prefect", "dvc", "clean-fid")
CLEANFID_DEFAULT = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid itself downloads it (cleanfid.features)
INCEPTION_FILE = "inception-2015-12-05.pt"
SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass(frozen=True)
class Check:
    name: str
    status: str      # OK, WARN, MISSING or FAIL
    found: str       # what is there
    fix: str = ""    # the command or setting that mends it ("" when nothing to do)
    required: bool = False


# ----------------------------------------------------------------------------- the checks

def check_versions(root: Path) -> Check:
    """Python and the versions of the packages a run uses (read from their metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found, missing = [f"python {platform.python_version()}"], []
    for pkg in PACKAGES:
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            missing.append(pkg)
    if missing:
        return Check("versions", MISSING, ", ".join(found) + f"; not installed: {', '.join(missing)}",
                     "make setup (pip install -e '.[test]' in .venv)")
    return Check("versions", OK, ", ".join(found))


def check_gpu(root: Path) -> Check:
    """The CUDA devices torch sees, with their memory (total and free)."""
    try:
        import torch
    except ImportError as e:
        return Check("gpu", MISSING, f"torch does not import ({e})", "make setup")
    if not torch.cuda.is_available():
        cpu_only = torch.version.cuda is None
        build = "a CPU-only build" if cpu_only else f"built for CUDA {torch.version.cuda}, no device visible"
        step = ("install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124)"
                if cpu_only else "check that nvidia-smi lists it and CUDA_VISIBLE_DEVICES does not hide it")
        return Check("gpu", MISSING, f"no CUDA GPU (torch {torch.__version__}, {build})",
                     f"none needed: every stage runs on the CPU, slower; for a GPU {step}, "
                     "then set project.device: cuda")
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free)")
    return Check("gpu", OK, "; ".join(devices))


def _params(root: Path):
    """``(params, error)``: ``root/params.yaml`` loaded (None when there is none), or the error's line."""
    from .config import ConfigError, load_params

    if not (root / "params.yaml").exists():
        return None, None
    try:
        return load_params(root / "params.yaml"), None
    except ConfigError as e:
        return None, str(e).splitlines()[0]


def check_inception(root: Path) -> Check:
    """clean-fid's Inception weights: the file ``evaluate.inception_weights`` names, else its default place."""
    params, error = _params(root)
    if error:
        return Check("inception", WARN, f"params.yaml does not load ({error}): which extractor FID uses is unknown",
                     f"correct {root / 'params.yaml'}")
    configured = params.evaluate.inception_weights if params else None
    fallback = "FID falls back to the dataset's feature net (featnet-..., named with every FID)"
    if configured:
        path = Path(configured).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_file() and path.name == INCEPTION_FILE:
            return Check("inception", OK, f"{path} (evaluate.inception_weights): FID on Inception-v3 features")
        return Check("inception", FAIL, f"evaluate.inception_weights = {configured}: no file {INCEPTION_FILE} there "
                     "(the features stage would fail)", f"copy clean-fid's {INCEPTION_FILE} to {path}, or remove "
                     "evaluate.inception_weights to use the feature net", required=True)
    if CLEANFID_DEFAULT.is_file():
        return Check("inception", WARN, f"{CLEANFID_DEFAULT} is present but not configured: {fallback}",
                     f"set evaluate.inception_weights: {CLEANFID_DEFAULT} in params.yaml")
    return Check("inception", MISSING, f"not configured, and no {CLEANFID_DEFAULT}: {fallback}",
                 f"only for Inception FIDs: copy clean-fid's {INCEPTION_FILE} (from a machine with network) here "
                 "and set evaluate.inception_weights to its path")


def hf_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (its environment variables)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def check_clip(root: Path) -> Check:
    """CLIP text-encoder weights in the HF cache (a Stable Diffusion teacher's prompt encoder)."""
    cache, found = hf_cache(), []
    for repo in sorted(cache.glob("models--*")):
        name = repo.name.removeprefix("models--").replace("--", "/")
        snapshots = [s for s in (repo / "snapshots").glob("*") if s.is_dir()]
        if any(_has_weights(s / "text_encoder") for s in snapshots) or (
                "clip" in name.lower() and any(_has_weights(s) for s in snapshots)):
            found.append(name)
    if found:
        return Check("clip", OK, f"text encoder weights in {cache}: {', '.join(found)}")
    return Check("clip", MISSING, f"no CLIP text encoder in {cache} (only a Stable Diffusion teacher needs one)",
                 f"on a machine with network: huggingface-cli download {SD_REPO} --include 'text_encoder/*' "
                 f"'tokenizer/*', then copy its hub cache to {cache}")


def reachable(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when ``GET url`` answers 2xx within ``timeout``; else why not, in a few words."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) URLs only (callers)
            return None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"unreachable ({getattr(e, 'reason', e)})"


def prefect_api_url() -> tuple[str | None, str]:
    """``(PREFECT_API_URL, where it was set)``: the environment, else the active Prefect profile."""
    import tomllib

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "$PREFECT_API_URL"
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None, ""
    active = os.environ.get("PREFECT_PROFILE") or doc.get("active", "ephemeral")
    url = doc.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return (str(url), f"profile {active!r} in {path}") if url else (None, "")


def check_prefect(root: Path) -> Check:
    """The Prefect API a run reports to: set and answering, or none (an ephemeral server per run)."""
    url, source = prefect_api_url()
    if not url:
        return Check("prefect", OK, "PREFECT_API_URL not set: each run starts an ephemeral server",
                     "for a persistent server and its UI: make ui, "
                     "then export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if not url.startswith(("http://", "https://")):
        return Check("prefect", MISSING, f"PREFECT_API_URL = {url[:200]!r} ({source}): not an http(s) URL",
                     "export PREFECT_API_URL=http://127.0.0.1:4200/api, or unset it")
    problem = reachable(url.rstrip("/") + "/health")
    if problem:
        return Check("prefect", MISSING, f"PREFECT_API_URL = {url} ({source}): {problem}; a run would fail",
                     "make ui (starts the server), or unset PREFECT_API_URL to use an ephemeral server")
    return Check("prefect", OK, f"PREFECT_API_URL = {url} ({source}) answers")


def check_tracking(root: Path) -> Check:
    """The MLflow tracking store, resolved as runs resolve it; a local one must be writable."""
    from . import tracking
    from .config import ConfigError

    fix = (f"unset {tracking.TRACKING_ENV} (each workspace keeps its own {tracking.DEFAULT_DB}), or set it to "
           "sqlite:////ABSOLUTE/PATH/mlruns.db or http://HOST:PORT")
    try:
        uri = tracking.resolve_uri(root)
    except ConfigError as e:
        return Check("mlflow", FAIL, str(e).splitlines()[0], fix, required=True)
    source = f"${tracking.TRACKING_ENV}" if os.environ.get(tracking.TRACKING_ENV) else "the project folder's own"
    if uri.startswith(("http://", "https://")):
        problem = reachable(uri.rstrip("/") + "/health")
    else:
        problem = tracking.store_problem(uri)
    if problem:
        return Check("mlflow", FAIL, f"{uri} ({source}): {problem}", fix, required=True)
    path = tracking.local_store(uri)
    note = "" if path is None or path.exists() else ": created by the first run"
    unchecked = "" if path is not None or uri.startswith("http") else ": a database server, not probed"
    return Check("mlflow", OK, f"{uri} ({source}){note}{unchecked}", required=True)


def check_dvc(root: Path) -> Check:
    """The DVC repository holding ``root`` and its default remote (where a run pushes its outputs)."""
    if not any((d / ".dvc").is_dir() for d in (root, *root.parents)):
        return Check("dvc remote", MISSING, f"{root} is not in a DVC repository: outputs are not versioned",
                     "diffprune init DIR --data IMAGES (a workspace with its own remote), then run there")
    from . import versioning

    found = versioning.default_remote_url(root)
    if found is None:
        return Check("dvc remote", MISSING, "no default DVC remote: runs record their outputs but push nowhere",
                     "dvc remote add -d --local NAME /path/to/storage")
    name, url = found
    if "://" not in url and not Path(url).is_dir():
        return Check("dvc remote", WARN, f"default remote {name!r} = {url}: no such folder (yet)",
                     f"mkdir -p {url} (or mount it); the first dvc push creates it")
    return Check("dvc remote", OK, f"default remote {name!r} = {url}")


def check_disk(root: Path) -> Check:
    """Free space on the filesystem of the project folder."""
    where = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(where).free / 2**30
    found = f"{free:.1f} GiB free on {where}"
    fix = "free space there (dvc gc -w drops unused cache entries; .work/ holds caches), or use a workspace elsewhere"
    if free < DISK_FLOOR_GIB:
        return Check("disk", FAIL, f"{found}, under the {DISK_FLOOR_GIB:g} GiB a run needs", fix, required=True)
    if free < DISK_WARN_GIB:
        return Check("disk", WARN, f"{found}, under {DISK_WARN_GIB:g} GiB", fix, required=True)
    return Check("disk", OK, found, required=True)


CHECKS: tuple[tuple[str, Callable[[Path], Check], bool], ...] = (
    ("versions", check_versions, False), ("gpu", check_gpu, False), ("inception", check_inception, False),
    ("clip", check_clip, False), ("prefect", check_prefect, False), ("mlflow", check_tracking, True),
    ("dvc remote", check_dvc, False), ("disk", check_disk, True),
)


# ----------------------------------------------------------------------------- the report

def run_checks(root: str | Path = ".", debug: bool = False) -> list[Check]:
    """Every check of :data:`CHECKS` on ``root``; a check that itself breaks is reported (raised with ``debug``)."""
    root = Path(root).resolve()
    out = []
    for name, fn, required in CHECKS:
        try:
            out.append(fn(root))
        except Exception as e:  # noqa: BLE001 - the doctor reports, it does not crash
            if debug:
                raise
            out.append(Check(name, FAIL if required else WARN, f"the check broke: {type(e).__name__}: {e}",
                             "rerun with --debug for the traceback", required))
    return out


def exit_code(checks: list[Check]) -> int:
    """1 when a required check failed, else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: list[Check]) -> str:
    """One line per check (``status  name  what was found  -> fix``), then the verdict."""
    lines = []
    for c in checks:
        fix = f"  -> {c.fix}" if c.fix and c.status != OK else ""
        lines.append(f"{c.status:<8}{c.name:<12}{c.found}{fix}")
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append(f"not ready: {', '.join(failed)} must be fixed" if failed else "ready: nothing required is missing")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict:
    return {"ready": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}
