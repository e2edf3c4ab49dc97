"""The nemesis campaign's checker: for every task id, how often it STARTED, where, and its end.

Three sources, all read from outside the stack:

- the start records the tasks write before their work (``task_starts``, services.records: task
  id, Celery node, container hostname, pid, wall time, retries), collected by polling the bounded
  list often enough that nothing is trimmed away unseen;
- the container deaths of the project (``docker events``: die and oom, with the engine's time), by
  hostname (Docker's short id: the stack sets no hostname, the scaler's clones neither);
- the effects in PostgreSQL (``task_effects``: done, and when).

A second start of an id (same retry number) is **restored after death** when the container that
ran the previous start died between the two starts, and **run twice while alive** otherwise (a
worker that still ran, frozen or not, had its task taken: must never happen). An id without an
effect at the end is **lost**; one that never started, is on no broker list and was sent before
some worker of its queue died is put apart as the **BRPOP window** (kombu's Redis consumer pops a
message before it writes it to ``unacked``: a worker killed in between loses it, for kombu's own
sweep and the scaler's restore alike; docs/reliability.md, limits).
"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from exactly_once import RedisBroker
from nemesis_load import Sent

from services.records import STARTS


@dataclass(frozen=True)
class Start:
    task_id: str
    node: str
    hostname: str
    pid: int
    at: float
    retries: int
    redelivered: bool


@dataclass(frozen=True)
class Death:
    hostname: str
    name: str
    service: str
    at: float
    exit_code: str
    oom: bool = False


class RecordCollector:
    """Polls ``task_starts`` (newest first, trimmed to the latest N) and keeps every record seen.

    Nothing is missed while fewer than N records arrive between two polls; a poll whose oldest
    record was not seen before, on a full list, may have missed some: counted in ``gaps``. A start
    record the worker could not write (Redis paused past its 2 s timeout, or restarting) is lost
    for good: the checker counts ids done without any start record apart.
    """

    def __init__(self, url: str, every_s: float = 0.5) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self.every_s = every_s
        self.starts: dict[str, list[Start]] = defaultdict(list)
        self.gaps = 0
        self.poll_errors = 0
        self._seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        deadline = time.monotonic() + 60
        while True:  # the last poll must succeed (Redis may be restarting)
            try:
                self.poll()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except redis.RedisError:
                self.poll_errors += 1

    def poll(self) -> None:
        raw = cast(list[bytes], self.client.lrange(STARTS, 0, -1))
        new = [r for r in raw if r not in self._seen]
        if raw and raw[-1] in new and self._seen and len(raw) >= 1000:
            self.gaps += 1
        for item in new:
            self._seen.add(item)
            r = json.loads(item)
            start = Start(
                r["task_id"],
                r["node"],
                r["hostname"],
                int(r["pid"]),
                float(r["timestamp"]),
                int(r["retries"]),
                bool(r["redelivered"]),
            )
            self.starts[start.task_id].append(start)


class DeathLog:
    """The project's container deaths, from ``docker events`` (the engine's own timestamps)."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.deaths: list[Death] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                "docker",
                "events",
                "--format",
                "{{json .}}",
                "--since",
                str(int(time.time()) - 1),
                "--filter",
                "type=container",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
                "--filter",
                "event=die",
                "--filter",
                "event=oom",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._thread.start()

    def stop(self) -> None:
        time.sleep(1)  # the last events in flight
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
        self._thread.join(10)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        oom: set[str] = set()
        for line in self._proc.stdout:
            event = json.loads(line)
            attributes = event.get("Actor", {}).get("Attributes", {})
            hostname = str(event.get("id") or event.get("Actor", {}).get("ID", ""))[:12]
            if event.get("Action") == "oom":
                oom.add(hostname)
                continue
            self.deaths.append(
                Death(
                    hostname,
                    attributes.get("name", ""),
                    attributes.get("com.docker.compose.service", ""),
                    int(event["timeNano"]) / 1e9,
                    attributes.get("exitCode", "?"),
                    hostname in oom,
                )
            )
            oom.discard(hostname)

    def between(self, hostname: str, after: float, before: float) -> Death | None:
        """The first death of that container after ``after`` and before ``before``."""
        return next(
            (d for d in self.deaths if d.hostname == hostname and after < d.at < before), None
        )

    def of_service(self, service: str, after: float) -> list[Death]:
        """Deaths of the service's containers after ``after`` that were not a clean exit (a
        drained replica exits 0 after its warm shutdown)."""
        return [
            d for d in self.deaths if d.service == service and d.at > after and d.exit_code != "0"
        ]


@dataclass
class FaultRecord:
    """One injected fault, as it happened."""

    kind: str
    t0: float
    t1: float
    detail: str
    victims: list[str] = field(default_factory=list)  # container names

    def line(self, origin: float) -> str:
        return f"{self.t0 - origin:7.1f}s  {self.kind:<16} {self.t1 - self.t0:5.1f}s  {self.detail}"


