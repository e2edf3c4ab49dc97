"""The OpenAPI 3.1 description of the gate's API, built from its route table (``app.ROUTES``).

Each route of the table is described here (``OPERATIONS``, by the route's name) and the
description is checked against the table as it is built: an operation for each route and none
other, the query parameters the route reads and no others, a request body exactly for the routes
that take one, its schema the pydantic model the route validates it with. A route added to the
table without a description here fails the build (and the tests), so the two cannot drift.
``GET /gate/v1/openapi.json`` serves the operations of the gate's own mode (a Compose project's
or a Swarm stack's); ``schema()`` without a mode describes the whole table.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import BaseModel

from scaler.gate import app
from scaler.gate.clone import ReplicaRequest
from scaler.gate.engine import API_VERSION

_REF = app.REF.removeprefix("(?P<ref>").removesuffix(")")
_FLAG = {
    "type": "string",
    "description": "a flag as the engine reads it: empty, 0, no, false or none is false; "
    "anything else true",
}
_INTEGER = "an integer in decimal"


def _filters(keys: frozenset[str]) -> dict[str, Any]:
    return {
        "type": "string",
        "description": "a JSON object of filter keys to lists of ASCII strings "
        '({"k": ["v"]}; the older {"k": {"v": true}} too), with only the keys '
        f"{sorted(keys)}; the gate adds the scope's labels",
    }


def _integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "description": _INTEGER}


_TIMESTAMP = {
    "type": "string",
    "pattern": app.TIMESTAMP.pattern,
    "description": "a Unix timestamp (seconds, optionally with a fraction)",
}
# Any case: the gate upper-cases the name (ASCII letters only).
_SIGNAL = {
    "type": "string",
    "pattern": r"^([Ss][Ii][Gg])?([Kk][Ii][Ll][Ll]|[Tt][Ee][Rr][Mm])$",
    "description": f"one of {sorted(app.SIGNALS)} (any case); another signal is 403",
}
_ERROR = {
    "type": "object",
    "properties": {"message": {"type": "string"}},
    "required": ["message"],
}
_ANY_JSON: dict[str, Any] = {}
_OBJECT = {"type": "object"}
_ROWS = {"type": "array", "items": {"type": "object"}}
_CONTAINER = {
    "type": "object",
    "properties": {"Id": {"type": "string"}, "Name": {"type": "string"}, "Config": _OBJECT},
    "required": ["Id", "Name", "Config"],
}
_STATUS = {
    "type": "object",
    "properties": {
        "scope": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "value": {"type": "string"}},
            "required": ["label", "value"],
        },
        "engine": {"type": "string"},
        "api_version": {"type": "string"},
        "started": {"type": "number"},
        "refused": {"type": "object", "additionalProperties": {"type": "integer"}},
        "refused_total": {"type": "integer"},
        "served": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["scope", "engine", "api_version", "started", "refused", "refused_total", "served"],
}
_VERSION = {
    "type": "object",
    "properties": {
        "Version": {"type": "string"},
        "GoVersion": {"type": "string"},
        "Os": {"type": "string"},
        "Arch": {"type": "string"},
        "ApiVersion": {"const": API_VERSION},
        "MinAPIVersion": {"const": API_VERSION},
    },
    "required": ["ApiVersion", "MinAPIVersion"],
    "additionalProperties": False,
}
_INFO = {
    "type": "object",
    "properties": {
        "Swarm": {
            "type": "object",
            "properties": {
                "LocalNodeState": {"type": "string"},
                "ControlAvailable": {"type": "boolean"},
                "NodeID": {"type": "string"},
            },
            "additionalProperties": False,
        }
    },
    "required": ["Swarm"],
    "additionalProperties": False,
}
_CREATED = {
    "type": "object",
    "properties": {"Id": {"type": "string"}, "Name": {"type": "string"}},
    "required": ["Id", "Name"],
    "additionalProperties": False,
}
_NULLABLE_STRING = {"type": ["string", "null"]}
_SNAPSHOT_ENTRY = {
    "type": "object",
    "properties": {
        "Id": {"type": "string"},
        "Name": {"type": "string"},
        "Created": _NULLABLE_STRING,
        "RestartCount": {"type": ["integer", "null"]},
        "Config": {
            "type": "object",
            "properties": {
                "Hostname": _NULLABLE_STRING,
                "Domainname": _NULLABLE_STRING,
                "Labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "Entrypoint": {"type": ["array", "null"], "items": {"type": "string"}},
                "Cmd": {"type": ["array", "null"], "items": {"type": "string"}},
            },
            "required": ["Labels"],
            "additionalProperties": False,
        },
        "State": _OBJECT,
        "HostConfig": {
            "type": "object",
            "properties": {
                k: {"type": ["integer", "null"]} for k in ("NanoCpus", "CpuQuota", "CpuPeriod")
            },
            "additionalProperties": False,
        },
    },
    "required": ["Id", "Name", "Config", "State", "HostConfig"],
    "additionalProperties": False,
}
_SNAPSHOT = {
    "type": "object",
    "properties": {
        "scope": _STATUS["properties"]["scope"],  # type: ignore[index]
        "updated": {"type": "number"},
        "checked": {"type": "number"},
        "containers": {"type": "array", "items": _SNAPSHOT_ENTRY},
    },
    "required": ["scope", "updated", "checked", "containers"],
    "additionalProperties": False,
}
_WAITED = {"type": "object", "properties": {"StatusCode": {"type": "integer"}}}

# Refusals any operation may answer (the gate's own, with a message), and the engine's trouble.
_ERRORS = {
    400: "a parameter, body, header or API version the gate does not read",
    401: "no valid bearer token",
    403: "not an operation of the gate (a path it does not serve, a value it never sends)",
    404: "no managed container or service of that name or id in the gate's scope",
    408: "the request did not arrive in time",
    413: "a body over 4 KiB",
    500: "an engine error passed on",
    502: "the engine is unreachable or its answer is not HTTP",
    503: "the engine's own 503 (not a swarm manager)",
    504: "the engine did not answer in time",
}
_ACTION_ERRORS = {409: "the engine's conflict (a container in a state that does not allow it)"}
_BODY_ERRORS = {
    **_ACTION_ERRORS,
    415: "the body is not application/json",
}


Answer = tuple[str, str | None, dict[str, Any] | None]  # description, media type, schema


@dataclass(frozen=True)
class Operation:
    """What the route table does not say of a route: a summary, its parameters' schemas, its
    body's model, its answers (status: description, media type, schema)."""

    summary: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers: dict[int, Answer] = field(default_factory=dict)
    model: type[BaseModel] | None = None
    errors: dict[int, str] = field(default_factory=dict)


