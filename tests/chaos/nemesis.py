"""The nemesis: faults at random moments into the running chaos stack, under steady and bursty load.

    .venv/bin/python tests/chaos/nemesis.py --duration 30m --seed 7 --table nemesis.md
    make nemesis DURATION=30m SEED=7

A campaign is replayable from its seed, printed first: the fault schedule (`schedule`) and the load
(nemesis_load.plan_load) are pure functions of the seed and the duration. What a fault hits is
chosen at its moment from what runs then (the busiest replica of the drawn service, ties broken by
the drawn number), so a replay repeats the same faults at the same moments, not the same thread
interleaving. Faults run one after the other (each heals before the next: SIGCONT, Redis
unpaused, the socket restored; a cancelled consumer is the scaler's to heal, within the fault's
drawn seconds, or the campaign fails), with a drawn gap between them; the load
never stops. Each fault kind is one small function below (`FAULTS`).

At the end the campaign waits for every task, then the checker (nemesis_check) reads how often
each id started and where, the deaths of the containers, and the effects, and prints the table
per fault kind. The stack's visibility timeout is the shipped one (an hour): a dead worker's tasks
come back only through the scaler's restore.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from nemesis_check import (
    COLUMNS,
    DeathLog,
    FaultRecord,
    Findings,
    KilledTask,
    RecordCollector,
    broker_places,
    check,
    killed_tasks,
    markdown,
    rows,
    summary,
)
from nemesis_load import LONG_S, SOLO_QUEUE, LoadGenerator, plan_load
from stack_env import IO_QUEUE, IO_SERVICE, ChaosStack, chaos_stack, wait_until

SOLO_SERVICE = "worker-scheduled"  # on the solo pool in the chaos stack
QUEUE_OF = {IO_SERVICE: IO_QUEUE, SOLO_SERVICE: SOLO_QUEUE}
SERVICE_OF = {queue: service for service, queue in QUEUE_OF.items()}
TARGETS = tuple(QUEUE_OF)

# The kinds the Compose stack supports (the Swarm node stop needs tests/swarm's cluster).
KINDS = (
    "kill_busy",  # SIGKILL of a busy worker container (worker-io's threads or the solo pool)
    "oom_busy",  # a task allocating past worker-io's memory limit: the OOM killer
    "sigstop",  # SIGSTOP of every process of a worker for 1-30 s, then SIGCONT
    "redis_pause",  # CLIENT PAUSE (all clients) for 0.1-5 s
    "redis_restart",  # docker restart of Redis (AOF everysec)
    "scaler_restart",  # SIGKILL of the scaler; Docker's restart policy (or the nemesis) restarts it
    "leader_kill",  # a standby started, the leader SIGKILLed: the standby takes over
    "docker_api_cut",  # the engine's socket cut under the gate for 2-10 s
    "consumer_cancel",  # cancel_consumer to one worker behind the scaler's back, for 5-20 s
)
SECONDS = {
    "sigstop": (1.0, 30.0),
    "redis_pause": (0.1, 5.0),
    "docker_api_cut": (2.0, 10.0),
    "consumer_cancel": (5.0, 20.0),
}
# What an injection itself takes beyond its drawn seconds (the planner's estimate only).
OVERHEAD_S = {"oom_busy": 5.0, "redis_restart": 3.0, "scaler_restart": 3.0, "leader_kill": 20.0}
FIRST_AT_S = (5.0, 10.0)
GAP_S = (2.0, 8.0)
OOM_MEGABYTES = 1100  # worker-io's limit is 768M (compose.prod.yaml)

# The kill bound: a dead worker's task is done within one scaler cycle (the policy's interval_s),
# plus the task's own time, plus this margin: the death seen (the engine's event, then the
# reconcile), a replacement's cold start when no other replica serves, one more task's time for a
# free slot behind the backlog, and a loaded 2-core CI machine.
CYCLE_S = 1.0
KILL_MARGIN_S = 30.0
SETTLE_S = 120.0
INJECTION_FAILED = "INJECTION FAILED"
NOT_HEALED = "NOT HEALED"  # a worker left consuming nothing: the scaler must heal it


@dataclass(frozen=True)
class Fault:
    at_s: float  # after the campaign's start
    kind: str
    seconds: float  # how long it lasts (0: a single action)
    service: str  # the worker service it targets, where it targets one
    pick: int  # ties between equally busy replicas


def schedule(seed: int, duration_s: float) -> list[Fault]:
    """The campaign's faults, from the seed and the duration only: rounds of every kind once, in
    a drawn order, at drawn gaps, until the duration is used."""
    rng = random.Random(f"faults:{seed}")
    faults: list[Fault] = []
    t = rng.uniform(*FIRST_AT_S)
    while True:
        for kind in rng.sample(KINDS, len(KINDS)):
            if t >= duration_s:
                return faults
            low, high = SECONDS.get(kind, (0.0, 0.0))
            seconds = round(rng.uniform(low, high), 1)
            service = IO_SERVICE if kind == "oom_busy" else rng.choice(TARGETS)
            faults.append(Fault(round(t, 1), kind, seconds, service, rng.randrange(1000)))
            t += seconds + OVERHEAD_S.get(kind, 1.0) + rng.uniform(*GAP_S)


def once_more(
    call: Callable[[], object], attempts: int = 3, reset: Callable[[], object] | None = None
) -> None:
    """Run ``call``; on a failure of the test's own tooling (a stale connection, a Compose
    race), again after a second, up to ``attempts`` in all: a fault the nemesis failed to inject
    is no finding. (A Redis restart closes every pooled connection of the client: each retry may
    meet another stale one; the campaign saw two in a row.)"""
    for attempt in range(1, attempts + 1):
        try:
            call()
            return
        except Exception:
            if attempt == attempts:
                raise
            if reset is not None:
                reset()  # e.g. drop every pooled connection: a restart left them all stale
            time.sleep(1.0)


@dataclass
class Nemesis:
    """Injects faults into one stack; each ``fault_*`` method returns what it did."""

    stack: ChaosStack
    load: LoadGenerator
    deaths: DeathLog
    healed: list[str] = field(default_factory=list)

    # -- whom to hit -----------------------------------------------------------------------
    def hostname(self, container: str) -> str:
        return self.stack.docker("inspect", "-f", "{{.Config.Hostname}}", container).strip()

    def node(self, service: str, container: str) -> str:
        return f"{QUEUE_OF[service]}@{self.hostname(container)}"

    def busiest(self, fault: Fault) -> tuple[str, str, int]:
        """(container, node, tasks held) of the drawn service's replica holding the most."""
        found = []
        for container in self.stack.running(fault.service):
            try:
                node = self.node(fault.service, container)
                found.append((len(self.stack.held(node)), container, node))
            except RuntimeError:  # gone between the listing and the inspect
                continue
        if not found:
            raise RuntimeError(f"no running replica of {fault.service}")
        found.sort(key=lambda f: (-f[0], f[1]))
        top = [f for f in found if f[0] == found[0][0]]
        held, container, node = top[fault.pick % len(top)]
        return container, node, held

    # -- the fault kinds -------------------------------------------------------------------
    def fault_kill_busy(self, f: Fault) -> FaultRecord:
        container, _, held = self.busiest(f)
        t0 = time.time()
        self.stack.docker("kill", container)
        return FaultRecord(
            f.kind, t0, time.time(), f"docker kill {container} holding {held}", [container]
        )

    def fault_oom_busy(self, f: Fault) -> FaultRecord:
        t0 = time.time()
        task_id = self.load.send_allocation(OOM_MEGABYTES)
        try:
            death = wait_until(
                f"a {IO_SERVICE} replica OOM-killed by {task_id}",
                lambda: next((d for d in self.deaths.of_service(IO_SERVICE, t0) if d.oom), None),
                deadline_s=60,
                every_s=0.2,
            )
        except AssertionError:
            return FaultRecord(
                f.kind,
                t0,
                time.time(),
                f"{task_id} ({OOM_MEGABYTES} MB): no {IO_SERVICE} replica died within 60 s",
            )
        return FaultRecord(
            f.kind,
            t0,
            death.at,
            f"{task_id} ({OOM_MEGABYTES} MB): {death.name} "
            f"died (exit {death.exit_code}, oom={death.oom})",
            [death.name],
        )

    def fault_sigstop(self, f: Fault) -> FaultRecord:
        container, _, held = self.busiest(f)
        t0 = time.time()
        self.stack.freeze(container, signal.SIGSTOP)
        time.sleep(f.seconds)
        try:
            self.stack.freeze(container, signal.SIGCONT)
            after = "SIGCONT"
        except Exception as exc:  # replaced (killed) by the scaler meanwhile
            after = f"gone before SIGCONT ({type(exc).__name__})"
        return FaultRecord(
            f.kind,
            t0,
            time.time(),
            f"SIGSTOP {container} holding {held} for {f.seconds} s, then {after}",
            [container],
        )

    def fault_redis_pause(self, f: Fault) -> FaultRecord:
        v = self.stack.values
        admin = redis.Redis(
            host="127.0.0.1",
            port=self.stack.redis_port,
            username="admin",
            password=v["REDIS_ADMIN_PASSWORD"],
            socket_timeout=5,
        )
        try:  # Redis may still be coming back from an earlier fault: wait until it answers
            t0 = wait_until(
                "Redis takes CLIENT PAUSE",
                lambda: (
                    admin.execute_command("CLIENT", "PAUSE", int(f.seconds * 1000), "ALL")
                    and time.time()
                ),
                deadline_s=30,
                every_s=0.2,
            )
        finally:
            admin.close()
        time.sleep(f.seconds)
        return FaultRecord(f.kind, t0, time.time(), f"CLIENT PAUSE {f.seconds} s ALL")

    def fault_redis_restart(self, f: Fault) -> FaultRecord:
        t0 = time.time()
        self.stack.docker("restart", self.stack.container("redis"))
        broker = self.stack.broker()
        try:
            wait_until("Redis answers again", broker.ping, deadline_s=60, every_s=0.2)
        finally:
            broker.close()
        return FaultRecord(f.kind, t0, time.time(), "docker restart redis, answering again")

    def fault_scaler_restart(self, f: Fault) -> FaultRecord:
        scaler = self.stack.container("scaler")
        t0 = time.time()
        self.stack.docker("kill", scaler)
        if self.stack.docker("inspect", "-f", "{{.State.Running}}", scaler).strip() != "true":
            self.stack.docker("start", scaler)
        wait_until(
            "the restarted scaler leads",
            lambda: self.stack.status()["role"] == "leader",
            deadline_s=60,
            every_s=0.3,
        )
        return FaultRecord(f.kind, t0, time.time(), "docker kill scaler, leading again")

    def fault_leader_kill(self, f: Fault) -> FaultRecord:
        project = self.stack.project
        # --no-deps: Compose leaves the other services alone (without it, `up` inspected a
        # worker the scaler had just removed: "No such container", the injection failed).
        try:  # the standby is removed whatever happens (a standby left running took the lease
            # at the next scaler_restart of the 30-minute run: the restarted scaler stood by)
            once_more(
                lambda: project.run(
                    "--profile",
                    "ha",
                    "up",
                    "-d",
                    "--wait",
                    "--no-deps",
                    "scaler-standby",
                    timeout=180,
                )
            )
            wait_until(
                "the standby reports as standby",
                lambda: self.stack.status(standby=True)["role"] == "standby",
                deadline_s=30,
            )
            t0 = time.time()
            project.run("kill", "-s", "SIGKILL", "scaler")
            took = wait_until(
                "the standby takes the lease",
                lambda: self.stack.status(standby=True)["role"] == "leader" and time.time(),
                deadline_s=30,
                every_s=0.2,
            )
        finally:
            project.run("start", "scaler", check=False)
            project.run("--profile", "ha", "stop", "-t", "5", "scaler-standby", check=False)
            project.run("--profile", "ha", "rm", "-f", "scaler-standby", check=False)
        wait_until(
            "the scaler leads again",
            lambda: self.stack.status()["role"] == "leader",
            deadline_s=60,
            every_s=0.3,
        )
        return FaultRecord(
            f.kind,
            t0,
            time.time(),
            f"leader SIGKILLed, standby leader {took - t0:.1f} s later; standby removed after",
        )

    def fault_docker_api_cut(self, f: Fault) -> FaultRecord:
        t0 = time.time()
        self.stack.proxy.cut()
        try:
            time.sleep(f.seconds)
        finally:
            self.stack.proxy.restore()
        return FaultRecord(f.kind, t0, time.time(), f"engine socket cut for {f.seconds} s")

    def fault_consumer_cancel(self, f: Fault) -> FaultRecord:
        container, node, held = self.busiest(f)
        queue = QUEUE_OF[f.service]
        assert self.stack.app is not None
        control = self.stack.app.control
        t0 = time.time()
        # The client's pooled broker connection may be one a Redis restart closed: once more.
        once_more(
            lambda: control.cancel_consumer(queue, destination=[node]),
            reset=self.stack.app.pool.force_close_all,
        )
        # The scaler's consumer check heals it (or replaces it) within two cycles; the drawn
        # seconds (at least 5: several cycles of the stack's 1 s interval) are its deadline. A
        # solo worker cannot answer the check while it runs a task: its longest task more.
        extra = LONG_S[1] if f.service == SOLO_SERVICE else 0.0
        deadline = time.monotonic() + f.seconds + extra
        healed = False
        while not healed and time.monotonic() < deadline:
            time.sleep(0.5)  # the pace of the probe; the condition is polled to the deadline
            healed = self.consuming_again(node, queue, container)
        took = time.time() - t0
        if healed:
            after = f"healed by the scaler after {took:.1f} s"
        else:
            after = (
                f"{NOT_HEALED} by the scaler within {f.seconds + extra} s; "
                + self.heal_consumer(node, queue, container)
            )
        return FaultRecord(
            f.kind,
            t0,
            time.time(),
            f"cancel_consumer {queue} on {container} holding {held}: {after}",
            [container],
        )

    def consuming_again(self, node: str, queue: str, container: str) -> bool:
        """The worker consumes ``queue`` again, or the scaler took it out of service: its
        replica is gone (replaced), or the scaler began draining it (a drain cancels the
        consumer itself, and a worker consuming nothing is the first idle one to go)."""
        if container not in self.stack.running(SERVICE_OF[queue]):
            return True
        code, body = self.stack.http("/api/live")
        if code == 200 and any(
            e.get("kind") == "drain" and container in str(e.get("text", e))
            for e in json.loads(body).get("events", [])
        ):
            return True
        assert self.stack.app is not None
        replies = self.stack.app.control.inspect([node], timeout=1.0).active_queues() or {}
        return any(q.get("name") == queue for q in replies.get(node) or [])

    def heal_consumer(self, node: str, queue: str, container: str) -> str:
        """Re-add the consumer the nemesis cancelled, unless the replica is gone or the scaler
        drains it (a drain cancels the consumer itself: adding it back would undo the drain)."""
        if container not in self.stack.running(SERVICE_OF[queue]):
            return "replica gone (replaced or removed by the scaler)"
        hostname = node.split("@", 1)[1]
        events = self.stack.status()["events"][-30:]
        if any("drain" in e and (container in e or hostname in e) for e in events):
            return "the scaler drains it: left as is"
        assert self.stack.app is not None
        self.stack.app.control.add_consumer(queue, destination=[node])
        self.healed.append(node)
        return "consumer re-added by the nemesis (the scaler had not replaced it)"


