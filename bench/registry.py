"""The benchmarks ``python -m bench`` knows, in report order.

A benchmark module provides ``NAME``, ``TITLE``, ``run(ctx) -> Result``, ``render(result) -> str``
and ``plot(result, img_dir) -> list[Path]``. Add a new one here and it is run by ``make bench`` and
gets its section in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

from bench.context import Context
from bench.result import Result

# name -> module, in the order the report shows them
MODULES: dict[str, str] = {
    "reaction": "bench.reaction",
    "cold_start": "bench.cold_start",
    "burst_drain": "bench.burst_drain",
    "scaler_cost": "bench.scaler_cost",
    "swarm": "bench.swarm",  # after scaler_cost: it reads that run's result
    "throughput": "bench.throughput",
    "sim_fidelity": "bench.sim_fidelity",  # after burst_drain: it reads that run's result
    "sim_speed": "bench.sim_speed",
    "policy_comparison": "bench.policy_comparison",
}


class Benchmark(Protocol):
    """What a benchmark module provides."""

    NAME: str
    TITLE: str

    def run(self, ctx: Context) -> Result: ...

    def render(self, result: Result) -> str: ...

    def plot(self, result: Result, img_dir: Path) -> list[Path]: ...


def load(name: str) -> Benchmark:
    """The benchmark called ``name``; ValueError listing the known names otherwise."""
    if name not in MODULES:
        raise ValueError(f"benchmark {name!r} is unknown: expected one of {', '.join(MODULES)}")
    module: ModuleType = importlib.import_module(MODULES[name])
    return cast(Benchmark, module)
