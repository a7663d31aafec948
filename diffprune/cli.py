"""The ``diffprune`` command line: stages (what DVC runs), the Prefect pipeline, the registry."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import click
import typer

from .env import quiet_defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress pretrained diffusion models.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to use")]
RootOpt = Annotated[Path, typer.Option("--root", "-r", help="project folder holding data/ and models/")]


MAX_IMAGES = 1024  # `sample -n`: one PNG grid of at most 32 x 32 images
MAX_STEPS = 1000   # `sample --steps`: the training timesteps of the DDPM schedulers diffprune builds
_state = {"debug": False}


def _fail(message: str | BaseException, code: int = 2) -> None:
    """Print ``error: MESSAGE`` (its first line) on stderr and exit with ``code``."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__
    typer.secho(f"error: {text}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# errors raised by the input, by module: an exception of a class whose module was never imported
# cannot have been raised, so they are looked up in sys.modules instead of importing mlflow, datasets
# and PIL just to catch them (that alone took ~9 s per command)
_USER_ERRORS = (("diffprune.config", "ConfigError"), ("diffprune.io", "ArtifactError"),
                ("diffprune.data", "DataError"), ("diffprune.registry", "RegistryError"),
                ("diffprune.versioning", "VersioningError"), ("PIL.Image", "DecompressionBombError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (config, data, artifacts, registry, files): one line, exit 2."""
    found = [getattr(sys.modules[mod], name) for mod, name in _USER_ERRORS if mod in sys.modules]
    return (OSError, *found)


def _file_in_traceback(e: BaseException) -> str | None:
    """The innermost ``filename`` / ``fp`` path a frame of ``e``'s traceback was reading (PIL's open)."""
    found, tb = None, e.__traceback__
    while tb is not None:
        for key in ("filename", "fp"):
            value = tb.tb_frame.f_locals.get(key)
            if isinstance(value, (str, Path)) and str(value):
                found = str(value)
                break
        tb = tb.tb_next
    return found


def _describe(e: BaseException) -> str:
    """One line naming what is wrong and where."""
    from PIL.Image import DecompressionBombError

    if isinstance(e, DecompressionBombError):
        return f"{_file_in_traceback(e) or 'an image'}: refused, too many pixels ({e})"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Map exceptions to one line on stderr (exit 2 for bad input, 1 otherwise); ``--debug`` re-raises."""
    try:
        yield
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except Exception as e:
        if _state["debug"]:
            raise
        if isinstance(e, _user_errors()):
            _fail(_describe(e))
        _fail(f"{type(e).__name__}: {_describe(e)} (an internal error: rerun with --debug for the traceback)", code=1)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
         debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error")] = False) -> None:
    quiet_defaults()
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _run_stage_once(name: str, root: Path, run: Callable[[], dict]) -> dict:
    """Run a stage under its lock (the flow's); when a concurrent ``diffprune stage`` of the same
    stage produced its outputs while this one waited, reuse them instead of computing them again.

    Under ``accelerate launch --num_processes N`` (training stages only) the main process holds the
    lock for the group and never skips (the others train beside it); the others take no lock."""
    from .config import ConfigError
    from .distributed import MULTI_PROCESS_STAGES, world
    from .flows.specs import stage_specs
    from .locks import exclusive_stage

    rank, size = world()
    if size > 1 and name not in MULTI_PROCESS_STAGES:
        raise ConfigError(f"stage {name!r} runs in one process: launch it without --num_processes {size} "
                          f"(several processes train only: {', '.join(MULTI_PROCESS_STAGES)})")
    if rank:
        return run()
    try:
        outs = stage_specs(root).get(name, {}).get("outs", []) if size == 1 else []
    except ConfigError:  # no dvc.yaml: nothing to compare against
        outs = []
    with exclusive_stage(root, name, outs) as produced_meanwhile:
        if produced_meanwhile:
            return {"skipped": name, "reason": "a concurrent run of this stage produced its outputs"}
        return run()


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help="stage name, e.g. data, teacher, evaluate")],
    target: Annotated[Optional[str], typer.Option(help="model a per-model stage works on (evaluate, register)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Run ONE pipeline stage (this is each DVC stage's cmd), under the stage's lock."""
    from .config import load_params
    from .stages import get_stage

    with _errors():
        p = load_params(params)
        fn = get_stage(name)
        kwargs = {"target": target} if target else {}
        rootp = root.resolve()
        out = _run_stage_once(f"{name}@{target}" if target else name, rootp, lambda: fn(p, rootp, **kwargs))
    typer.echo(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str))


@app.command("run")
def run_cmd(
    params: Annotated[Optional[Path],
                      typer.Option("--params", "-p", help="params.yaml [default: ROOT/params.yaml]")] = None,
    root: RootOpt = Path("."),
    only: Annotated[Optional[str], typer.Option(help="comma-separated stage names to run (with what they need)")] = None,
    push: Annotated[bool, typer.Option(help="dvc commit + push the outputs when done")] = True,
) -> None:
    """Run the Prefect flow `prune-pipeline` (ephemeral server unless PREFECT_API_URL is set)."""
    from .config import load_params

    params = params or root / "params.yaml"
    with _errors():
        cfg = load_params(params)  # fail fast, before any server starts
        from .flows.pipeline import check_params_file, check_workspace_free, prune_pipeline

        check_workspace_free(root.resolve(), cfg)
        check_params_file(root.resolve(), params)

        result = prune_pipeline(params_path=str(params.resolve()), root=str(root.resolve()),
                                only=only.split(",") if only else None, push=push)
    typer.echo(result["table"])
    typer.echo(f"\nran: {', '.join(result['ran']) or '-'}\nskipped (unchanged): {', '.join(result['skipped']) or '-'}")
    if result.get("commit"):
        what = f"DVC experiment {result['experiment']}" if result.get("experiment") else "commit"
        typer.echo(f"recorded as {what} {result['commit'][:12]}; tagged: {', '.join(result['tags']) or '-'}")
    if result.get("report"):  # the Pareto report (stage `report`): this run's table, then the plot's path
        typer.echo(f"\nPareto fronts (FID vs trajectory MACs / latency):\n{result['report']['table']}")
        typer.echo(f"Pareto plot: {result['report']['png']}  (with the benchmark baselines: "
                   f"{Path(result['report']['png']).with_suffix('.md')}; `dvc plots show` renders it)")


@app.command("init")
def init_cmd(
    dest: Annotated[Path, typer.Argument(help="the new workspace folder (must not exist, or be empty)")],
    data: Annotated[Path, typer.Option("--data", help="your folder of images (sub-folders = classes)")],
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="a model family's preset, presets/NAME.yaml (dit-digits: a class-conditional DiT)")] = None,
) -> None:
    """Create a self-contained workspace (git + DVC, params.yaml, dvc.yaml) for your image folder."""
    from .workspace import init_workspace

    with _errors():
        summary = init_workspace(dest, data, preset)
    typer.echo(summary)


@app.command("code-hash")
def code_hash_cmd(root: RootOpt = Path(".")) -> None:
    """Rewrite a workspace's .diffprune/code/STAGE.json from the installed package (its `code` stage)."""
    from .workspace import refresh_code_hashes

    with _errors():
        changed = refresh_code_hashes(root.resolve())
    typer.echo(f"code hashes changed: {', '.join(changed) or '-'}")


@app.command("report")
def report_cmd(root: RootOpt = Path(".")) -> None:
    """Print the metrics table of every evaluated model."""
    from .report import metrics_table

    with _errors():
        table = metrics_table(root.resolve())
    typer.echo(table)


@app.command("doctor")
def doctor_cmd(
    root: RootOpt = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
) -> None:
    """What this machine has and lacks for a run (GPU, FID/CLIP weights, Prefect, MLflow, DVC, disk),
    with the fix for each; exit 1 when a required item fails."""
    from .doctor import as_json as to_json
    from .doctor import exit_code, render, run_checks

    if not root.is_dir():
        _fail(f"--root {root}: no such folder")
    checks = run_checks(root, debug=_state["debug"])
    typer.echo(json.dumps(to_json(checks), indent=2) if as_json else render(checks))
    raise typer.Exit(exit_code(checks))


def _runs_table(rows: list[dict]) -> str:
    """Markdown table of :func:`tracking.recent_runs` rows."""
    def num(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = ["| started (UTC) | run id | model | status | duration | FID | MACs vs teacher |", "|---" * 7 + "|"]
    for r in rows:
        duration = "-" if r["duration_s"] is None else f"{r['duration_s']:.1f} s"
        lines.append(f"| {r['start'] or '-'} | {r['run_id']} | {r['model']} | {r['status']} | {duration} | "
                     f"{num(r['fid'])} | {num(r['macs_ratio'])} |")
    return "\n".join(lines)


@app.command("runs")
def runs_cmd(
    root: RootOpt = Path("."),
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="how many runs, newest first")] = 20,
    experiment: Annotated[Optional[str],
                          typer.Option(help="MLflow experiment [default: params' register.experiment]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the runs as JSON")] = False,
) -> None:
    """The recent pipeline runs logged to MLflow (one per registered model): status, duration, FID, MACs."""
    from .config import load_params

    with _errors():
        params = root / "params.yaml"
        name = experiment or load_params(params if params.exists() else None).register.experiment
        from . import tracking

        rows = tracking.recent_runs(name, root=root.resolve(), limit=limit)
        where = tracking.resolve_uri(root.resolve())
    if as_json:
        typer.echo(json.dumps({"experiment": name, "tracking_uri": where, "runs": rows}, indent=2))
    elif not rows:
        typer.echo(f"no runs in MLflow experiment {name!r} of {where}")
    else:
        typer.echo(_runs_table(rows))


