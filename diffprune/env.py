"""Process defaults for an offline machine: telemetry off, long ephemeral-server startup.

The one place they are written: the CLI and the flow call :func:`quiet_defaults`; the Makefile runs
its commands through ``python -m diffprune.env COMMAND``, and ``make ui`` its servers through
:mod:`diffprune.servers`, which sets them too.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "diffprune",  # the stages' own log lines reach the task's log
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # ...and outside a flow stay local, silently
}


def quiet_defaults() -> None:
    """Set the defaults above where the user has not set them."""
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffprune.env COMMAND [ARGS]``: run COMMAND with the defaults above (``make ui``)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m diffprune.env COMMAND [ARGS...]", file=sys.stderr)
        return 2
    quiet_defaults()
    os.execvp(args[0], args)  # replaces this process: the command gets its signals and exit status
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
