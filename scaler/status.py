"""The scaler's status snapshot: what `scaler status` and HTTP /status show.

`scaler run` rewrites one JSON file after every cycle (write to a temporary file, then rename,
so a reader never sees half a file); `scaler status` reads it from another process and prints a
table. The snapshot is plain structured data, so an HTTP endpoint can serve the same dict.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE_ENV = "SCALER_STATE_FILE"
DEFAULT_STATE_FILE = ".scaler/state.json"


@dataclass(frozen=True)
class ServiceStatus:
    """One managed service after a cycle."""

    service: str
    current: int | None
    desired: int | None
    action: str  # "up", "down", "hold", or "error" when the scale call failed
    reasons: tuple[str, ...]
    waiting: int | None
    in_flight: int | None
    oldest_age_s: float | None
    min_replicas: int
    max_replicas: int
    emergency: bool = False
    acted: bool = False  # the backend was asked to change the count this cycle
    error: str | None = None
    note: str | None = None  # why a wanted change was not made, e.g. "standby: not the leader"
    override: str | None = None  # "paused" or "pinned N" while an operator override holds
    not_due: int = 0  # messages with an ETA still ahead: in the queue, not waiting yet
    abandoned: int = 0  # a dead worker's unacked messages, no longer counted in flight
    # Warm-pool replicas (booted or booting, consuming nothing: not capacity, not in ``current``)
    # and the pool size the last decision wanted.
    warm: int | None = None
    warm_target: int = 0


@dataclass(frozen=True)
class Snapshot:
    """Everything the scaler reports after one cycle."""

    written_at: float
    cycle: int
    backend: str
    dry_run: bool
    policy_file: str | None
    policy_loaded_at: float | None
    policy_error: str | None  # the last refused reload, shown until a good one lands
    cycle_duration_s: float
    consecutive_failures: int
    errors: tuple[str, ...]
    events: tuple[str, ...]  # recent backend events, newest last
    host: Mapping[str, float | None]
    services: Mapping[str, ServiceStatus] = field(default_factory=dict)
    role: str = "single"  # "leader" or "standby" with a leader lease; "single" without one
    leader: Mapping[str, Any] | None = None  # this replica's lease state and the key's holder
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recorder: Mapping[str, Any] | None = None  # FlightRecorder.status(); None: not recording
    # How new backlogs are noticed: WakeupDetector.status() ("events" or "polling" and why).
    detection: Mapping[str, Any] | None = None
    # Per service: serving workers found consuming none of their queues since this scaler
    # started, by action ("restored", "replaced", ...), and "last": the last such event.
    consumerless: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the same shape HTTP /status can serve)."""
        return asdict(self)