def _json(description: str, schema: dict[str, Any]) -> Answer:
    return (description, "application/json", schema)


_NO_CONTENT: dict[int, Answer] = {204: ("done", None, None)}
_NOT_MODIFIED: dict[int, Answer] = {304: ("already so (the engine's 304)", None, None)}

OPERATIONS: dict[str, Operation] = {
    "GET /_ping": Operation(
        "the engine's ping", answers={200: ("OK", "text/plain", {"const": "OK"})}
    ),
    "HEAD /_ping": Operation(
        "the engine's ping, no body", answers={200: ("the engine answers", None, None)}
    ),
    "GET /version": Operation(
        "the engine's version; the API version the gate speaks",
        answers={200: _json("the version", _VERSION)},
    ),
    "GET /info": Operation(
        "only the swarm state of the engine", answers={200: _json("the swarm state", _INFO)}
    ),
    "GET /containers/json": Operation(
        "the managed containers",
        params={
            "all": _FLAG,
            "size": _FLAG,
            "limit": _integer(-1, 100_000),
            "filters": _filters(app.CONTAINER_FILTERS),
            "trunc_cmd": {**_FLAG, "description": "read and ignored (the docker CLI sends it)"},
        },
        answers={200: _json("the listing's rows", _ROWS)},
    ),
    "GET /containers/{ref}/json": Operation(
        "a managed container inspected; its environment's values hidden",
        answers={200: _json("the container", _CONTAINER)},
    ),
    "GET /containers/{ref}/stats": Operation(
        "a managed container's stats, once or streamed (one JSON object a line)",
        params={"stream": _FLAG, "one-shot": _FLAG},
        answers={200: _json("the stats, or their stream", _ANY_JSON)},
    ),
    "GET /events": Operation(
        "the managed containers' events (no exec_*), streamed one JSON object a line",
        params={
            "since": _TIMESTAMP,
            "until": _TIMESTAMP,
            "filters": _filters(app.EVENT_FILTERS),
        },
        answers={200: _json("the events' stream", _ANY_JSON)},
    ),
    "POST /containers/{ref}/start": Operation(
        "start a managed container",
        answers={**_NO_CONTENT, **_NOT_MODIFIED},
        errors=_ACTION_ERRORS,
    ),
    "POST /containers/{ref}/stop": Operation(
        "stop a managed container; t capped at its own StopTimeout",
        params={"t": _integer(0, 10**6)},
        answers={**_NO_CONTENT, **_NOT_MODIFIED},
        errors=_ACTION_ERRORS,
    ),
    "POST /containers/{ref}/kill": Operation(
        "signal a managed container (KILL or TERM only)",
        params={"signal": _SIGNAL},
        answers=_NO_CONTENT,
        errors=_ACTION_ERRORS,
    ),
    "POST /containers/{ref}/wait": Operation(
        "wait for a managed container",
        params={"condition": {"type": "string", "enum": list(app.WAIT_CONDITIONS)}},
        answers={200: _json("its exit", _WAITED)},
        errors=_ACTION_ERRORS,
    ),
    "DELETE /containers/{ref}": Operation(
        "remove a managed container (never its volumes: v or link true is 403)",
        params={"force": _FLAG, "v": _FLAG, "link": _FLAG},
        answers=_NO_CONTENT,
        errors=_ACTION_ERRORS,
    ),
    "GET /services": Operation(
        "the stack's managed services; their environment's values hidden (Swarm)",
        params={"filters": _filters(app.SERVICE_FILTERS), "status": _FLAG},
        answers={200: _json("the services", _ROWS)},
    ),
    "GET /tasks": Operation(
        "the tasks of the stack's managed services (Swarm)",
        params={"filters": _filters(app.TASK_FILTERS)},
        answers={200: _json("the tasks", _ROWS)},
    ),
    "GET /nodes": Operation(
        "the swarm's nodes, reduced (Swarm)",
        params={"filters": _filters(app.NODE_FILTERS)},
        answers={200: _json("the nodes", _ROWS)},
    ),
    "POST /gate/v1/replicas": Operation(
        "create (not start) a replica of a managed Compose service, cloned from its template",
        model=ReplicaRequest,
        answers={201: _json("the clone", _CREATED)},
        errors=_BODY_ERRORS,
    ),
    "POST /gate/v1/services/{ref}/scale": Operation(
        "set a managed service's replica count at its version (Swarm)",
        model=app.ScaleRequest,
        answers={200: _json("the engine's answer", _OBJECT)},
        errors=_BODY_ERRORS,
    ),
    "GET /gate/v1/snapshot": Operation(
        "the managed containers as the gate keeps them from the engine's events (Compose): id, "
        "name, labels, command line, state, health status, times, exit code, CPU limit; never "
        "the environment",
        answers={200: _json("the snapshot", _SNAPSHOT)},
        errors={
            404: "this gate keeps no snapshot (GATE_SNAPSHOT=0): list the containers instead",
            503: "the snapshot is not ready (starting, or listing again after a break in "
            "the engine's event stream): list the containers instead",
        },
    ),
    "GET /gate/v1/status": Operation(
        "the gate's scope and counters", answers={200: _json("the status", _STATUS)}
    ),
    "GET /gate/v1/openapi.json": Operation(
        "this description (the operations of the gate's mode)",
        answers={200: _json("the OpenAPI document", _OBJECT)},
    ),
}


