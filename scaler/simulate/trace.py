"""The load a simulation replays: recorded arrivals (CSV) or synthetic generators (YAML).

A recorded trace is what really arrived, so it is the honest way to compare policies on one's own
traffic; generators describe shapes a recording may lack (a burst, a day curve, random arrivals)
so a policy can be tried against them before they happen. Both become the same thing: per queue,
a sorted list of ``(t, count)`` arrivals, seconds from the start.

CSV: a header ``t,queue,count`` (lines starting with ``#`` are comments; a recorder writes one),
one row per publish time, rows in any order. YAML::

    duration_s: 600            # optional when every generator ends
    load:
      - {kind: burst, queue: io_intensive, at: 10, count: 900, spread_s: 2.5}
      - {kind: constant, queue: default, rate: 2, start: 0, end: 300}          # tasks/s
      - {kind: diurnal, queue: default, base: 0.5, peak: 4, period_s: 86400, phase_s: 0}
      - {kind: poisson, queue: priority, rate: 0.2}
    model: {...}               # optional, see scaler.simulate.model

Every mistake is reported at once, each line naming the file, the line or field, the value and
what was expected (``TraceError.problems``), like ``scaler validate`` does for a policy.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scaler.policy import Policy
from scaler.problems import Problems, parse_yaml, read_text_file, validation_lines
from scaler.simulate.model import ModelError, ModelSpec, parse_model_spec

__all__ = [
    "Burst",
    "Constant",
    "Diurnal",
    "Poisson",
    "Trace",
    "TraceError",
    "load_trace",
    "parse_csv",
    "parse_trace_data",
]

HEADER = ("t", "queue", "count")


class TraceError(Problems):
    """A trace that cannot be used. ``problems`` holds one line per mistake."""


class _Gen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str = Field(min_length=1)


class _Window(_Gen):
    start: float = Field(default=0.0, ge=0)  # seconds from the trace's start
    end: float | None = Field(default=None, gt=0)  # default: the trace's duration_s

    @model_validator(mode="after")
    def _ordered(self) -> _Window:
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end {self.end:g} must be > start {self.start:g}")
        return self


class Constant(_Window):
    """``rate`` tasks/s: evenly spaced (``arrivals: even``) or a Poisson process."""

    kind: Literal["constant"]
    rate: float = Field(gt=0)
    arrivals: Literal["even", "poisson"] = "even"


class Poisson(_Window):
    """Random arrivals at ``rate`` tasks/s (exponential gaps), seeded by the run's seed."""

    kind: Literal["poisson"]
    rate: float = Field(gt=0)


class Diurnal(_Window):
    """A day curve: rate(t) = base + (peak - base) * (1 - cos(2 pi (t - phase_s) / period_s)) / 2.

    So the rate is ``base`` at ``phase_s`` and ``peak`` half a period later.
    """

    kind: Literal["diurnal"]
    base: float = Field(ge=0)
    peak: float = Field(gt=0)
    period_s: float = Field(default=86400.0, gt=0)
    phase_s: float = 0.0
    arrivals: Literal["even", "poisson"] = "even"

    @model_validator(mode="after")
    def _peak_over_base(self) -> Diurnal:
        if self.peak < self.base:
            raise ValueError(f"peak {self.peak:g} must be >= base {self.base:g}")
        return self

    def rate(self, t: float) -> float:
        return (
            self.base
            + (self.peak - self.base)
            * (1 - math.cos(2 * math.pi * (t - self.phase_s) / self.period_s))
            / 2
        )


class Burst(_Gen):
    """``count`` tasks at ``at``, or spread evenly over ``spread_s`` seconds from it."""

    kind: Literal["burst"]
    at: float = Field(ge=0)
    count: int = Field(ge=1)
    spread_s: float = Field(default=0.0, ge=0)


Generator = Annotated[Constant | Poisson | Diurnal | Burst, Field(discriminator="kind")]


class _TraceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    duration_s: float | None = Field(default=None, gt=0)
    load: list[Generator] = Field(min_length=1)
    model: Any = None  # validated by scaler.simulate.model, errors under "model."