FAULTS: dict[str, Callable[[Nemesis, Fault], FaultRecord]] = {
    kind: getattr(Nemesis, f"fault_{kind}") for kind in KINDS
}


@dataclass
class Campaign:
    """One campaign's seed, schedule, what happened, and the checker's verdict."""

    seed: int
    duration_s: float
    origin: float
    faults: list[FaultRecord]
    findings: Findings
    killed: list[KilledTask]
    gaps: int
    wall_s: float
    acks_lost: list[str] = field(default_factory=list)  # done, but still unacked at the end

    def table(self) -> str:
        body = [r.cells() for r in rows(self.faults, self.findings, self.killed)]
        return markdown(COLUMNS, body)

    def report(self) -> str:
        lines = [
            f"## nemesis seed {self.seed}, {self.duration_s:.0f} s of load and faults "
            f"({self.wall_s:.0f} s wall)",
            "",
            "```",
        ]
        lines += [f.line(self.origin) for f in self.faults]
        lines += ["```", "", self.table(), ""]
        lines += [f"- {line}" for line in summary(self.findings, self.gaps, self.origin)]
        if self.acks_lost:
            lines.append(
                f"- {len(self.acks_lost)} done but left in unacked (an ack Redis never got: "
                f"kombu's sweep would run them again after the hour): {self.acks_lost[:5]}"
            )
        late = self.late_kills()
        lines += [
            f"- KILL BOUND EXCEEDED {k.task_id}: {k.death.name} died at "
            f"{k.death.at - self.origin:.1f}s, done "
            f"{'never' if k.done_at is None else f'{k.done_at - k.death.at:.1f} s after'}"
            f" (bound {bound(k):.1f} s)"
            for k in late
        ]
        return "\n".join(lines) + "\n"

    def late_kills(self) -> list[KilledTask]:
        """A dead worker's tasks not done within one cycle + their own time + the margin."""
        return [k for k in self.killed if k.done_at is None or k.done_at - k.death.at > bound(k)]

    def problems(self) -> list[str]:
        """What breaks the campaign's invariants (BRPOP-window losses are reported, not here)."""
        out = [
            f"{f.kind}: {f.detail}"
            for f in self.faults
            if f.detail.startswith(INJECTION_FAILED) or NOT_HEALED in f.detail
        ]
        if self.findings.lost:
            out.append(f"{len(self.findings.lost)} lost: {sorted(self.findings.lost)[:5]}")
        if self.findings.twice_alive:
            out.append(f"{len(self.findings.twice_alive)} run twice while their worker lived")
        if late := self.late_kills():
            out.append(f"{len(late)} of a dead worker's tasks past the kill bound")
        return out


