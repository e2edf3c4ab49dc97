"""`scaler`: run the loop, plan one dry-run cycle, show status, validate a policy, pause or pin.

    scaler validate FILE                    exit 0 if usable, 1 with one line per problem
    scaler plan --policy FILE               one dry-run cycle: what it would do and why
    scaler run --policy FILE [--dry-run]    the loop (--backend local, compose or swarm); SIGHUP
                                            reloads
    scaler status [--json]                  the running scaler's last snapshot as a table
    scaler pause SERVICE [--reason TEXT]    hold the service at its current count
    scaler resume SERVICE                   undo a pause
    scaler pin SERVICE N [--reason TEXT]    hold the service at exactly N replicas
    scaler unpin SERVICE                    undo a pin
    scaler simulate --policy F --trace T    replay a trace offline against policies
    scaler record export --file F --out T   recorded arrivals (run --record F) as a trace

Logs go to stderr as one JSON object per line. The Celery app (for broker settings and the
control API) is ``services.celery_app:app`` unless --app says otherwise; it reads its broker URL
and key prefix from the environment, exactly as the workers do.

The scaler's own Redis (leader lease, pause/pin overrides) is SCALER_REDIS_URL, else the broker
when it is Redis, else the result backend when that is Redis; its keys start with
SCALER_KEY_PREFIX. `scaler run` elects a leader there unless --no-leader-election or --dry-run
(a dry run never takes the lease from a scaler that acts), and serves HTTP (the dashboard at /,
/metrics, /status, /healthz, control) on SCALER_HTTP_HOST:SCALER_HTTP_PORT unless --no-http.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scaler.api import HttpSettings, ScalerHTTPServer
from scaler.backends.base import Backend
from scaler.backends.warm_pool import RedisPoolStore
from scaler.control import ControlError, ControlStore, ControlUnavailable, Override
from scaler.leader import LeaderLease, LeaseSettings
from scaler.live import LiveFeed
from scaler.loop import MAX_BACKOFF_FACTOR, PolicySource, Scaler
from scaler.metrics import ScalerMetrics
from scaler.policy import Policy, PolicyError, load_policy
from scaler.recorder import FlightRecorder, add_record_command, add_run_flags, settings_from_args
from scaler.restore import UnackedRestorer
from scaler.secret_files import FileVariableError, with_file_variables
from scaler.signals.collector import Collector, queue_reader_for_app
from scaler.status import STATE_FILE_ENV, default_state_file, read_snapshot, render
from scaler.wakeup import detector_for_app

POLICY_ENV = "SCALER_POLICY"
BACKEND_ENV = "SCALER_BACKEND"
PROJECT_ENV = "SCALER_COMPOSE_PROJECT"
STACK_ENV = "SCALER_SWARM_STACK"
REDIS_ENV = "SCALER_REDIS_URL"
KEY_PREFIX_ENV = "SCALER_KEY_PREFIX"
DEFAULT_APP = "services.celery_app:app"
APP_HELP = "Celery app as module:attribute (default: %(default)s)"
REDIS_SCHEMES = ("redis", "rediss", "unix")

log = logging.getLogger("scaler.cli")


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


def _compose_backend(args: argparse.Namespace, app: Any) -> Backend:
    from scaler.backends.compose import ComposeBackend, gate_project

    project = args.project or os.environ.get(PROJECT_ENV) or os.environ.get("COMPOSE_PROJECT_NAME")
    if not project:
        # Inside the stack: the project is the one the engine gate serves (its GATE_PROJECT).
        try:
            project = gate_project()
        except Exception as exc:
            raise SystemExit(
                f"--project: no Compose project given and none from the engine gate: {exc} "
                f"(pass --project NAME or set {PROJECT_ENV})"
            ) from None
    try:
        return ComposeBackend(project, app, drain_timeout_s=args.drain_timeout)
    except ValueError as exc:
        raise SystemExit(f"--project / --drain-timeout: {exc}") from None


def _swarm_backend(args: argparse.Namespace, app: Any) -> Backend:
    from scaler.backends.swarm import SwarmBackend, own_stack

    stack = args.stack or os.environ.get(STACK_ENV)
    if not stack:
        # Inside the stack: the stack is the one the engine gate serves (its GATE_STACK).
        try:
            stack = own_stack()
        except Exception as exc:
            raise SystemExit(
                f"--stack: no stack given and none from the engine gate: {exc} "
                f"(pass --stack NAME or set {STACK_ENV})"
            ) from None
    try:
        return SwarmBackend(stack, app, drain_timeout_s=args.drain_timeout)
    except ValueError as exc:
        raise SystemExit(f"--stack / --drain-timeout: {exc}") from None


#: Backend name -> factory.
BACKENDS: dict[str, Callable[[argparse.Namespace, Any], Backend]] = {
    "local": _local_backend,
    "compose": _compose_backend,
    "swarm": _swarm_backend,
}


def _policy_path(args: argparse.Namespace) -> Path:
    raw = args.policy or os.environ.get(POLICY_ENV)
    if not raw:
        raise SystemExit(f"--policy: no policy file given (pass --policy FILE or set {POLICY_ENV})")
    return Path(raw)


def _load_source(args: argparse.Namespace) -> PolicySource:
    path = _policy_path(args)
    try:
        return PolicySource.from_file(path)
    except PolicyError as exc:
        raise SystemExit("\n".join(_prefixed(path, exc.problems))) from None


def _build(args: argparse.Namespace, dry_run: bool) -> tuple[Scaler, Backend, Any]:
    if args.backend not in BACKENDS:  # argparse does not check a default taken from the env
        raise SystemExit(
            f"{BACKEND_ENV}: unknown backend {args.backend!r}; expected one of {sorted(BACKENDS)}"
        )
    source = _load_source(args)
    app = load_app(args.app)
    backend = BACKENDS[args.backend](args, app)
    # A dead worker's unacked messages back at once (Redis with owner tracking; else None).
    restorer = UnackedRestorer.for_app(app)
    if hasattr(backend, "restorer"):
        backend.restorer = restorer
    # Warm-pool membership in the scaler's Redis (scaler:warm:*), else in memory only.
    url = scaler_redis_url(app)
    if url is not None and hasattr(backend, "use_pool_store"):
        backend.use_pool_store(RedisPoolStore.from_url(url, os.environ.get(KEY_PREFIX_ENV, "")))
    collector = Collector(queue_reader_for_app(app))
    state = Path(args.state_file) if getattr(args, "state_file", None) else None
    scaler = Scaler(
        source, backend, collector, state_file=state, dry_run=dry_run, restorer=restorer
    )
    return scaler, backend, app


def scaler_redis_url(app: Any, env: Mapping[str, str] | None = None) -> str | None:
    """Where the lease and overrides live: SCALER_REDIS_URL, else the app's broker if it is
    Redis, else its result backend if that is; None when there is no Redis at all."""
    try:  # SCALER_REDIS_URL_FILE (a Swarm secret's path) as well
        env = with_file_variables(os.environ if env is None else env, (REDIS_ENV,))
    except FileVariableError as exc:
        raise SystemExit(str(exc)) from exc
    explicit = env.get(REDIS_ENV, "").strip()
    if explicit:
        if explicit.split("://", 1)[0] not in REDIS_SCHEMES:
            raise SystemExit(
                f"{REDIS_ENV}: expected a redis://, rediss:// or unix:// URL, got "
                f"{explicit.split('://', 1)[0]!r}://..."
            )
        return explicit
    for candidate in (app.conf.broker_url, app.conf.result_backend):
        url = str(candidate or "")
        if url.split("://", 1)[0] in REDIS_SCHEMES:
            return url
    return None


def _limits(policy: Policy) -> dict[str, int]:
    return {name: svc.max_replicas for name, svc in policy.services.items()}


def _control_store(url: str, source: PolicySource) -> ControlStore:
    """Overrides checked against the policy in force (a reload's new max applies at once)."""
    prefix = os.environ.get(KEY_PREFIX_ENV, "")
    return ControlStore.from_url(url, lambda: _limits(source.policy), prefix=prefix)


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
    """One dry-run cycle: observe, decide, print what would happen and why; act on nothing.
    Operator overrides are read, so the plan shows what a pause or pin would hold."""
    scaler, backend, app = _build(args, dry_run=True)
    url = scaler_redis_url(app)
    if url is not None:
        scaler.control = _control_store(url, scaler.source)
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


def _env_settings() -> tuple[LeaseSettings, HttpSettings]:
    try:
        return LeaseSettings.from_env(), HttpSettings.from_env()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _http_server(settings: HttpSettings, scaler: Scaler) -> ScalerHTTPServer:
    assert scaler.metrics is not None
    # Healthy while cycles keep coming, allowing for the loop's own backoff on errors.
    max_age = max(30.0, 3 * scaler.source.policy.interval_s * MAX_BACKOFF_FACTOR)
    try:
        return ScalerHTTPServer.from_settings(
            settings,
            metrics=scaler.metrics,
            status=scaler.status_view,
            control=scaler.control,
            health_max_age_s=max_age,
            live=scaler.live,
        )
    except OSError as exc:
        raise SystemExit(
            f"SCALER_HTTP_HOST/SCALER_HTTP_PORT: cannot listen on {settings.host}:{settings.port}: "
            f"{exc} (set another port, or pass --no-http)"
        ) from None


def cmd_run(args: argparse.Namespace) -> int:
    """The loop until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    record = settings_from_args(args)  # a bad --record* value stops here, before anything starts
    lease_settings, http_settings = _env_settings()
    scaler, backend, app = _build(args, dry_run=args.dry_run)
    recorder = FlightRecorder(app, record) if record is not None else None
    scaler.recorder_status = recorder.status if recorder is not None else None
    scaler.metrics = ScalerMetrics()
    # Arrivals on an idle service's queue start its decision at once (policy `wakeup:`).
    probe = f"{os.environ.get(KEY_PREFIX_ENV, '')}scaler:wakeup-probe:{socket.gethostname()}"
    scaler.detector = detector_for_app(app, scaler.alarm.ring, probe_key=probe)
    if not args.no_http:
        LiveFeed().attach(scaler)  # the dashboard's history and event feed
    url = scaler_redis_url(app)
    if url is None:
        detail = f"no {REDIS_ENV} and no Redis broker or result backend"
        log.warning(json.dumps({"event": "no-redis", "detail": detail,
                                "effect": "no pause/pin, no leader election"}))  # fmt: skip
    else:
        scaler.control = _control_store(url, scaler.source)
        if not args.no_leader_election and not args.dry_run:
            scaler.leader = LeaderLease.from_settings(url, lease_settings)
    stop = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: scaler.request_reload())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    http = None if args.no_http else _http_server(http_settings, scaler)
    log.info(
        json.dumps(
            {
                "event": "start",
                "backend": backend.name,
                "dry_run": args.dry_run,
                "leader_election": scaler.leader is not None,
                "owner": scaler.leader.owner if scaler.leader else None,
                "http": http.url if http else None,
                "record": str(record.path) if record else None,
            }
        )
    )
    try:
        if recorder is not None:
            recorder.start()
        scaler.detector.start()
        if http is not None:
            http.start()
        if scaler.leader is not None:
            scaler.leader.step()  # settle the first cycle's role before it runs
            scaler.leader.start()
        scaler.run(stop, max_cycles=args.max_cycles)
    finally:
        scaler.detector.stop()
        if recorder is not None:
            recorder.stop()  # appends the buckets still open
        if scaler.leader is not None:
            scaler.leader.stop(release=True)  # a standby takes over at its next attempt
        if http is not None:
            http.stop()
        # With leader election the workers outlive this replica: the next leader adopts them.
        stop_all = getattr(backend, "stop_all", None)
        alone = scaler.leader is None
        if stop_all is not None and alone and not args.keep_workers and not args.dry_run:
            stop_all()
        backend.close()
    return 0


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def cmd_control(args: argparse.Namespace) -> int:
    """pause / resume / pin / unpin, straight to the overrides every scaler replica reads."""
    source = _load_source(args)
    url = scaler_redis_url(load_app(args.app))
    if url is None:
        print(
            f"scaler {args.command}: no Redis for overrides: set {REDIS_ENV} (or use a Redis "
            "broker or result backend)",
            file=sys.stderr,
        )
        return 1
    store = _control_store(url, source)
    try:
        if args.command == "pause":
            print(_describe("set", store.pause(args.service, by=_who(args), reason=args.reason)))
        elif args.command == "pin":
            pinned = store.pin(args.service, args.replicas, by=_who(args), reason=args.reason)
            print(_describe("set", pinned))
        else:
            undo = store.resume if args.command == "resume" else store.unpin
            removed = undo(args.service)
            if removed is None:
                kind = "paused" if args.command == "resume" else "pinned"
                print(f"{args.service}: was not {kind}; nothing to undo")
            else:
                print(_describe("removed", removed))
    except (ControlError, ControlUnavailable) as exc:
        print(f"scaler {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.client.close()
    return 0


def _describe(verb: str, override: Override) -> str:
    return f"{override.service}: {verb} {override.explanation}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a policy file")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_validate)

    def loop_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--policy", help=f"policy YAML (default ${POLICY_ENV})")
        p.add_argument(
            "--backend",
            choices=sorted(BACKENDS),
            default=os.environ.get(BACKEND_ENV) or "local",
            help=f"where the workers run (default ${BACKEND_ENV}, else local)",
        )
        p.add_argument(
            "--project",
            default=None,
            help=f"compose backend: the Compose project (default ${PROJECT_ENV}, "
            "else $COMPOSE_PROJECT_NAME, else the project the engine gate serves)",
        )
        p.add_argument(
            "--stack",
            default=None,
            help=f"swarm backend: the stack's name (default ${STACK_ENV}, else the stack the "
            "engine gate serves)",
        )
        p.add_argument(
            "--drain-timeout",
            type=float,
            default=3600.0,
            help="compose and swarm backends: longest wait for a drained worker's tasks, seconds",
        )
        p.add_argument("--app", default=DEFAULT_APP, help=APP_HELP)
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
                     help="local backend: leave workers running on exit (always so with "
                          "leader election: the next leader adopts them)")  # fmt: skip
    run.add_argument("--no-leader-election", action="store_true",
                     help="act without a lease (only when exactly one scaler runs)")  # fmt: skip
    run.add_argument("--no-http", action="store_true", help="serve no HTTP endpoints")
    add_run_flags(run)
    run.set_defaults(func=cmd_run)

    def control_args(p: argparse.ArgumentParser, note: bool) -> None:
        p.add_argument("service", help="a service the policy manages")
        p.add_argument("--policy", help=f"policy YAML (default ${POLICY_ENV}): the services "
                       "and their max replicas")  # fmt: skip
        p.add_argument("--app", default=DEFAULT_APP, help=APP_HELP)
        if note:
            p.add_argument("--reason", "--note", default="", help="why (shown in status)")
            p.add_argument("--by", default=None, help="who (default cli:$USER@host)")
        p.set_defaults(func=cmd_control)

    pause = sub.add_parser("pause", help="hold a service at its current count")
    control_args(pause, note=True)
    resume = sub.add_parser("resume", help="undo a pause")
    control_args(resume, note=False)
    pin = sub.add_parser("pin", help="hold a service at exactly N replicas")
    control_args(pin, note=True)
    pin.add_argument("replicas", type=int, help="the count to hold, 0..max_replicas")
    unpin = sub.add_parser("unpin", help="undo a pin")
    control_args(unpin, note=False)

    status = sub.add_parser("status", help="the running scaler's status table")
    status.add_argument("--state-file", default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    add_record_command(sub)
    from scaler.simulate.cli import add_parser as add_simulate_parser

    add_simulate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