@dataclass(frozen=True)
class Twice:
    """A second start of an id, with the previous start it repeats."""

    task_id: str
    first: Start
    second: Start
    death: Death | None  # the first's container's death between the two, if any
    first_finished: bool  # the first run had written its effect before the second started

    def describe(self, origin: float) -> str:
        f, s = self.first, self.second
        finished = "its run had finished" if self.first_finished else "its run unfinished"
        how = (
            f"after {f.hostname} died at {self.death.at - origin:.2f}s ({self.death.name}, "
            f"exit {self.death.exit_code})"
            if self.death
            else f"while {f.hostname} was alive ({finished})"
        )
        return (
            f"{self.task_id}: started {f.at - origin:.2f}s on {f.node} pid {f.pid}, again "
            f"{s.at - origin:.2f}s on {s.node} pid {s.pid} (redelivered={s.redelivered}) "
            f"{how}"
        )


@dataclass
class Findings:
    """The checker's verdict over one campaign."""

    sent: list[Sent]
    done_at: dict[str, float]
    lost: dict[str, str]  # id -> where it is (waiting, unacked, nowhere)
    brpop_window: dict[str, Death]  # id -> a death of its queue's worker after its send
    twice_alive: list[Twice]
    restored: list[Twice]
    no_start_record: list[str]
    unpublished: int  # publishes that raised and whose task never showed up

    def by_id(self) -> dict[str, Sent]:
        return {s.task_id: s for s in self.sent}


def broker_places(broker_url: str, queues: Iterable[str], ids: set[str]) -> dict[str, str]:
    """Where each of ``ids`` still is on the broker: a queue list, or unacked (with its owner)."""
    places: dict[str, str] = {}
    reader = RedisBroker(broker_url, "")
    client = reader.client
    try:
        for queue in queues:
            for key in reader.keys(queue):
                for raw in cast(list[bytes], client.lrange(key, 0, -1)):
                    task_id = json.loads(raw).get("headers", {}).get("id")
                    if task_id in ids:
                        places[task_id] = f"waiting in {queue}"
        owners = {
            t.decode(): n.decode()
            for t, n in cast(dict[bytes, bytes], client.hgetall("unacked_owner")).items()
        }
        for tag, raw in cast(dict[bytes, bytes], client.hgetall("unacked")).items():
            task_id = json.loads(raw)[0]["headers"]["id"]
            if task_id in ids:
                places[task_id] = f"unacked, owner {owners.get(tag.decode(), '?')}"
    finally:
        reader.close()
    return places