@app.command("slots")
def slots_cmd(
    root: RootOpt = Path("."),
    size: Annotated[Optional[int], typer.Option(min=1, max=1024,
                                                help="slots [default: params' orchestration.gpu_slots]")] = None,
    wait: Annotated[float, typer.Option(min=0, max=600, help="seconds to wait for the Prefect API to answer")] = 0,
) -> None:
    """Create the Prefect global concurrency limit `gpu` (or set its size) on the configured API; every
    stage that trains or samples on a CUDA device holds one slot of it while it runs."""
    from . import slots

    with _errors():
        n = size or slots.configured_slots(root / "params.yaml")
        if wait:
            slots.wait_for_api(wait)
        typer.echo(slots.ensure_gpu_limit(n))


@app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(help="model version")],
    alias: Annotated[str, typer.Option(help="alias to move to this version")] = "champion",
    root: RootOpt = Path("."),
) -> None:
    """Point a registry alias (e.g. champion) at a model version, once it verifies as a diffprune model."""
    from . import registry, serving, tracking

    with _errors():
        registry.check_name(name)
        registry.check_alias(alias)
        tracking.configure(root=root.resolve())
        serving.promote(name, version, alias)
    typer.echo(f"models:/{name}@{alias} -> version {version}")


@app.command("gate")
def gate_cmd(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(help="the candidate version")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="decide only: move no alias, write no tags")] = False,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Apply the promotion gate (params.yaml `promotion:`) to a version: its alias moves only if it wins."""
    from . import gate, registry, tracking
    from .config import load_params

    with _errors():
        registry.check_name(name)
        policy = load_params(params).promotion
        tracking.configure(root=root.resolve())
        d = gate.gate_version(name, version, policy, dry_run=dry_run)
    against = f"v{d['champion']}" if d["champion"] is not None else "no champion"
    typer.echo(f"models:/{name}/{d['version']}: {d['decision']} (@{d['alias']}: {against})"
               f"{' [dry run]' if dry_run else ''}")
    for reason in d["reasons"]:
        typer.echo(f"  - {reason}")


def _check_bounds(n: int, steps: int) -> None:
    """Refuse a sampling request past :data:`MAX_IMAGES` / :data:`MAX_STEPS` before loading anything."""
    if not 1 <= n <= MAX_IMAGES:
        _fail(f"-n = {n}: expected 1 <= n <= {MAX_IMAGES} images")
    if not 1 <= steps <= MAX_STEPS:
        _fail(f"--steps = {steps}: expected 1 <= steps <= {MAX_STEPS}")


def _sample_local(model: str, n: int, seed: int, steps: int):
    """``(N, H, W, C)`` uint8 images from a local checkpoint folder (DDIM)."""
    import torch

    from .models.unet import sampling_scheduler
    from .sampling import sample
    from .targets import load_target

    loaded = load_target("unet", {"model": model})
    x = sample(loaded.denoiser, sampling_scheduler(loaded.scheduler_config, "ddim"), num_images=n,
               sample_shape=loaded.sample_shape, steps=steps, seed=seed)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@app.command("sample")
def sample_cmd(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder")],
    n: Annotated[int, typer.Option("-n", help=f"number of images, 1..{MAX_IMAGES}")] = 16,
    out: Annotated[Path, typer.Option("-o", "--out", help="output PNG grid")] = Path("grid.png"),
    seed: Annotated[int, typer.Option(min=0)] = 0,
    steps: Annotated[int, typer.Option(help=f"sampling steps, 1..{MAX_STEPS}")] = 50,
    root: RootOpt = Path("."),
) -> None:
    """Sample a registered (verified) or local model in this process and save a PNG grid."""
    import numpy as np
    import torch

    from .metrics.evaluate import save_grid

    _check_bounds(n, steps)
    with _errors():
        if model.startswith("models:/"):
            from . import serving, tracking

            tracking.configure(root=root.resolve())
            images = serving.generate(model, num_images=n, seed=seed, steps=steps)  # (N, H, W, C) uint8
        else:
            images = _sample_local(model, n, seed, steps)
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(x, out)
    typer.echo(f"wrote {out} ({n} images)")


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    port: Annotated[int, typer.Option(min=1024, max=65535, help="port on 127.0.0.1")] = 5001,
    root: RootOpt = Path("."),
) -> None:
    """Serve a verified registered model with `mlflow models serve` on 127.0.0.1 (pickle loading off)."""
    from . import serving, tracking

    with _errors():
        tracking.configure(root=root.resolve())
        argv, env = serving.serve_command(model, root.resolve() / ".work" / "served", port)
    typer.echo(f"serving {model} on http://127.0.0.1:{port}", err=True)
    raise typer.Exit(subprocess.run(argv, env=env).returncode)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