def _path(route: app.Route) -> str:
    return route.name.split(" ", 1)[1]


def _operation(route: app.Route) -> dict[str, Any]:
    described = OPERATIONS.get(route.name)
    if described is None:
        raise ValueError(f"route {route.name!r} of app.ROUTES has no description in OPERATIONS")
    if set(described.params) != set(route.params):
        raise ValueError(
            f"{route.name}: described parameters {sorted(described.params)} are not the "
            f"route's {sorted(route.params)}"
        )
    if (described.model is not None) != route.body:
        raise ValueError(f"{route.name}: a body model exactly when the route takes a body")
    parameters: list[dict[str, Any]] = []
    for name in re.findall(r"\{(\w+)\}", _path(route)):
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": "a container's (or service's) name or id",
                "schema": {"type": "string", "pattern": f"^{_REF}$"},
            }
        )
    for name in sorted(described.params):
        parameters.append(
            {"name": name, "in": "query", "required": False, "schema": described.params[name]}
        )
    responses: dict[str, Any] = {}
    for status, (description, media, schema) in described.answers.items():
        answer: dict[str, Any] = {"description": description}
        if media is not None:
            answer["content"] = {media: {"schema": schema}}
        responses[str(status)] = answer
    for status, description in {**_ERRORS, **described.errors}.items():
        responses[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": _ERROR}},
        }
    out: dict[str, Any] = {
        "operationId": route.handler.__name__ + ("_head" if route.method == "HEAD" else ""),
        "summary": described.summary,
        "parameters": parameters,
        "responses": dict(sorted(responses.items())),
    }
    if route.mode != "any":
        out["tags"] = ["compose" if route.mode == "project" else "swarm"]
    if described.model is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": described.model.model_json_schema()}},
        }
    return out


@cache
def _schema(kind: str | None) -> dict[str, Any]:
    unknown = set(OPERATIONS) - {r.name for r in app.ROUTES}
    if unknown:
        raise ValueError(f"OPERATIONS describes {sorted(unknown)}, which app.ROUTES does not have")
    paths: dict[str, dict[str, Any]] = {}
    for route in app.ROUTES:
        if kind is not None and route.mode not in ("any", kind):
            continue
        paths.setdefault(_path(route), {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "The engine gate",
            "version": API_VERSION,
            "description": (
                "The only operations the scaler may ask of the Docker engine, each bounded to "
                "the managed workers of the gate's Compose project or Swarm stack (docs/gate.md). "
                f"A path may carry an API version prefix /v1.NN (NN >= {API_VERSION[2:]}) but for "
                "the gate's own (/gate/v1/...); a body only on the gate's own operations."
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "GATE_TOKEN"}
            }
        },
        "security": [{"bearer": []}],
    }


def schema(kind: str | None = None) -> dict[str, Any]:
    """The description of the operations a gate of ``kind`` ("project" or "stack") serves, or of
    the whole route table (None)."""
    return copy.deepcopy(_schema(kind))
