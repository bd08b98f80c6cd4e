"""The OpenAPI document of a gateway: per pool, the signals it takes and their ``Params``.

FastAPI documents the routes it knows (``/pools/{pool}/call`` and the rest) from their
signatures; what it cannot know is which signal types each pool routes and what ``data``
each expects. This module lists them from the agents' routes: per pool, one path per way
of calling it, whose body is one of that pool's signal types, each with its action's
``Params`` JSON schema. A client generated from the document gets a method per pool.

The document is the gateway's contract, exact: every query parameter bounded as the
server checks it (:mod:`celery_warmpool.core.arguments`), every signal schema what
:class:`~celery_warmpool.core.signal.Signal` takes, and per route every status the server
answers with and the problem body of each (from :data:`.problems.PROBLEM_TYPES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from ..core.action import Action
from ..core.arguments import MAX_SECONDS, MIN_SECONDS
from ..core.errors import (
    ActionFailed,
    AgentLost,
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    ConfigurationError,
    InvalidArgument,
    InvalidSignal,
    PoolBusy,
    UnknownPool,
    UnknownSignal,
    WarmPoolError,
    WorkerFailed,
)
from ..core.reply import AgentReply
from ..core.signal import SPECVERSION
from ..core.spec import PoolSpec
from ..core.status import PoolStatus
from .problems import MEDIA_TYPE, problem_schemas

__all__ = ["SignalRoute", "extend", "pool_paths", "routes_of", "signal_schemas"]

_COMPONENT = re.compile(r"[^A-Za-z0-9._-]")
_SCHEMAS = "#/components/schemas/"
_REPLY = {"$ref": f"{_SCHEMAS}AgentReply"}
_Kinds = tuple[type[WarmPoolError] | str, ...]
#: What each status of a way of calling a pool means: the problems it may carry (an
#: exception, or a problem about the request itself by its name in
#: :data:`.problems.REQUEST_PROBLEMS`), and what to say of it.
_CALL_ERRORS: dict[str, tuple[_Kinds, str]] = {
    "413": (("ContentTooLarge",), "The body is over the gateway's limit"),
    "422": ((InvalidSignal, UnknownSignal, InvalidArgument),
            "The signal is invalid or of a type no route takes, or a query parameter is "
            "out of range"),
    "429": ((PoolBusy,), "The pool is at its max_queued: refused, never queued "
            "(Retry-After: seconds until the calls waiting have drained)"),
    "500": ((ActionFailed,), "The action failed (the agent's state is unchanged)"),
    "502": ((AgentLost, WorkerFailed), "The process running the call died, or failed"),
    "503": ((CheckoutTimeout, BrokerUnavailable, PoolBusy),
            "No agent was free in time (with Retry-After), the broker is away, or the pool "
            "is at its max_queued with no agent serving it anywhere"),
    "504": ((CallTimeout,), "The work outlasted call_timeout; its agent is replaced"),
}
_CAST_ERRORS: dict[str, tuple[_Kinds, str]] = {
    "413": _CALL_ERRORS["413"],
    "422": ((InvalidSignal, InvalidArgument),
            "The signal is invalid, or a query parameter is out of range"),
    "429": _CALL_ERRORS["429"],
    "503": ((BrokerUnavailable, PoolBusy),
            "The broker is away, or the pool is at its max_queued with no agent serving it "
            "anywhere"),
}
_STREAM_ERRORS: dict[str, tuple[_Kinds, str]] = {
    **_CALL_ERRORS,
    "500": ((ActionFailed, ConfigurationError),
            "The action failed before its first chunk, or the result store cannot carry "
            "streams (only Redis can)"),
}
_STATUS_ERRORS: dict[str, tuple[_Kinds, str]] = {
    "404": ((UnknownPool,), "No node hosting the pool answered in time"),
    "413": _CALL_ERRORS["413"],
    "422": ((InvalidArgument,), "The timeout is out of range"),
    "503": ((BrokerUnavailable,), "The broker is away"),
}
_POOLS_ERRORS: dict[str, tuple[_Kinds, str]] = {
    "413": _CALL_ERRORS["413"],
    "503": ((BrokerUnavailable,), "The broker is away"),
}
_HEALTH_ERRORS: dict[str, tuple[_Kinds, str]] = {
    "413": _CALL_ERRORS["413"],
    "503": (("Unavailable",), "The broker or the result store is not reachable"),
}
#: The problem of a request without the token (or with the wrong one).
_UNAUTHORIZED: dict[str, tuple[_Kinds, str]] = {
    "401": (("Unauthorized",), "No token, or the wrong one (WWW-Authenticate: Bearer)")}
_DATETIME = {"type": "string", "format": "date-time"}


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
        # The agent refuses unknown keys of data whatever the model's own configuration
        # says (nested models keep theirs).
        params["additionalProperties"] = False
        components[f"{name}.Params"] = params
        components.update(definitions)
        components[f"{name}.Signal"] = _signal_schema(route, f"{_SCHEMAS}{name}.Params",
                                                      bool(params.get("required")))
        signals.append({"$ref": f"{_SCHEMAS}{name}.Signal"})
    return signals, components


def pool_paths(spec: PoolSpec, *, token: bool = False) -> tuple[dict[str, Any],
                                                                 dict[str, Any]]:
    """The paths of ``spec``'s pool (call, cast, stream, status) and their components;
    with ``token``, each answers ``401`` without it."""
    signals, components = signal_schemas(spec)
    body = {"required": True, "content": {"application/json": {"schema": {
        "oneOf": signals}}}}
    guarded = _UNAUTHORIZED if token else {}
    pool, base = spec.name, f"/pools/{spec.name}"
    call = {"200": _json("The agent's reply", _REPLY)}
    cast = {"202": _json("Accepted: the task's id", {
        "type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]})}
    stream = {"200": {"description": "Server-sent events: a 'chunk' event per chunk, then "
                                     "one 'reply' or one 'error' event",
                      "content": {"text/event-stream": _event_stream()}}}
    status = {"200": _json("The pool's status", {"$ref": f"{_SCHEMAS}PoolStatus"})}
    paths = {
        f"{base}/call": {"post": _operation(
            pool, "call", f"Handle a signal on an agent of pool {pool!r}; its reply.",
            _timeouts(5.0, 5.0, none=""), call, {**guarded, **_CALL_ERRORS}, body)},
        f"{base}/cast": {"post": _operation(
            pool, "cast", f"Send a signal to pool {pool!r} without waiting for its reply.",
            _timeouts(None, None, none=" (omitted: no deadline)"), cast,
            {**guarded, **_CAST_ERRORS}, body)},
        f"{base}/stream": {"post": _operation(
            pool, "stream", f"Handle a signal on pool {pool!r}, its chunks sent as made.",
            _timeouts(5.0, 60.0, none=""), stream, {**guarded, **_STREAM_ERRORS}, body)},
        f"{base}/status": {"get": _operation(
            pool, "status", f"Pool {pool!r} over every node hosting it.",
            [_query("timeout", 1.0, "seconds to wait for the nodes")], status,
            {**guarded, **_STATUS_ERRORS})},
    }
    return paths, components


def extend(document: dict[str, Any], specs: list[PoolSpec], *, token: bool) -> dict[str, Any]:
    """``document`` (FastAPI's) with every pool's paths and schemas added, and the
    responses of ``/pools`` and ``/healthz`` told as exactly as the pools'."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(problem_schemas(_SCHEMAS))
    for model in (AgentReply, PoolStatus):
        # Responses: as they are written (a status's backlog and its parts included).
        found, definitions = _params_schema(model, "", mode="serialization")
        schemas[model.__name__] = found
        schemas.update(definitions)
    paths = document.setdefault("paths", {})
    for spec in specs:
        pool, pool_components = pool_paths(spec, token=token)
        paths.update(pool)
        schemas.update(pool_components)
    guarded = _UNAUTHORIZED if token else {}
    if "/pools" in paths:
        paths["/pools"]["get"]["responses"] = {
            "200": _json("Every pool served: its options, signal types and live nodes",
                         {"type": "object", "properties": {"pools": {"type": "array"}},
                          "required": ["pools"]}),
            **_problems({**guarded, **_POOLS_ERRORS})}
    if "/healthz" in paths:
        paths["/healthz"]["get"]["responses"] = {
            "200": _json("The broker and the result store answer", {
                "type": "object", "required": ["broker", "result_store"],
                "properties": {"broker": {"const": "ok"}, "result_store": {"const": "ok"}}}),
            **_problems(_HEALTH_ERRORS)}
        paths["/healthz"]["get"]["security"] = []  # open: a load balancer carries no token
    if token:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _params_schema(model: type[BaseModel], prefix: str,
                   mode: JsonSchemaMode = "validation") -> tuple[dict[str, Any],
                                                                 dict[str, Any]]:
    """``model``'s JSON schema, its nested models moved to components named ``prefix...``."""
    schema = model.model_json_schema(ref_template=f"{_SCHEMAS}{prefix}{{model}}", mode=mode)
    definitions = schema.pop("$defs", {})
    return schema, {f"{prefix}{name}": value for name, value in definitions.items()}


def _signal_schema(route: SignalRoute, params: str, data_required: bool) -> dict[str, Any]:
    """What :class:`Signal` takes for ``route``: its attributes, none other."""
    if route.is_pattern:
        kind: dict[str, Any] = {"type": "string", "pattern": _pattern_regex(route.type)}
    else:
        kind = {"type": "string", "const": route.type, "enum": [route.type]}
    # data left out (or null) is taken as {}: fine unless Params requires a field.
    data = {"$ref": params} if data_required else {"anyOf": [{"$ref": params},
                                                            {"type": "null"}]}
    return {
        "type": "object",
        "title": f"{route.type} ({route.action.name})",
        "description": f"A signal routed to action {route.action.name!r}"
                       + (" (streams: use /stream)" if route.streams else ""),
        "properties": {
            "type": kind, "data": data,
            "id": {"type": "string", "minLength": 1},
            "source": {"type": "string", "minLength": 1},
            "subject": {"type": ["string", "null"]},
            "time": _DATETIME,
            "specversion": {"type": "string", "const": SPECVERSION},
            "datacontenttype": {"type": "string", "pattern": r"^(application/json|.*\+json)$"},
            "dataschema": {"type": ["string", "null"]},
        },
        "required": ["type", "data"] if data_required else ["type"],
        "additionalProperties": False,
    }


def _pattern_regex(route: str) -> str:
    parts = []
    for segment in route.split("."):
        parts.append({"*": r"[^.]+", "**": r".*"}.get(segment, re.escape(segment)))
    return "^" + r"\.".join(parts) + "$"


def _operation(pool: str, kind: str, summary: str, parameters: list[dict[str, Any]],
               answers: dict[str, Any], errors: dict[str, tuple[_Kinds, str]],
               body: dict[str, Any] | None = None) -> dict[str, Any]:
    operation = {"tags": [pool], "operationId": f"{pool}_{kind}", "summary": summary,
                 "parameters": parameters, "responses": {**answers, **_problems(errors)}}
    if body is not None:
        operation["requestBody"] = body
    return operation


def _problems(errors: dict[str, tuple[_Kinds, str]]) -> dict[str, Any]:
    """The responses of ``errors``: per status, one of its problems."""
    responses = {}
    for status, (kinds, description) in errors.items():
        refs = [{"$ref": f"{_SCHEMAS}Problem.{_name(kind)}"} for kind in kinds]
        response = _json(description, refs[0] if len(refs) == 1 else {"oneOf": refs},
                         media=MEDIA_TYPE)
        if CheckoutTimeout in kinds or PoolBusy in kinds:
            response["headers"] = {"Retry-After": {
                "description": "seconds to wait before trying again (a pool with no agent "
                               "free in time, or at its max_queued)",
                "schema": {"type": "integer", "minimum": 1}}}
        responses[status] = response
    return responses


def _name(kind: type[WarmPoolError] | str) -> str:
    return kind if isinstance(kind, str) else kind.__name__


def _event_stream() -> dict[str, Any]:
    """The ``text/event-stream`` of a stream: its events, each ``event: <name>`` and one
    ``data:`` line of JSON, described as OpenAPI 3.2 describes a stream's items (here as
    ``x-itemSchema``, which 3.1 tools ignore)."""
    def event(name: str, data: dict[str, Any], description: str) -> dict[str, Any]:
        return {"type": "object", "title": name, "description": description,
                "required": ["event", "data"],
                "properties": {"event": {"const": name},
                               "data": {"type": "string", "contentMediaType": "application/json",
                                        "contentSchema": data}}}

    # What can end a stream once it has begun: not the request's own faults, nor what
    # is told before its first chunk (a refusal at the bound, a store without streams).
    before = (ConfigurationError, PoolBusy)
    errors = [{"$ref": f"{_SCHEMAS}Problem.{_name(kind)}"}
              for status, (kinds, _) in _STREAM_ERRORS.items() if status not in ("413", "422")
              for kind in kinds if kind not in before]
    return {
        "schema": {"type": "string", "description":
                   "Server-sent events: 'chunk' (the chunk, as JSON) for each chunk in order, "
                   "then one 'reply' (the AgentReply) or one 'error' (a problem). Comment "
                   "lines keep an idle stream open."},
        "x-itemSchema": {"oneOf": [
            event("chunk", {}, "One chunk, as the action yielded it"),
            event("reply", _REPLY, "The final reply; the stream ends"),
            event("error", {"oneOf": errors}, "The error that ended the stream"),
        ]},
    }


def _timeouts(timeout: float | None, call_timeout: float | None, *,
              none: str) -> list[dict[str, Any]]:
    return [_query("timeout", timeout, f"seconds the call may wait to start{none}"),
            _query("call_timeout", call_timeout,
                   "seconds the work may take (omitted" + (
                       f": {call_timeout:g}" if call_timeout is not None else ": no bound")
                   + ")")]


def _query(name: str, default: float | None, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number", "minimum": MIN_SECONDS,
                              "maximum": MAX_SECONDS}
    if default is not None:
        schema["default"] = default
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": f"{description}; from {MIN_SECONDS:g} to {MAX_SECONDS:g}"}


def _json(description: str, schema: dict[str, Any],
          media: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}
