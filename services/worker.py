"""The worker's entry point: ``python -m services.worker [celery worker options]``.

It runs Celery's own ``worker`` command (the same click command, options, defaults and
``CELERY_WORKER_*`` environment variables as ``celery -A services.celery_app worker``) for this
project's app, without Celery's umbrella ``celery`` command. That command imports every
sub-command and every installed CLI plugin before it starts a worker: the ``amqp`` shell's
prompt_toolkit, and Flower (installed in the same image) with its tornado web app. They are about a
third of a worker's import time and nothing a worker uses; a worker the scaler adds consumes
that much sooner without them (docs/benchmarks.md, "Cold start").

Every other ``celery`` command (inspect, control, beat, flower, ...) is unchanged. ``--detach``
is refused: a worker here runs in the foreground under tini (or a supervisor) and detaching
would re-run the umbrella command.
"""

from __future__ import annotations

import os
import sys

from celery import maybe_patch_concurrency

# `celery` runs its commands with this prefix, so `worker` options also come from CELERY_WORKER_*.
ENV_PREFIX = "CELERY_WORKER"
DETACH_FLAGS = ("-D", "--detach")
TRUTHY = ("1", "true", "t", "yes", "y", "on")  # click's reading of a flag's environment variable


def main(argv: list[str] | None = None) -> int:
    """Start a worker for services.celery_app with ``argv`` as ``celery worker`` options."""
    args = sys.argv[1:] if argv is None else argv
    refused = [a for a in args if a in DETACH_FLAGS]
    if refused:
        print(
            f"services.worker: {refused[0]} is not supported: the worker runs in the foreground "
            "(use `celery -A services.celery_app worker --detach` to detach)",
            file=sys.stderr,
        )
        return 64
    # As `celery` does first: eventlet/gevent pools need their monkey patches before anything else.
    maybe_patch_concurrency(["celery", "worker", *args])
    # Imported only now, after the patches, as `celery` does; a bad environment then stops
    # start-up with the settings' own message (services.celery_app).
    from celery.bin.base import CLIContext, consume_preload_options
    from celery.bin.worker import worker as worker_command

    from services.celery_app import app

    # As the umbrella command does: the app's own worker and preload options, if it adds any.
    preload = list(app.user_options.get("preload", ()))
    worker_command.params.extend([*app.user_options.get("worker", ()), *preload])
    if preload:
        worker_command.callback = consume_preload_options(worker_command.callback)

    # `celery --no-color` is also read from NO_COLOR; the umbrella's other options do not apply.
    no_color = os.environ.get("NO_COLOR", "").strip().lower() in TRUTHY
    obj = CLIContext(app=app, no_color=no_color, workdir=None, quiet=False)
    try:
        worker_command.main(
            args=args,
            prog_name="celery worker",
            obj=obj,
            auto_envvar_prefix=ENV_PREFIX,
            standalone_mode=True,
        )
    except SystemExit as exc:  # click exits with the worker's exit code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