def bound(k: KilledTask) -> float:
    return CYCLE_S + k.own_s + KILL_MARGIN_S


def run_campaign(
    stack: ChaosStack, seed: int, duration_s: float, out: Callable[[str], None] = print
) -> Campaign:
    """Load, faults, settle, check: one campaign on a healthy stack."""
    faults = schedule(seed, duration_s)
    out(
        f"nemesis: seed {seed}, duration {duration_s:.0f} s; replay: make nemesis "
        f"DURATION={duration_s:.0f}s SEED={seed}"
    )
    out(
        "schedule: "
        + ", ".join(
            f"{f.at_s}s {f.kind}"
            + (f" {f.seconds}s" if f.seconds else "")
            + (
                f" {f.service}"
                if "busy" in f.kind or f.kind in ("sigstop", "consumer_cancel")
                else ""
            )
            for f in faults
        )
    )
    assert stack.app is not None
    started = time.monotonic()
    deaths = DeathLog(stack.project.name)
    collector = RecordCollector(stack.records_url)
    load = LoadGenerator(stack.app, plan_load(seed, duration_s), seed)
    nemesis = Nemesis(stack, load, deaths)
    records: list[FaultRecord] = []
    deaths.start()
    collector.start()
    origin = time.time()
    load.start(origin)
    try:
        for f in faults:
            time.sleep(max(0.0, origin + f.at_s - time.time()))
            try:
                record = FAULTS[f.kind](nemesis, f)
            except Exception as exc:  # reported as a problem; the campaign goes on and checks
                record = FaultRecord(f.kind, time.time(), time.time(), f"{INJECTION_FAILED}: "
                                     f"{type(exc).__name__}: {str(exc)[-500:]}")  # fmt: skip
            records.append(record)
            out(record.line(origin))
        load.join()
        ids = [s.task_id for s in load.sent]
        load_ended = time.monotonic()

        def settled() -> bool:
            """All done; or, 15 s on, every undone id is on no broker list and never started (a
            message lost in kombu's BRPOP window never comes back: no use waiting for it)."""
            undone = set(ids) - set(stack.effects.counts(ids))
            if not undone or time.monotonic() - load_ended < 15:
                return not undone
            return not (undone & set(collector.starts)) and not broker_places(
                stack.broker_url, QUEUE_OF.values(), undone
            )

        try:
            wait_until(
                f"all {len(ids)} campaign tasks done", settled, deadline_s=SETTLE_S, every_s=1.0
            )
        except AssertionError as exc:
            out(str(exc))
    finally:
        load.stop()
        collector.stop()
        deaths.stop()
    ids = [s.task_id for s in load.sent]
    done_at = stack.effects.done_at(ids)
    places = broker_places(stack.broker_url, QUEUE_OF.values(), set(ids) - set(done_at))
    findings = check(load.sent, collector.starts, done_at, deaths, places, SERVICE_OF)
    killed = killed_tasks(findings, collector.starts, deaths)
    campaign = Campaign(
        seed,
        duration_s,
        origin,
        records,
        findings,
        killed,
        collector.gaps,
        time.monotonic() - started,
    )
    if findings.lost:  # what the workers logged about them, for the report
        out(stack.missing_report(sorted(findings.lost)))
    # Entries still unacked for tasks that are done: acks Redis never got (a restart or a pause
    # at the ack). The sweep gives them back after the hour; do that step now so the stack is
    # clean for what follows (the effect absorbs the second run; the checker has its figures).
    campaign.acks_lost = stack.give_back_lost_acks(sorted(done_at), wait_s=5)
    return campaign


def parse_duration(text: str) -> float:
    """30m, 90s, 1h, or plain seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 30m, 90s, 1h or seconds")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--table", type=Path, default=Path("nemesis-table.md"))
    parser.add_argument(
        "--logs", type=Path, default=None,
        help="write the stack's logs (every container still there, timestamped) to this file",
    )  # fmt: skip
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(f"nemesis seed {seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nemesis-") as tmp, chaos_stack(Path(tmp)) as stack:
        stack.healthy(deadline_s=120)
        campaign = run_campaign(
            stack, seed, args.duration, out=lambda line: print(line, flush=True)
        )
        report = campaign.report()
        problems = campaign.problems()
        try:
            stack.healthy(deadline_s=120)
        except AssertionError as exc:
            problems.append(f"the stack did not come back healthy: {exc}")
        if args.logs is not None:
            logs = stack.project.run("logs", "--timestamps", "--no-color", check=False)
            args.logs.write_text(logs.stdout + logs.stderr)
    args.table.write_text(report)
    print(report)
    print(f"table written to {args.table}; {'; '.join(problems) or 'no invariant broken'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
