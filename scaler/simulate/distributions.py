"""Random durations for the simulator: task run times, replica start-up and drain delays.

Written as one-key YAML mappings (``{fixed: 1.7}``, ``{uniform: [1, 2]}``,
``{lognormal: {median: 3, sigma: 0.1}}``, ``{exponential: {mean: 2}}``) because that is how a user
reads a measured figure off a benchmark: a constant, a range, or a median with a spread. Each is
validated by pydantic (extra keys are errors) and turned into a sampler bound to one
``random.Random``, so the engine draws without re-reading the spec per task.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Distribution", "Exponential", "Fixed", "LogNormal", "Sampler", "Uniform"]

Sampler = Callable[[], float]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Spec):
    """Always the same value (deterministic tests, or a figure with no measured spread)."""

    fixed: Annotated[float, Field(ge=0)]

    def sampler(self, rng: random.Random) -> Sampler:
        value = self.fixed
        return lambda: value

    def upper(self) -> float:
        return self.fixed

    def mean(self) -> float:
        return self.fixed


class Uniform(_Spec):
    """Uniform on [a, b]: bench/burst_drain.py's io tasks (1.0-2.0 s)."""

    uniform: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]]

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        a, b = self.uniform
        if b < a:
            raise ValueError(f"expected [low, high] with low <= high, got [{a:g}, {b:g}]")
        return self

    def sampler(self, rng: random.Random) -> Sampler:
        a, b = self.uniform
        draw = rng.random
        width = b - a
        return lambda: a + width * draw()

    def upper(self) -> float:
        return self.uniform[1]

    def mean(self) -> float:
        return (self.uniform[0] + self.uniform[1]) / 2


class _LogNormalParams(_Spec):
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)


class LogNormal(_Spec):
    """Median and sigma of log(x): a skewed delay such as a container start."""

    lognormal: _LogNormalParams

    def sampler(self, rng: random.Random) -> Sampler:
        mu, sigma = math.log(self.lognormal.median), self.lognormal.sigma
        gauss, exp = rng.gauss, math.exp  # gauss: Box-Muller, faster than normalvariate
        return lambda: exp(mu + sigma * gauss())

    def upper(self) -> float:
        # The 99.9th percentile (z = 3.09): "long enough" for horizons, not a hard bound.
        return self.lognormal.median * math.exp(3.09 * self.lognormal.sigma)

    def mean(self) -> float:
        return self.lognormal.median * math.exp(self.lognormal.sigma**2 / 2)


class _ExponentialParams(_Spec):
    mean: float = Field(gt=0)


class Exponential(_Spec):
    """Memoryless durations with this mean (the textbook M/M/c service time)."""

    exponential: _ExponentialParams

    def sampler(self, rng: random.Random) -> Sampler:
        rate = 1.0 / self.exponential.mean
        draw = rng.expovariate
        return lambda: draw(rate)

    def upper(self) -> float:
        return self.exponential.mean * math.log(1000.0)  # 99.9th percentile

    def mean(self) -> float:
        return self.exponential.mean


Distribution = Fixed | Uniform | LogNormal | Exponential


def describe(d: Any) -> str:
    """Short words for a distribution (tables, docs)."""
    if isinstance(d, Fixed):
        return f"{d.fixed:g}"
    if isinstance(d, Uniform):
        return f"uniform {d.uniform[0]:g}-{d.uniform[1]:g}"
    if isinstance(d, LogNormal):
        return f"lognormal median {d.lognormal.median:g} sigma {d.lognormal.sigma:g}"
    if isinstance(d, Exponential):
        return f"exponential mean {d.exponential.mean:g}"
    return repr(d)


_KINDS: dict[str, type[_Spec]] = {
    "fixed": Fixed,
    "uniform": Uniform,
    "lognormal": LogNormal,
    "exponential": Exponential,
}


def parse_distribution(value: Any) -> Any:
    """One of the four forms (a bare number means ``fixed``); a ValueError in words otherwise.

    Used as a pydantic before-validator, so the error lands on the field's path.
    """
    if isinstance(value, _Spec):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = {"fixed": value}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in _KINDS:
        raise ValueError(
            f"{value!r}: expected one of {{fixed: x}}, {{uniform: [a, b]}}, "
            "{lognormal: {median: m, sigma: s}}, {exponential: {mean: m}} or a number"
        )
    kind = next(iter(value))
    try:
        return _KINDS[kind].model_validate(value)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in getattr(exc, "errors", lambda: [])()
        )
        raise ValueError(f"{value!r}: invalid {kind} distribution ({details or exc})") from None
