"""The modelled backend: how workers, tasks and the host behave around the real decision core.

The simulator's answers are only as good as these numbers, so every default below is taken from
a measurement of this stack (or marked as an assumption) and says where it comes from:

======================  ==========================================  =============================
figure                  default                                     source
======================  ==========================================  =============================
startup_s (all)         lognormal median 3.05 s, sigma 0.1          docs/benchmarks.md bench 1:
                                                                    container start 0.45 s + worker
                                                                    ready 2.60 s (medians; worst
                                                                    0.61 + 3.01) on the loaded
                                                                    2-core VM; ../shared/docs/
                                                                    environment.md measured 1.7 s
                                                                    "docker run to ready" idle
promote_s (all)         uniform 0.007-0.03 s                        issue 14: a booted worker whose
                                                                    consumer was cancelled starts a
                                                                    waiting task 7 ms after
                                                                    add_consumer; + the backend's
                                                                    control call (assumption)
drain_s (all)           uniform 1-3 s                               assumption: the Compose
                                                                    backend drains idle workers
                                                                    only (cancel consumer, warm
                                                                    shutdown of an idle worker,
                                                                    remove); not benchmarked
concurrency             default 2, cpu 2, io 32, priority 2,        .env.example / compose.yaml
                        scheduled 1                                 (*_CONCURRENCY); cpu = CPUs
                                                                    (empty CPU_CONCURRENCY) on the
                                                                    2-core VM (benchmarks Machine)
cpu_limit_cores         default 1, cpu 2, io 1, priority 1,         compose/compose.prod.yaml
                        scheduled 0.5                               deploy.resources.limits.cpus
io task duration        uniform 1.0-2.0 s                           bench/burst_drain.py DURATION_S
io cpu_percent_per_task 0.8 % of the host                           bench 2: host CPU 25 % with 4
                                                                    io tasks running (static) and
                                                                    41 % with 24 (oracle):
                                                                    16 / 20 = 0.8 % per task
host base_cpu_percent   22 %                                        bench 2 static: 25 % - 4 x 0.8
host memory_percent     8 %                                         docs/demo-status.md (6.5-8.7 %)
host cpu_cores          2                                           docs/benchmarks.md Machine
cpu task                lognormal median 2 s, sigma 0.5; 50 %       assumption; one prefork
                                                                    process is one core of 2
default task            lognormal median 0.02 s, sigma 0.5; 25 %    bench 4: ~100 tasks/s on
                                                                    prefork -c 2 (20 ms a task);
                                                                    half a core busy: assumption
priority task           lognormal median 0.05 s, sigma 0.5; 25 %    assumption (expedite, health
                                                                    check: one DB write)
scheduled task          lognormal median 5 s, sigma 1; 25 %         assumption (daily cleanup,
                                                                    reports)
worker memory_percent   20 %                                        assumption (no figure)
======================  ==========================================  =============================

A service or queue the table does not name gets the generic default (concurrency 1, 1 s tasks).
Layers, lowest first: these defaults, the trace's ``model:`` section, then ``--model FILE``; each
is merged field by field, so ``{services: {worker-io: {concurrency: 4}}}`` changes one number.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from scaler.policy import Policy
from scaler.problems import Problems, parse_yaml, read_text_file, validation_lines
from scaler.simulate.distributions import (
    Exponential,
    Fixed,
    LogNormal,
    Uniform,
    parse_distribution,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_QUEUES",
    "DEFAULT_SERVICES",
    "HostModel",
    "Model",
    "ModelError",
    "ModelSpec",
    "QueueModel",
    "ServiceModel",
    "build_model",
    "load_model_spec",
    "parse_model_spec",
]

Dist = Annotated[Fixed | Uniform | LogNormal | Exponential, BeforeValidator(parse_distribution)]


class ModelError(Problems):
    """A model that cannot be used. ``problems`` holds one line per mistake."""


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently keep a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- what a file may say: every field optional, merged over the defaults ---


class ServiceSpec(_Strict):
    concurrency: int | None = Field(default=None, ge=1)
    startup_s: Dist | None = None
    drain_s: Dist | None = None
    promote_s: Dist | None = None
    cpu_limit_cores: float | None = Field(default=None, gt=0)
    memory_percent: float | None = Field(default=None, ge=0, le=100)


class QueueSpec(_Strict):
    duration_s: Dist | None = None
    cpu_percent_per_task: float | None = Field(default=None, ge=0, le=100)


class HostSpec(_Strict):
    cpu_cores: float | None = Field(default=None, gt=0)
    base_cpu_percent: float | None = Field(default=None, ge=0, le=100)
    memory_percent: float | None = Field(default=None, ge=0, le=100)
    # [[t, percent], ...]: from t on the host CPU reads percent (null: back to the model).
    host_cpu: list[tuple[Annotated[float, Field(ge=0)], float | None]] | None = None


class ModelSpec(_Strict):
    """One layer of model settings (a trace's ``model:`` section or a ``--model`` file)."""

    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    queues: dict[str, QueueSpec] = Field(default_factory=dict)
    host: HostSpec = Field(default_factory=HostSpec)


# --- the resolved model the engine runs ---


class ServiceModel(_Strict):
    """One worker service: slots per replica and how long a replica takes to come and go."""

    concurrency: int = Field(ge=1)
    startup_s: Dist
    drain_s: Dist
    promote_s: Dist  # a warm replica's add_consumer to its first task taken
    cpu_limit_cores: float = Field(gt=0)
    memory_percent: float = Field(ge=0, le=100)


class QueueModel(_Strict):
    """One queue's tasks: how long one runs and what share of the host's CPU it uses."""

    duration_s: Dist
    cpu_percent_per_task: float = Field(ge=0, le=100)


class HostModel(_Strict):
    cpu_cores: float = Field(gt=0)
    base_cpu_percent: float = Field(ge=0, le=100)
    memory_percent: float = Field(ge=0, le=100)
    host_cpu: tuple[tuple[float, float | None], ...] = ()


class Model(_Strict):
    services: dict[str, ServiceModel]
    queues: dict[str, QueueModel]
    host: HostModel


_STARTUP: dict[str, Any] = {"lognormal": {"median": 3.05, "sigma": 0.1}}
_DRAIN: dict[str, Any] = {"uniform": [1.0, 3.0]}
_PROMOTE: dict[str, Any] = {"uniform": [0.007, 0.03]}


def _svc(concurrency: int, cores: float) -> dict[str, Any]:
    return {
        "concurrency": concurrency,
        "startup_s": _STARTUP,
        "drain_s": _DRAIN,
        "promote_s": _PROMOTE,
        "cpu_limit_cores": cores,
        "memory_percent": 20.0,
    }


#: Per worker service of the stack (see the module docstring for the sources).
DEFAULT_SERVICES: dict[str, dict[str, Any]] = {
    "worker-default": _svc(2, 1.0),
    "worker-cpu": _svc(2, 2.0),
    "worker-io": _svc(32, 1.0),
    "worker-priority": _svc(2, 1.0),
    "worker-scheduled": _svc(1, 0.5),
}
GENERIC_SERVICE: dict[str, Any] = _svc(1, 1.0)

#: Per queue of the stack.
DEFAULT_QUEUES: dict[str, dict[str, Any]] = {
    "default": {
        "duration_s": {"lognormal": {"median": 0.02, "sigma": 0.5}},
        "cpu_percent_per_task": 25.0,
    },
    "cpu_intensive": {
        "duration_s": {"lognormal": {"median": 2.0, "sigma": 0.5}},
        "cpu_percent_per_task": 50.0,
    },
    "io_intensive": {"duration_s": {"uniform": [1.0, 2.0]}, "cpu_percent_per_task": 0.8},
    "priority": {
        "duration_s": {"lognormal": {"median": 0.05, "sigma": 0.5}},
        "cpu_percent_per_task": 25.0,
    },
    "scheduled": {
        "duration_s": {"lognormal": {"median": 5.0, "sigma": 1.0}},
        "cpu_percent_per_task": 25.0,
    },
}
GENERIC_QUEUE: dict[str, Any] = {"duration_s": {"fixed": 1.0}, "cpu_percent_per_task": 10.0}

DEFAULT_HOST: dict[str, Any] = {"cpu_cores": 2.0, "base_cpu_percent": 22.0, "memory_percent": 8.0}


def parse_model_spec(data: object, where: str) -> ModelSpec:
    """Validate one layer given as plain data; ``where`` (file and section) prefixes errors."""
    if data is None:
        return ModelSpec()
    if not isinstance(data, Mapping):
        raise ModelError(
            [f"{where}: {data!r} is invalid: expected a mapping with services, queues and/or host"]
        )
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise ModelError([f"{where}: {line}" for line in validation_lines(exc)]) from None


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read a ``--model`` YAML file (the same shape as a trace's ``model:`` section)."""
    p = Path(path)
    data = parse_yaml(read_text_file(p, "model file", ModelError), p, ModelError)
    return parse_model_spec(data, str(p))


def _layer(base: dict[str, Any], spec: BaseModel | None) -> dict[str, Any]:
    if spec is None:
        return base
    return {**base, **{k: v for k, v in spec.model_dump().items() if v is not None}}


def build_model(policy: Policy, *layers: ModelSpec | None) -> Model:
    """The complete model for every service and queue of ``policy``, layers applied in order."""
    services: dict[str, Any] = {}
    queues: dict[str, Any] = {}
    for name, sp in policy.services.items():
        svc = dict(DEFAULT_SERVICES.get(name, GENERIC_SERVICE))
        for layer in layers:
            svc = _layer(svc, layer.services.get(name) if layer else None)
        services[name] = svc
        for q in sp.queues:
            qm = dict(DEFAULT_QUEUES.get(q, GENERIC_QUEUE))
            for layer in layers:
                qm = _layer(qm, layer.queues.get(q) if layer else None)
            queues[q] = qm
    host = dict(DEFAULT_HOST)
    for layer in layers:
        host = _layer(host, layer.host if layer else None)
    if host.get("host_cpu") is not None:
        host["host_cpu"] = tuple(sorted((float(t), p) for t, p in host["host_cpu"]))
    try:
        return Model.model_validate({"services": services, "queues": queues, "host": host})
    except ValidationError as exc:
        raise ModelError(validation_lines(exc, "model")) from None