def check(
    sent: list[Sent],
    starts: dict[str, list[Start]],
    done_at: dict[str, float],
    deaths: DeathLog,
    places: dict[str, str],
    service_of: dict[str, str],
) -> Findings:
    """Classify every id; ``places`` says where the undone ones are, ``service_of`` maps queues."""
    seen = set(starts) | set(done_at) | set(places)
    counted = [s for s in sent if s.confirmed or s.task_id in seen]
    lost: dict[str, str] = {}
    brpop: dict[str, Death] = {}
    for s in counted:
        if s.task_id in done_at:
            continue
        death = next(iter(deaths.of_service(service_of[s.queue], s.sent_at)), None)
        # kombu's window holds one message per consumer: one per death at the most (a prefork
        # or threads worker has one consuming connection; the solo pool too).
        window_free = death is not None and death not in brpop.values()
        if s.task_id not in starts and s.task_id not in places and window_free:
            assert death is not None
            brpop[s.task_id] = death
        else:
            lost[s.task_id] = places.get(s.task_id, "nowhere (not on the broker)")
    twice_alive: list[Twice] = []
    restored: list[Twice] = []
    ours = {s.task_id for s in counted}  # the list holds earlier campaigns' starts too
    for task_id, records in starts.items():
        if task_id not in ours:
            continue
        by_attempt: dict[int, list[Start]] = defaultdict(list)
        for r in records:
            by_attempt[r.retries].append(r)
        for attempt in by_attempt.values():
            attempt.sort(key=lambda r: r.at)
            for first, second in itertools.pairwise(attempt):
                death = deaths.between(first.hostname, first.at, second.at)
                finished = done_at.get(task_id, float("inf")) < second.at
                twice = Twice(task_id, first, second, death, finished)
                (restored if death else twice_alive).append(twice)
    no_start = [s.task_id for s in counted if s.task_id in done_at and s.task_id not in starts]
    return Findings(
        counted, done_at, lost, brpop, twice_alive, restored, no_start, len(sent) - len(counted)
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class KindRow:
    """One fault kind's line of the table."""

    kind: str
    injected: int = 0
    affected: set[str] = field(default_factory=set)
    lost: int = 0
    brpop: int = 0
    twice_alive: int = 0
    restored: int = 0
    recovery: list[float] = field(default_factory=list)

    def cells(self) -> list[str]:
        p50, p99 = percentile(self.recovery, 50), percentile(self.recovery, 99)
        return [
            self.kind,
            str(self.injected),
            str(len(self.affected)),
            str(self.lost),
            str(self.brpop),
            str(self.twice_alive),
            str(self.restored),
            "-" if p50 is None else f"{p50:.1f}",
            "-" if p99 is None else f"{p99:.1f}",
        ]


COLUMNS = [
    "fault",
    "injected",
    "tasks affected",
    "lost",
    "lost in BRPOP window",
    "run twice (worker alive)",
    "restored after death",
    "recovery p50 s",
    "recovery p99 s",
]


def attribute(faults: list[FaultRecord], at: float) -> str:
    """The kind of the latest fault begun at or before ``at`` ("none" before the first)."""
    starts = [f.t0 for f in faults]
    i = bisect.bisect_right(starts, at) - 1
    return faults[i].kind if i >= 0 else "none"


@dataclass(frozen=True)
class KilledTask:
    """A task a dead worker was running: its death, and when it was done after it."""

    task_id: str
    death: Death
    done_at: float | None
    own_s: float


def killed_tasks(
    findings: Findings, starts: dict[str, list[Start]], deaths: DeathLog
) -> list[KilledTask]:
    """Every (task, death) where the task had started in the dying container and had no effect
    yet at the death: what the death interrupted."""
    sent = findings.by_id()
    out: list[KilledTask] = []
    for task_id, records in starts.items():
        if task_id not in sent:
            continue
        done = findings.done_at.get(task_id)
        for r in records:
            death = deaths.between(r.hostname, r.at, float("inf"))
            if death is not None and (done is None or done > death.at):
                out.append(KilledTask(task_id, death, done, sent[task_id].duration))
                break
    return out


def rows(faults: list[FaultRecord], findings: Findings, killed: list[KilledTask]) -> list[KindRow]:
    """Per fault kind: injected, affected tasks, what went wrong, recovery (see docs)."""
    table: dict[str, KindRow] = {}

    def row(kind: str) -> KindRow:
        return table.setdefault(kind, KindRow(kind))

    for f in faults:
        row(f.kind).injected += 1
    sent = findings.by_id()
    for f, nxt in zip(faults, [*faults[1:], None], strict=False):
        window_end = nxt.t0 if nxt else float("inf")
        r = row(f.kind)
        for s in sent.values():  # pending while the fault lasted: sent before its end, not done
            done = findings.done_at.get(s.task_id)
            if s.sent_at <= f.t1 and (done is None or done >= f.t0):
                r.affected.add(s.task_id)
                if done is not None:
                    r.recovery.append(done - max(s.sent_at, f.t0))
        for k in killed:  # a dead worker's tasks: recovery from the death
            if f.t0 <= k.death.at < window_end:
                r.affected.add(k.task_id)
                if k.done_at is not None:
                    r.recovery.append(k.done_at - k.death.at)
    for task_id, place in findings.lost.items():
        del place
        row(attribute(faults, sent[task_id].sent_at)).lost += 1
    for task_id in findings.brpop_window:
        row(attribute(faults, findings.brpop_window[task_id].at)).brpop += 1
    for t in findings.twice_alive:
        row(attribute(faults, t.second.at)).twice_alive += 1
    for t in findings.restored:
        assert t.death is not None
        row(attribute(faults, t.death.at)).restored += 1
    return sorted(table.values(), key=lambda r: r.kind)


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def summary(findings: Findings, collector_gaps: int, origin: float) -> list[str]:
    """The campaign's totals and the evidence of every finding (ids, workers, times)."""
    out = [
        f"tasks: {len(findings.sent)} sent, {len(findings.done_at)} done, "
        f"{len(findings.lost)} lost, {len(findings.brpop_window)} lost in kombu's BRPOP "
        f"window (apart), {len(findings.twice_alive)} run twice while their worker lived, "
        f"{len(findings.restored)} restored after their worker died; "
        f"{len(findings.no_start_record)} done without a start record (Redis refused the "
        f"write), {findings.unpublished} publishes refused, {collector_gaps} collector gaps"
    ]
    sent = findings.by_id()
    out += [
        f"LOST {t}: {where}; sent at {sent[t].sent_at - origin:.2f}s"
        + ("" if sent[t].confirmed else " (its publish raised)")
        for t, where in sorted(findings.lost.items())
    ]
    out += [
        f"BRPOP WINDOW {t}: sent at {sent[t].sent_at - origin:.2f}s, never started, on no list; "
        f"{d.name} died at {d.at - origin:.2f}s"
        for t, d in sorted(findings.brpop_window.items())
    ]
    out += [f"RUN TWICE {t.describe(origin)}" for t in findings.twice_alive]
    return out


def json_ready(findings: Findings) -> dict[str, Any]:
    return {
        "sent": len(findings.sent),
        "done": len(findings.done_at),
        "lost": sorted(findings.lost),
        "brpop_window": sorted(findings.brpop_window),
        "twice_alive": [t.task_id for t in findings.twice_alive],
        "restored": [t.task_id for t in findings.restored],
    }
