"""The managed containers as the gate keeps them: one snapshot, followed from the engine's events.

The gate sees every change of the managed containers, so it keeps their state and serves it as one
operation (``GET /gate/v1/snapshot``, Compose only): a scaler cycle reads it instead of listing
and inspecting containers. ``Snapshot.run`` opens the engine's event stream (container events,
the scope's labels), then lists and inspects the managed containers once, then re-inspects the one
container each event names (a container gone or out of scope leaves the snapshot). Events that
arrive while it lists are applied after: each re-inspects the container's current state, so
applying one twice changes nothing. When the stream breaks (the engine restarted, a connection
cut) the snapshot is not served until it is listed again on a new stream (tried again after 1 s,
doubling up to 10 s); every ``check_s`` it is listed again as a check, and each container found
different is logged and counted as drift (a change racing the check can count too). The gate's
own actions (start, stop, kill, remove, a clone) re-inspect their container before they answer,
so a caller reads its own changes. Of two reads of one container (an event's, an action's, the
listing's) the one that started last is kept.

An entry holds only what the Compose backend reads: id, name, creation time, labels, hostname,
domain name, command line (as ``GET /containers/{id}/json`` shows them), the state with its
health status, exit code and start and finish times, the restart count and the CPU limit. Never
the environment, nothing of a container outside the scope.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc

from scaler.gate import rules
from scaler.gate.engine import Engine, EngineError, segment
from scaler.gate.rules import Scope

log = logging.getLogger("scaler.gate")

CHECK_S = 30.0  # a full listing as a check, this often
RETRY_S = 1.0  # after a broken stream or a failed listing, before trying again (doubling
MAX_RETRY_S = 10.0  # up to this while the engine stays out of reach)
# Container events that change what an entry holds (kill, attach, exec_* ... do not).
CHANGES = frozenset(
    {
        "create",
        "start",
        "restart",
        "die",
        "stop",
        "pause",
        "unpause",
        "destroy",
        "rename",
        "update",
        "oom",
        "health_status",
    }
)


class Broken(Exception):
    """The event stream ended: events may have been missed."""


def entry(inspected: dict[str, Any]) -> dict[str, Any]:
    """What the snapshot keeps of an inspected container (the shape of the inspect answer)."""
    config = inspected.get("Config") or {}
    state = inspected.get("State") or {}
    host = inspected.get("HostConfig") or {}
    health = state.get("Health")
    out_state = {
        k: state.get(k)
        for k in (
            "Status",
            "Running",
            "Paused",
            "Restarting",
            "Dead",
            "OOMKilled",
            "ExitCode",
            "StartedAt",
            "FinishedAt",
        )
    }
    if isinstance(health, dict):  # its status only: the probes' log changes without an event
        out_state["Health"] = {"Status": health.get("Status")}
    return {
        "Id": inspected.get("Id"),
        "Name": inspected.get("Name"),
        "Created": inspected.get("Created"),
        "RestartCount": inspected.get("RestartCount"),
        "Config": {
            k: config.get(k) for k in ("Hostname", "Domainname", "Labels", "Entrypoint", "Cmd")
        },
        "State": out_state,
        "HostConfig": {k: host.get(k) for k in ("NanoCpus", "CpuQuota", "CpuPeriod")},
    }


class Snapshot:
    """The managed containers of ``scope``, kept by ``run()`` (one task of the gate's loop)."""

    def __init__(self, engine: Engine, scope: Scope, check_s: float = CHECK_S):
        self.engine = engine
        self.scope = scope
        self.check_s = check_s
        self.containers: dict[str, dict[str, Any]] = {}  # id -> entry
        self.ready = False  # listed on the stream now open; False after a break
        self.updated = 0.0  # Unix time of the last change applied (or listing)
        self.checked = 0.0  # Unix time of the last listing
        self.counts = {"listings": 0, "events": 0, "drift": 0, "breaks": 0}
        self._body: bytes | None = None  # the served answer, until the next change
        self._seq = 0  # numbers the engine reads, in the order they start
        self._landed: dict[str, int] = {}  # container id -> number of the read its entry is

    # -- serving -------------------------------------------------------------------------------

    def body(self) -> bytes:
        """The answer of ``GET /gate/v1/snapshot`` (serialised once per change)."""
        if self._body is None:
            answer = {
                "scope": {"label": self.scope.key, "value": self.scope.value},
                "updated": self.updated,
                "checked": self.checked,
                "containers": sorted(self.containers.values(), key=lambda e: str(e["Name"])),
            }
            self._body = json.dumps(answer).encode()
        return self._body

    def state(self) -> dict[str, Any]:
        """For ``GET /gate/v1/status``: ready or not, its size, its times and counters."""
        return {"ready": self.ready, "containers": len(self.containers), "updated": self.updated,
                "checked": self.checked, **self.counts}  # fmt: skip

    def _changed(self) -> None:
        self.updated = time.time()
        self._body = None

    # -- keeping -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the engine for as long as the task runs (cancelled with the gate)."""
        delay = RETRY_S
        while True:
            listings = self.counts["listings"]
            try:
                await self._follow()
            except Exception as exc:  # a broken stream, an engine error, a bug: list again
                while isinstance(exc, ExceptionGroup) and exc.exceptions:  # the task group's
                    exc = exc.exceptions[0]
                self.ready = False
                self.counts["breaks"] += 1
                self._body = None
                log.warning(
                    json.dumps(
                        {
                            "ts": round(time.time(), 3),
                            "event": "snapshot-gap",
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                )
            await anyio.sleep(delay)
            delay = RETRY_S if self.counts["listings"] > listings else min(2 * delay, MAX_RETRY_S)

    async def _follow(self) -> None:
        params = {"filters": rules.narrowed({}, self.scope, type=["container"])}
        async with self.engine.open("GET", "/events", params) as (status, chunks):
            if status >= 400:
                raise EngineError(status, "the engine refused its event stream")
            send, receive = anyio.create_memory_object_stream[bytes](10_000)
            async with anyio.create_task_group() as group:
                group.start_soon(_lines, chunks, send)
                await self.relist(check=self.counts["listings"] > 0 and self.ready)
                self.ready = True
                due = time.monotonic() + self.check_s
                while True:
                    line = None
                    with anyio.move_on_after(max(0.0, due - time.monotonic())):
                        try:
                            line = await receive.receive()
                        except anyio.EndOfStream:
                            raise Broken("the engine's event stream ended") from None
                    if line is None:
                        await self.relist(check=True)
                        due = time.monotonic() + self.check_s
                    else:
                        await self.apply(line)

    async def relist(self, check: bool) -> None:
        """List and inspect every managed container; with ``check``, count what differs."""
        listed_at = self._next()
        params = {"all": "1", "filters": rules.narrowed({}, self.scope)}
        rows = await self.engine.json("GET", "/containers/json", params)
        fresh: dict[str, tuple[int, dict[str, Any]]] = {}  # id -> (its read's number, entry)
        for row in rows or []:
            if self.scope.holds(row.get("Labels")):
                seq = self._next()
                got = await self._inspect(str(row["Id"]))
                if got is not None:
                    fresh[got["Id"]] = (seq, got)
        kept: dict[str, dict[str, Any]] = {}
        for cid, (seq, got) in fresh.items():
            if self._landed.get(cid, 0) > seq:  # read again since (an action of the gate's)
                if cid in self.containers:
                    kept[cid] = self.containers[cid]
                continue
            if check and got != self.containers.get(cid):
                self._drift(got)
            self._landed[cid] = seq
            kept[cid] = got
        for cid, old in self.containers.items():
            if cid in fresh:
                continue
            if self._landed.get(cid, 0) > listed_at:  # created while this listing was read
                kept[cid] = old
            elif check:
                self._drift(old)
        self._landed = {cid: n for cid, n in self._landed.items() if cid in kept}
        self.containers = kept
        self.counts["listings"] += 1
        self.checked = time.time()
        self._changed()

    def _drift(self, found: dict[str, Any]) -> None:
        self.counts["drift"] += 1
        log.warning(
            json.dumps(
                {"ts": round(time.time(), 3), "event": "snapshot-drift", "container": found["Name"]}
            )
        )

    async def apply(self, line: bytes) -> None:
        """One event line of the stream: its container inspected again (or dropped)."""
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict) or not rules.event_kept(event, self.scope):
            return
        action = str(event.get("Action") or event.get("status") or "").split(":", 1)[0]
        cid = str((event.get("Actor") or {}).get("ID") or event.get("id") or "")
        if action not in CHANGES or not cid:
            return
        self.counts["events"] += 1
        await self.refresh(cid)

    async def refresh(self, cid: str) -> None:
        """Inspect container ``cid`` again: its entry replaced, or removed when it is gone or out
        of scope. (Also called by the gate's own actions before they answer, concurrently with
        the events: of two reads of one container, the one that started last wins.)"""
        seq = self._next()
        got = await self._inspect(cid)
        if got is not None:
            cid = str(got["Id"])
        else:  # a short id (a clone's "replaces") names a removed container too
            cid = next((k for k in self.containers if k.startswith(cid)), cid)
        if self._landed.get(cid, 0) > seq:
            return  # a read that started after this one has landed: it is newer
        self._landed[cid] = seq
        old = self.containers.pop(cid, None)
        if got is not None:
            self.containers[cid] = got
        if got != old:
            self._changed()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def _inspect(self, cid: str) -> dict[str, Any] | None:
        try:
            inspected = await self.engine.json("GET", f"/containers/{segment(cid)}/json")
        except EngineError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(inspected, dict):
            return None
        if not self.scope.holds((inspected.get("Config") or {}).get("Labels")):
            return None
        return entry(inspected)


async def _lines(chunks: AsyncIterator[bytes], send: anyio.abc.ObjectSendStream[bytes]) -> None:
    """The stream's whole JSON lines into ``send``; closed at the stream's end or error."""
    async with send:
        buffer = b""
        try:
            async for chunk in chunks:
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        await send.send(line)
        except Exception as exc:  # the engine went away: the reader sees the end
            log.info("gate: the event stream failed: %s: %s", type(exc).__name__, exc)