@dataclass(frozen=True)
class Trace:
    """Load to replay: recorded rows and/or generators, over ``duration_s`` seconds."""

    source: str
    duration_s: float
    rows: tuple[tuple[float, str, int], ...] = ()
    generators: tuple[Constant | Poisson | Diurnal | Burst, ...] = ()
    model: ModelSpec | None = None
    _cache: dict[int, dict[str, list[tuple[float, int]]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def queues(self) -> set[str]:
        """Every queue the trace publishes to."""
        return {q for _, q, _ in self.rows} | {g.queue for g in self.generators}

    def check_queues(self, policy: Policy) -> None:
        """A queue no policy service consumes would pile up unseen: refuse it by name."""
        owned = {q: name for name, sp in policy.services.items() for q in sp.queues}
        stray = sorted(self.queues() - owned.keys())
        if stray:
            known = ", ".join(f"{s}: {list(sp.queues)}" for s, sp in policy.services.items())
            raise TraceError(
                [
                    f"{self.source}: queue {q!r} is not consumed by any service of the policy "
                    f"(services' queues: {known})"
                    for q in stray
                ]
            )

    def arrivals(self, seed: int = 0) -> dict[str, list[tuple[float, int]]]:
        """Per queue, ``(t, count)`` sorted by t (equal times merged); random generators draw
        from ``seed``, each from its own stream, so adding one generator changes no other."""
        if seed in self._cache:
            return self._cache[seed]
        per: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for t, q, n in self.rows:
            if n > 0:
                per[q].append((t, n))
        for i, gen in enumerate(self.generators):
            rng = random.Random(f"trace:{seed}:{i}")
            per[gen.queue].extend(_expand(gen, self.duration_s, rng))
        out = {q: _merged(rows) for q, rows in per.items()}
        self._cache.clear()
        self._cache[seed] = out
        return out

    def first_arrival(self, seed: int = 0) -> float | None:
        firsts = [a[0][0] for a in self.arrivals(seed).values() if a]
        return min(firsts) if firsts else None


def _merged(rows: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Sorted by time, equal times summed (each generator's output is sorted: timsort merges)."""
    rows.sort(key=_first)
    out: list[tuple[float, int]] = []
    last = -1.0
    for t, n in rows:
        if t == last:
            out[-1] = (t, out[-1][1] + n)
        else:
            out.append((t, n))
            last = t
    return out


def _first(row: tuple[float, int]) -> float:
    return row[0]


def _expand(gen: Any, duration: float, rng: random.Random) -> Iterable[tuple[float, int]]:
    if isinstance(gen, Burst):
        if gen.spread_s <= 0:
            yield gen.at, gen.count
            return
        step = gen.spread_s / gen.count
        for i in range(gen.count):
            yield gen.at + i * step, 1
        return
    start, end = gen.start, min(gen.end if gen.end is not None else duration, duration)
    if isinstance(gen, Constant) and gen.arrivals == "even":
        gap = 1.0 / gen.rate
        for i in range(math.ceil((end - start) * gen.rate)):
            t = start + i * gap
            if t < end:
                yield t, 1
        return
    if isinstance(gen, Constant | Poisson):
        t, expo = start, rng.expovariate
        while True:
            t += expo(gen.rate)
            if t >= end:
                return
            yield t, 1
    if isinstance(gen, Diurnal):
        yield from _diurnal(gen, start, end, rng)


def _diurnal(
    gen: Diurnal, start: float, end: float, rng: random.Random
) -> Iterable[tuple[float, int]]:
    if gen.arrivals == "poisson":
        # Thinning: candidates at the peak rate, each kept with probability rate(t) / peak.
        t, expo, draw, peak = start, rng.expovariate, rng.random, gen.peak
        while True:
            t += expo(peak)
            if t >= end:
                return
            if draw() * peak < gen.rate(t):
                yield t, 1
    # Even: a task each time the integral of the rate passes a whole number (1 s steps).
    acc, t = 0.0, start
    while t < end:
        dt = min(1.0, end - t)
        due = gen.rate(t + dt / 2) * dt
        acc += due
        n = int(acc)
        if n:
            acc -= n
            gap = dt / n
            for k in range(n):
                yield t + k * gap, 1
        t += dt


def parse_csv(text: str, source: str) -> Trace:
    """A recorded trace: ``t,queue,count`` rows (any order), ``#`` comments, blank lines."""
    problems: list[str] = []
    rows: list[tuple[float, str, int]] = []
    header_seen = False
    for lineno, line in enumerate(io.StringIO(text), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = next(csv.reader([stripped]))
        fields = [f.strip() for f in fields]
        if not header_seen:
            header_seen = True
            if tuple(f.lower() for f in fields) != HEADER:
                problems.append(
                    f"{source}:{lineno}: header {stripped!r} is invalid: expected 't,queue,count'"
                )
                break
            continue
        if tuple(f.lower() for f in fields) == HEADER:
            problems.append(
                f"{source}:{lineno}: a second header: this looks like a raw flight-recorder file "
                "with several segments (each counts from its own epoch); export it first with "
                "`scaler record export`"
            )
            continue
        if len(fields) != 3:
            problems.append(
                f"{source}:{lineno}: {stripped!r} is invalid: expected 3 fields t,queue,count, "
                f"got {len(fields)}"
            )
            continue
        raw_t, queue, raw_n = fields
        try:
            t = float(raw_t)
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            problems.append(
                f"{source}:{lineno}: t: {raw_t!r} is invalid: expected seconds from the start, "
                "a number >= 0"
            )
        if not queue:
            problems.append(f"{source}:{lineno}: queue: '' is invalid: expected a queue name")
        try:
            n = int(raw_n)
        except ValueError:
            n = -1
        if n < 0:
            problems.append(
                f"{source}:{lineno}: count: {raw_n!r} is invalid: expected an integer >= 0"
            )
        if math.isfinite(t) and t >= 0 and queue and n >= 0:
            rows.append((t, queue, n))
    if not header_seen:
        problems.append(f"{source}: no header: expected a first line 't,queue,count'")
    if problems:
        raise TraceError(problems)
    if not any(n for _, _, n in rows):
        raise TraceError([f"{source}: no tasks: every row is missing or has count 0"])
    duration = max(t for t, _, n in rows if n) + 1e-9
    return Trace(source, duration, rows=tuple(sorted(rows)))


def parse_trace_data(data: object, source: str) -> Trace:
    """A generator trace given as plain data (what ``yaml.safe_load`` returns)."""
    if not isinstance(data, Mapping):
        raise TraceError(
            [
                f"{source}: {type(data).__name__} is invalid: expected a mapping "
                "with load (a list of generators) and optionally duration_s, model"
            ]
        )
    problems: list[str] = []
    try:
        parsed = _TraceFile.model_validate(data)
    except ValidationError as exc:
        raise TraceError([f"{source}: {line}" for line in validation_lines(exc)]) from None
    model: ModelSpec | None = None
    if parsed.model is not None:
        try:
            model = parse_model_spec(parsed.model, f"{source}: model")
        except ModelError as exc:
            problems.extend(exc.problems)
    ends: list[float] = []
    open_ended: list[str] = []
    for i, g in enumerate(parsed.load):
        if isinstance(g, Burst):
            ends.append(g.at + g.spread_s + 1e-9)
        elif g.end is not None:
            ends.append(g.end)
        else:
            open_ended.append(f"load.{i} ({g.kind})")
    duration = parsed.duration_s
    if duration is None:
        if open_ended:
            problems.append(
                f"{source}: duration_s: required field is missing: {', '.join(open_ended)} "
                "has no end"
            )
        duration = max(ends, default=1.0)
    for i, g in enumerate(parsed.load):
        begin = g.at if isinstance(g, Burst) else g.start
        name = "at" if isinstance(g, Burst) else "start"
        if begin >= duration:
            problems.append(
                f"{source}: load.{i}.{name}: {begin:g} is invalid: must be < duration_s "
                f"({duration:g})"
            )
    if problems:
        raise TraceError(problems)
    return Trace(source, float(duration), generators=tuple(parsed.load), model=model)


def load_trace(path: str | Path) -> Trace:
    """Read a ``.csv`` recording or a ``.yaml``/``.yml`` generator file."""
    p = Path(path)
    text = read_text_file(p, "trace file", TraceError)
    if p.suffix.lower() == ".csv":
        return parse_csv(text, str(p))
    return parse_trace_data(parse_yaml(text, p, TraceError), str(p))
