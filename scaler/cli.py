"""`scaler`: run the loop, plan one dry-run cycle, show status, validate a policy file.

    scaler validate FILE                    exit 0 if usable, 1 with one line per problem
    scaler plan --policy FILE               one dry-run cycle: what it would do and why
    scaler run --policy FILE [--dry-run]    the loop; SIGHUP reloads the policy
    scaler status [--json]                  the running scaler's last snapshot as a table

Logs go to stderr as one JSON object per line. The Celery app (for broker settings and the
control API) is ``services.celery_app:app`` unless --app says otherwise; it reads its broker URL
and key prefix from the environment, exactly as the workers do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scaler.backends.base import Backend
from scaler.loop import PolicySource, Scaler
from scaler.policy import PolicyError, load_policy
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.status import STATE_FILE_ENV, default_state_file, read_snapshot, render

POLICY_ENV = "SCALER_POLICY"
DEFAULT_APP = "services.celery_app:app"


class JsonLines(logging.Formatter):
    """One JSON object per record; a message that is already a JSON object is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        try:
            parsed = json.loads(message)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            out.update(parsed)
        else:
            out["msg"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (the Celery app); a clear error if it is not there."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr or "app")
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--app {spec!r}: cannot load the Celery app: {exc}") from None


def _local_backend(args: argparse.Namespace, app: Any) -> Backend:
    from scaler.backends.local import LocalBackend

    return LocalBackend(
        app=app,
        workdir=Path(args.workdir),
        app_module=args.app.partition(":")[0],
        concurrency=args.concurrency,
        grace_s=args.grace,
    )


#: Backend name -> factory. Part 2 adds "compose" here.
BACKENDS: dict[str, Callable[[argparse.Namespace, Any], Backend]] = {"local": _local_backend}


def _policy_path(args: argparse.Namespace) -> Path:
    raw = args.policy or os.environ.get(POLICY_ENV)
    if not raw:
        raise SystemExit(f"--policy: no policy file given (pass --policy FILE or set {POLICY_ENV})")
    return Path(raw)


def _build(args: argparse.Namespace, dry_run: bool) -> tuple[Scaler, Backend]:
    try:
        source = PolicySource.from_file(_policy_path(args))
    except PolicyError as exc:
        path = _policy_path(args)
        raise SystemExit("\n".join(_prefixed(path, exc.problems))) from None
    app = load_app(args.app)
    backend = BACKENDS[args.backend](args, app)
    collector = Collector(queue_reader_for_app(app))
    state = Path(args.state_file) if getattr(args, "state_file", None) else None
    return Scaler(source, backend, collector, state_file=state, dry_run=dry_run), backend


def _prefixed(path: Path, problems: Sequence[str]) -> list[str]:
    return [p if p.startswith(str(path)) else f"{path}: {p}" for p in problems]


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 for a usable file; 1 with every problem, each naming the file and the field."""
    path = Path(args.file)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        for line in _prefixed(path, exc.problems):
            print(line, file=sys.stderr)
        return 1
    names = ", ".join(policy.services)
    print(f"{path}: ok ({len(policy.services)} services: {names})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """One dry-run cycle: observe, decide, print what would happen and why; act on nothing."""
    scaler, backend = _build(args, dry_run=True)
    try:
        report = scaler.cycle()
    finally:
        backend.close()
    assert scaler.last_snapshot is not None
    if args.json:
        print(json.dumps(scaler.last_snapshot.to_dict(), indent=1, sort_keys=True))
    else:
        print(render(scaler.last_snapshot.to_dict()))
    return 1 if report.errors and not report.decisions else 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running scaler's last snapshot."""
    path = Path(args.state_file) if args.state_file else default_state_file()
    try:
        data = read_snapshot(path)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else render(data, time.time()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The loop until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    scaler, backend = _build(args, dry_run=args.dry_run)
    stop = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: scaler.request_reload())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.getLogger("scaler.cli").info(
        json.dumps({"event": "start", "backend": backend.name, "dry_run": args.dry_run})
    )
    try:
        scaler.run(stop, max_cycles=args.max_cycles)
    finally:
        stop_all = getattr(backend, "stop_all", None)
        if stop_all is not None and not args.keep_workers and not args.dry_run:
            stop_all()
        backend.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a policy file")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_validate)

    def loop_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--policy", help=f"policy YAML (default ${POLICY_ENV})")
        p.add_argument("--backend", choices=sorted(BACKENDS), default="local")
        p.add_argument("--app", default=DEFAULT_APP, help="Celery app as module:attribute")
        p.add_argument("--workdir", default=os.environ.get("SCALER_WORKDIR", ".scaler/workers"),
                       help="local backend: pidfiles and worker logs")  # fmt: skip
        p.add_argument("--concurrency", type=int, default=1, help="local backend: -c per worker")
        p.add_argument("--grace", type=float, default=30.0, help="drain grace period, seconds")
        p.add_argument("--state-file", default=os.environ.get(STATE_FILE_ENV),
                       help=f"status snapshot path (default ${STATE_FILE_ENV})")  # fmt: skip

    plan = sub.add_parser("plan", help="one dry-run cycle: what would happen and why")
    loop_args(plan)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan, state_file=None)

    run = sub.add_parser("run", help="run the scaling loop")
    loop_args(run)
    run.add_argument("--dry-run", action="store_true", help="decide and report, never act")
    run.add_argument("--max-cycles", type=int, default=None)
    run.add_argument("--keep-workers", action="store_true",
                     help="local backend: leave workers running on exit")  # fmt: skip
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="the running scaler's status table")
    status.add_argument("--state-file", default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
