"""The OpenAPI document of a gateway: per pool, the signals it takes and their ``Params``.

FastAPI documents the routes it knows (``/pools/{pool}/call`` and the rest) from their
signatures; what it cannot know is which signal types each pool routes and what ``data``
each expects. This module lists them from the agents' routes: per pool, one path per way
of calling it, whose body is one of that pool's signal types, each with its action's
``Params`` JSON schema. A client generated from the document gets a method per pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ..core.action import Action
from ..core.reply import AgentReply
from ..core.spec import PoolSpec
from ..core.status import PoolStatus

__all__ = ["SignalRoute", "extend", "pool_paths", "routes_of", "signal_schemas"]

_COMPONENT = re.compile(r"[^A-Za-z0-9._-]")
_SCHEMAS = "#/components/schemas/"
_PROBLEM = {"$ref": f"{_SCHEMAS}Problem"}
_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details, plus the error's own fields (pool, waited...)",
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer"}, "detail": {"type": "string"}},
    "required": ["type", "title", "status"],
}
#: The statuses each way of calling can answer with a problem.
_CALL_ERRORS = {"404": "UnknownPool", "422": "InvalidSignal or UnknownSignal",
                "500": "ActionFailed", "502": "AgentLost",
                "503": "CheckoutTimeout (with Retry-After) or BrokerUnavailable",
                "504": "CallTimeout"}


@dataclass(frozen=True)
class SignalRoute:
    """One route of a pool's agent: a signal type (or pattern) and its action."""

    type: str
    action: Action

    @property
    def streams(self) -> bool:
        """Whether the action streams (its ``run`` is a generator)."""
        return bool(getattr(self.action, "streams", False))

    @property
    def is_pattern(self) -> bool:
        return any(segment in ("*", "**") for segment in self.type.split("."))

    def describe(self) -> dict[str, Any]:
        """What ``GET /pools`` tells of the route."""
        return {"type": self.type, "action": self.action.name, "streams": self.streams,
                "pattern": self.is_pattern}


def routes_of(spec: PoolSpec) -> list[SignalRoute]:
    """Every route of ``spec``'s agent, in the order of the route names."""
    agent = spec.agent
    return [SignalRoute(route, agent.route(route)) for route in sorted(agent.signal_routes)]


