"""The ``diffprune`` command line: stages (what DVC runs), the Prefect pipeline, the registry."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .env import quiet_defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress pretrained diffusion models.")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to use")]
RootOpt = Annotated[Path, typer.Option("--root", "-r", help="project folder holding data/ and models/")]


def _fail(e: BaseException) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .io import ArtifactError

    errs: list[type[BaseException]] = [ConfigError, DataError, ArtifactError, FileNotFoundError]
    try:
        from .versioning import VersioningError

        errs.append(VersioningError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    quiet_defaults()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help="stage name, e.g. data, teacher, evaluate")],
    target: Annotated[Optional[str], typer.Option(help="model a per-model stage works on (evaluate, register)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Run ONE pipeline stage (this is each DVC stage's cmd)."""
    from .config import load_params
    from .stages import get_stage

    try:
        p = load_params(params)
        fn = get_stage(name)
        kwargs = {"target": target} if target else {}
        out = fn(p, root.resolve(), **kwargs)
    except _user_errors() as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in out.items() if k != "metrics"}, default=str))


@app.command("run")
def run_cmd(
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
    only: Annotated[Optional[str], typer.Option(help="comma-separated stage names to run (with what they need)")] = None,
    push: Annotated[bool, typer.Option(help="dvc commit + push the outputs when done")] = True,
) -> None:
    """Run the Prefect flow `prune-pipeline` (ephemeral server unless PREFECT_API_URL is set)."""
    from .config import load_params

    try:
        load_params(params)  # fail fast, before any server starts
        from .flows.pipeline import prune_pipeline

        result = prune_pipeline(params_path=str(params.resolve()), root=str(root.resolve()),
                                only=only.split(",") if only else None, push=push)
    except _user_errors() as e:
        _fail(e)
    typer.echo(result["table"])
    typer.echo(f"\nran: {', '.join(result['ran']) or '-'}\nskipped (unchanged): {', '.join(result['skipped']) or '-'}")


@app.command("report")
def report_cmd(root: RootOpt = Path(".")) -> None:
    """Print the metrics table of every evaluated model."""
    from .report import metrics_table

    typer.echo(metrics_table(root.resolve()))


@app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[int, typer.Argument(help="model version")],
    alias: Annotated[str, typer.Option(help="alias to move to this version")] = "champion",
    root: RootOpt = Path("."),
) -> None:
    """Point a registry alias (e.g. champion) at a model version."""
    from . import tracking

    try:
        tracking.configure(root=root.resolve())
        tracking.promote(name, version, alias)
    except Exception as e:  # mlflow raises its own exception types; report one line
        _fail(e)
    typer.echo(f"models:/{name}@{alias} -> version {version}")


@app.command("sample")
def sample_cmd(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder")],
    n: Annotated[int, typer.Option("-n", min=1, help="number of images")] = 16,
    out: Annotated[Path, typer.Option("-o", "--out", help="output PNG grid")] = Path("grid.png"),
    seed: Annotated[int, typer.Option(min=0)] = 0,
    steps: Annotated[int, typer.Option(min=1)] = 50,
    root: RootOpt = Path("."),
) -> None:
    """Sample a registered (or local) model in this process and save a PNG grid."""
    import numpy as np
    import torch

    from .metrics.evaluate import save_grid

    try:
        if model.startswith("models:/"):
            from . import tracking

            tracking.configure(root=root.resolve())
            images = tracking.generate(model, num_images=n, seed=seed, steps=steps)  # (N, H, W, C) uint8
        else:
            from .models.unet import sampling_scheduler
            from .sampling import sample
            from .targets import load_target

            loaded = load_target("unet", {"model": model})
            x = sample(loaded.denoiser, sampling_scheduler(loaded.scheduler_config, "ddim"), num_images=n,
                       sample_shape=loaded.sample_shape, steps=steps, seed=seed)
            images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    except _user_errors() as e:
        _fail(e)
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(x, out)
    typer.echo(f"wrote {out} ({n} images)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
