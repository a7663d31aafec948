"""The Prefect flow ``stack-pipeline``: the stacked model and only what it is made from.

``register@stack`` and every stage upstream of it (data, features, the teacher, Diff-Pruning's
``taylor`` and ``finetune``, the ``intervals``, ``stack``, the two evaluations), run by
:func:`diffprune.flows.pipeline.prune_pipeline` with the same records: a stage DVC finds up to date
(``dvc.lock``) is skipped, so the single methods' artifacts are reused, never retrained, and each
stage that runs is committed to ``dvc.lock`` as it finishes.
"""

from __future__ import annotations

# Absolute imports: Prefect deployments load this file by path (prefect.yaml's entrypoint).

from prefect import flow

from diffprune.flows.pipeline import prune_pipeline

STACK_TARGETS = ["register@stack"]  # with everything upstream of it


@flow(name="stack-pipeline", log_prints=True)
def stack_pipeline(params_path: str = "params.yaml", root: str = ".", push: bool = True) -> dict:
    """Build, evaluate and register the stacked model (``prune_pipeline`` limited to it and its inputs)."""
    return prune_pipeline(params_path=params_path, root=root, only=list(STACK_TARGETS), push=push)