def default_state_file() -> Path:
    """SCALER_STATE_FILE, or .scaler/state.json under the working directory."""
    return Path(os.environ.get(STATE_FILE_ENV) or DEFAULT_STATE_FILE)


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Atomically replace ``path`` with the snapshot as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(snapshot.to_dict(), out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_snapshot(path: Path) -> dict[str, Any]:
    """The last snapshot written to ``path``; ValueError naming the file if it is unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"state file {path}: not found; is `scaler run` running with --state-file {path}?"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"state file {path}: unreadable: {exc}") from None
    if not isinstance(data, dict) or "services" not in data:
        raise ValueError(f"state file {path}: not a scaler status snapshot")
    return data


def _cell(value: object, digits: int = 1) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# Messages the counts leave out, said beside the reasons so nobody wonders where they went.
_ASIDES = (("not_due", "not due yet"), ("abandoned", "held by a dead worker"))


def render(data: Mapping[str, Any], now: float | None = None) -> str:
    """The snapshot as the operator's table: one row per service, then the problems."""
    now = time.time() if now is None else now
    age = now - float(data.get("written_at", 0.0))
    mode = " (dry run)" if data.get("dry_run") else ""
    lines = [
        f"backend {data.get('backend')}{mode}, cycle {data.get('cycle')}, "
        f"updated {age:.1f}s ago, policy {data.get('policy_file') or '-'}",
        _role_line(data),
    ]
    header = ["SERVICE", "CURRENT", "DESIRED", "WARM", "WAITING", "IN-FLIGHT", "OLDEST(s)",
              "LAST", "OVERRIDE", "WHY"]  # fmt: skip
    rows = [header]
    for name, svc in sorted((data.get("services") or {}).items()):
        why = "; ".join(svc.get("reasons") or [])
        if svc.get("note"):
            why = f"({svc['note']}) {why}"
        if svc.get("error"):
            why = f"ERROR {svc['error']}; {why}"
        aside = [f"{svc[k]} {words}" for k, words in _ASIDES if svc.get(k)]
        if aside:
            why = f"[{', '.join(aside)}] {why}"
        rows.append(
            [
                name,
                _cell(svc.get("current")),
                _cell(svc.get("desired")),
                _warm_cell(svc),
                _cell(svc.get("waiting")),
                _cell(svc.get("in_flight")),
                _cell(svc.get("oldest_age_s")),
                str(svc.get("action", "?")) + ("!" if svc.get("emergency") else ""),
                svc.get("override") or "-",
                why,
            ]
        )
    lines.extend(_table(rows))
    host = data.get("host") or {}
    lines.append(
        f"host cpu {_cell(host.get('cpu_percent'))}%, mem {_cell(host.get('memory_percent'))}%"
    )
    if data.get("policy_error"):
        lines.append(f"policy reload refused (last good policy in force): {data['policy_error']}")
    for error in data.get("errors") or []:
        lines.append(f"error: {error}")
    if data.get("consecutive_failures"):
        lines.append(f"consecutive failed cycles: {data['consecutive_failures']}")
    for service, seen in sorted((data.get("consumerless") or {}).items()):
        lines.append(_consumerless_line(service, seen))
    for event in (data.get("events") or [])[-5:]:
        lines.append(f"event: {event}")
    if data.get("recorder"):
        lines.append(_recorder_line(data["recorder"], now))
    if data.get("detection"):
        lines.append(_detection_line(data["detection"]))
    return "\n".join(lines)


def _warm_cell(svc: Mapping[str, Any]) -> str:
    """``-`` without a pool; the warm count, and ``->N`` while the pool moves towards N."""
    warm, target = svc.get("warm"), int(svc.get("warm_target") or 0)
    if not warm and not target:
        return "-"
    return _cell(warm) if warm == target else f"{_cell(warm)}->{target}"


def _consumerless_line(service: str, seen: Mapping[str, Any]) -> str:
    """`consumers io: 2 restored, 1 replaced; last ...`: workers that took nothing while counted
    as capacity (a lost consumer), kept in view after the events scroll away."""
    counts = ", ".join(f"{n} {action}" for action, n in sorted(seen.items()) if action != "last")
    last = seen.get("last") or "-"
    return f"consumers {service}: worker(s) found consuming nothing: {counts}; last {last}"


def _detection_line(det: Mapping[str, Any]) -> str:
    """`detection events (...)` or `detection POLLING (reason)`: a scaler that only polls reacts
    an interval later, and the operator should know why."""
    if det.get("mode") == "events":
        wakeups = sum((det.get("wakeups") or {}).values())
        return (
            f"detection events ({det.get('source')}): {wakeups} early decision(s), "
            f"{det.get('coalesced', 0)} arrival(s) coalesced, debounce {det.get('debounce_s')} s"
        )
    return f"detection POLLING only, at the cycle interval: {det.get('reason') or 'unknown'}"


def _recorder_line(rec: Mapping[str, Any], now: float) -> str:
    """`recorder connected ...` or `recorder disconnected for 12s (error) ...`."""
    state = rec.get("state", "?")
    since = rec.get("since")
    text = f"recorder {state}"
    if state != "connected" and since is not None:
        text += f" for {max(0.0, now - float(since)):.0f}s"
    if rec.get("error") and state != "connected":
        text += f" ({rec['error']})"
    return (
        f"{text}: {rec.get('events', 0)} arrivals, {rec.get('rows_written', 0)} rows to "
        f"{rec.get('file')}"
    )


def _role_line(data: Mapping[str, Any]) -> str:
    """Whether this scaler acts, and who does: the operator's first question with two scalers."""
    role = data.get("role") or "single"
    lease = data.get("leader")
    if role == "single" or not lease:
        return "role single (no leader election: this scaler acts alone)"
    holder = lease.get("holder")
    if role == "leader":
        return f"role leader (lease {lease.get('key')} held by this scaler, {lease.get('owner')})"
    who = f"held by {holder}" if holder else "held by nobody"
    owner = lease.get("owner")
    return f"role standby, not acting (lease {lease.get('key')} {who}; this is {owner})"