def signal_schemas(spec: PoolSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One signal schema per route of ``spec`` and the components they refer to."""
    signals: list[dict[str, Any]] = []
    components: dict[str, Any] = {}
    for route in routes_of(spec):
        name = _COMPONENT.sub("_", f"{spec.name}.{route.type}")
        params, definitions = _params_schema(route.action.Params, f"{name}.")
        components[f"{name}.Params"] = params
        components.update(definitions)
        components[f"{name}.Signal"] = _signal_schema(route, f"{_SCHEMAS}{name}.Params",
                                                      bool(params.get("required")))
        signals.append({"$ref": f"{_SCHEMAS}{name}.Signal"})
    return signals, components


def pool_paths(spec: PoolSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The paths of ``spec``'s pool (call, cast, stream, status) and their components."""
    signals, components = signal_schemas(spec)
    body = {"required": True, "content": {"application/json": {"schema": {
        "oneOf": signals}}}}
    tag = [spec.name]
    base = f"/pools/{spec.name}"
    paths = {
        f"{base}/call": {"post": _operation(
            spec.name, "call", tag, body, _timeouts(5.0, 5.0),
            {"200": _json("The agent's reply", {"$ref": f"{_SCHEMAS}AgentReply"})},
            f"Handle a signal on an agent of pool {spec.name!r} and return its reply.")},
        f"{base}/cast": {"post": _operation(
            spec.name, "cast", tag, body, _timeouts(None, None),
            {"202": _json("Accepted: the task's id", {"type": "object", "properties": {
                "id": {"type": "string"}}, "required": ["id"]})},
            f"Send a signal to pool {spec.name!r} without waiting for its reply.")},
        f"{base}/stream": {"post": _operation(
            spec.name, "stream", tag, body, _timeouts(5.0, 60.0),
            {"200": {"description": "Server-sent events: 'chunk' per chunk (its JSON), then "
                                    "'reply' (the AgentReply) or 'error' (a problem)",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
            f"Handle a signal on pool {spec.name!r}, its chunks sent as they are made.")},
        f"{base}/status": {"get": {
            "tags": tag, "operationId": f"{spec.name}_status",
            "summary": f"Pool {spec.name!r} over every node hosting it.",
            "parameters": [_query("timeout", 1.0, "seconds to wait for the nodes")],
            "responses": {"200": _json("The pool's status", {"$ref": f"{_SCHEMAS}PoolStatus"}),
                          "404": _json("No node hosting the pool answered", _PROBLEM)}}},
    }
    return paths, components


def extend(document: dict[str, Any], specs: list[PoolSpec], *, token: bool) -> dict[str, Any]:
    """``document`` (FastAPI's) with every pool's paths and schemas added."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = _PROBLEM_SCHEMA
    for model in (AgentReply, PoolStatus):
        found, definitions = _params_schema(model, "")
        schemas[model.__name__] = found
        schemas.update(definitions)
    paths = document.setdefault("paths", {})
    for spec in specs:
        pool, pool_components = pool_paths(spec)
        paths.update(pool)
        schemas.update(pool_components)
    if token:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _params_schema(model: type[BaseModel], prefix: str) -> tuple[dict[str, Any],
                                                                   dict[str, Any]]:
    """``model``'s JSON schema, its nested models moved to components named ``prefix...``."""
    schema = model.model_json_schema(ref_template=f"{_SCHEMAS}{prefix}{{model}}")
    definitions = schema.pop("$defs", {})
    return schema, {f"{prefix}{name}": value for name, value in definitions.items()}


def _signal_schema(route: SignalRoute, params: str, data_required: bool) -> dict[str, Any]:
    if route.is_pattern:
        kind: dict[str, Any] = {"type": "string", "pattern": _pattern_regex(route.type)}
    else:
        kind = {"type": "string", "const": route.type, "enum": [route.type]}
    # A Params model rejects unknown keys whatever its own configuration says.
    data = {"allOf": [{"$ref": params}], "additionalProperties": False}
    return {
        "type": "object",
        "title": f"{route.type} ({route.action.name})",
        "description": f"A signal routed to action {route.action.name!r}"
                       + (" (streams: use /stream)" if route.streams else ""),
        "properties": {"type": kind, "data": data,
                       "id": {"type": "string"}, "source": {"type": "string"},
                       "subject": {"type": "string"}},
        "required": ["type", "data"] if data_required else ["type"],
    }


def _pattern_regex(route: str) -> str:
    parts = []
    for segment in route.split("."):
        parts.append({"*": r"[^.]+", "**": r".*"}.get(segment, re.escape(segment)))
    return "^" + r"\.".join(parts) + "$"


def _operation(pool: str, kind: str, tags: list[str], body: dict[str, Any],
               parameters: list[dict[str, Any]], responses: dict[str, Any],
               summary: str) -> dict[str, Any]:
    errors = {status: _json(what, _PROBLEM) for status, what in _CALL_ERRORS.items()}
    return {"tags": tags, "operationId": f"{pool}_{kind}", "summary": summary,
            "parameters": parameters, "requestBody": body,
            "responses": {**responses, **errors,
                          "413": _json("The body is over the gateway's limit", _PROBLEM)}}


def _timeouts(timeout: float | None, call_timeout: float | None) -> list[dict[str, Any]]:
    return [_query("timeout", timeout, "seconds the call may wait to start"),
            _query("call_timeout", call_timeout, "seconds the work may take")]


def _query(name: str, default: float | None, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number", "exclusiveMinimum": 0}
    if default is not None:
        schema["default"] = default
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    media = "application/problem+json" if schema is _PROBLEM else "application/json"
    return {"description": description, "content": {media: {"schema": schema}}}
