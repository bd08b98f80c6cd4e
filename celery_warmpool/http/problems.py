"""Errors as RFC 9457 problem details (``application/problem+json``).

One table says which status and title each of the contract's exceptions gets; a problem
carries the exception's message as ``detail`` and its fields (``pool``, ``waited``, ...)
as members of its own. Nothing in a problem carries a traceback, and any URL in it has
its password masked, whatever the exception held. The same table gives the OpenAPI
document its problem schemas (:func:`problem_schemas`), so the two cannot disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from starlette.responses import JSONResponse

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

__all__ = ["MEDIA_TYPE", "PROBLEM_TYPES", "JSONBody", "Problem", "json_text", "problem_for",
           "problem_response", "problem_schemas"]

MEDIA_TYPE = "application/problem+json"
#: Seconds a caller whose call found no agent free in time is told to wait before it
#: tries again (a full pool's refusal computes its own: see PoolBusy.retry_after).
RETRY_AFTER = 1
#: ``scheme://user:password@`` in any text: the password is masked before it leaves.
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


class Problem(NamedTuple):
    """How one exception type is told over HTTP."""

    status: int
    title: str
    #: The exception's attributes that become the problem's own members, and the JSON
    #: schema of each (for the OpenAPI document).
    fields: dict[str, dict[str, Any]]
    #: The status and title when no agent serves the pool at all (its ``capacity`` is
    #: 0): the caller should not just wait and retry, as for a broker that is away.
    unserved: tuple[int, str] | None = None

    @property
    def statuses(self) -> list[int]:
        """Every status this problem is told with."""
        return [self.status, *([self.unserved[0]] if self.unserved else [])]


_TEXT: dict[str, Any] = {"type": ["string", "null"]}
_SECONDS: dict[str, Any] = {"type": "number"}
_COUNT: dict[str, Any] = {"type": "integer"}
_ERRORS: dict[str, Any] = {"type": "array", "items": {
    "type": "object", "properties": {"loc": {"type": "array"}, "msg": {"type": "string"},
                                     "type": {"type": "string"}}}}

#: The contract's exceptions, most specific first (the first ``isinstance`` match wins).
PROBLEM_TYPES: dict[type[WarmPoolError], Problem] = {
    UnknownPool: Problem(404, "Unknown pool", {"pool": _TEXT}),
    InvalidArgument: Problem(422, "Invalid argument", {
        "argument": _TEXT, "value": _TEXT, "allowed": _TEXT}),
    InvalidSignal: Problem(422, "Invalid signal", {"signal_type": _TEXT, "errors": _ERRORS}),
    UnknownSignal: Problem(422, "Unknown signal type", {"signal_type": _TEXT}),
    ActionFailed: Problem(500, "Action failed", {
        "signal_type": _TEXT, "action": _TEXT, "cause": _TEXT}),
    ConfigurationError: Problem(500, "Configuration error", {"pool": _TEXT, "field": _TEXT}),
    AgentLost: Problem(502, "Agent lost", {
        "pool": _TEXT, "node": _TEXT, "pid": {"type": ["integer", "null"]},
        "signal_type": _TEXT, "may_have_run": {"type": "boolean"}}),
    WorkerFailed: Problem(502, "Worker failed", {"pool": _TEXT, "cause": _TEXT}),
    PoolBusy: Problem(429, "Pool busy", {
        "pool": _TEXT, "count": _COUNT, "bound": _COUNT, "retry_after": _SECONDS,
        "capacity": _COUNT}, unserved=(503, "No agent serves the pool")),
    CheckoutTimeout: Problem(503, "No agent free in time", {
        "pool": _TEXT, "waited": _SECONDS, "size": _COUNT, "max_overflow": _COUNT}),
    BrokerUnavailable: Problem(503, "Broker unavailable", {"url": _TEXT, "waited": _SECONDS}),
    CallTimeout: Problem(504, "Call timed out", {"signal_type": _TEXT, "timeout": _SECONDS}),
}
_UNEXPECTED = Problem(500, "Internal error", {})
#: The problems about the request itself (``about:blank``), by name, with their members.
REQUEST_PROBLEMS: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {
    "Unauthorized": (401, {}),
    "ContentTooLarge": (413, {"max_body": _COUNT}),
    "Unavailable": (503, {"broker": {"type": "string"}, "result_store": {"type": "string"}}),
}


def problem_for(exc: BaseException) -> tuple[dict[str, Any], dict[str, str]]:
    """The problem document of ``exc`` and the headers its response carries.

    An exception outside the table is an internal error: its message is not told (it
    may hold anything), only its type.
    """
    kind, problem = _lookup(exc)
    status, title = problem.status, problem.title
    if problem.unserved is not None and getattr(exc, "capacity", None) == 0:
        status, title = problem.unserved
    body: dict[str, Any] = {
        "type": f"urn:celery-warmpool:error:{kind}",
        "title": title,
        "status": status,
        "detail": str(exc) if problem is not _UNEXPECTED else
        f"the gateway failed with {type(exc).__name__}; its log has the details",
    }
    for name in problem.fields:
        body[name] = getattr(exc, name, None)
    return masked(body), _retry_after(exc)


def _retry_after(exc: BaseException) -> dict[str, str]:
    """The ``Retry-After`` header of ``exc``, if it has one: for a full pool, the whole
    seconds its ``retry_after`` rounds up to (at least 1: HTTP counts whole seconds)."""
    if isinstance(exc, PoolBusy):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    if isinstance(exc, CheckoutTimeout):
        return {"Retry-After": str(RETRY_AFTER)}
    return {}


def http_problem(status: int, title: str, detail: str,
                 **members: Any) -> dict[str, Any]:
    """A problem about the request itself (no route, no token, too large): ``about:blank``
    with the HTTP status's own title, as RFC 9457 says."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail,
            **members}


def json_text(value: Any) -> str:
    """``value`` as JSON any client can parse, whatever it holds: ``NaN`` and infinities
    become ``null`` (as JavaScript writes them), and characters UTF-8 cannot carry (lone
    surrogates, which Python's JSON reader lets in) are escaped."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except ValueError:  # a float JSON has no word for, or UnicodeEncodeError
        return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))
    return text


class JSONBody(JSONResponse):
    """A JSON response rendered with :func:`json_text`: never a failure of its own."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


def problem_response(body: dict[str, Any], headers: Mapping[str, str] | None = None,
                     ) -> JSONResponse:
    """``body`` as an ``application/problem+json`` response of its status."""
    return JSONBody(body, status_code=int(body["status"]), headers=headers,
                        media_type=MEDIA_TYPE)


def masked(value: Any) -> Any:
    """``value`` with the password of every URL in its strings masked."""
    if isinstance(value, str):
        return _CREDENTIALS.sub(r"\g<head>**@", value)
    if isinstance(value, dict):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value


def problem_schemas(prefix: str) -> dict[str, dict[str, Any]]:
    """The JSON schema of every problem the gateway answers with, by component name
    (``Problem`` and ``Problem.<Exception>`` or ``Problem.<request problem>``); ``$ref``
    values point at ``prefix`` + name."""
    base: dict[str, Any] = {
        "type": "object",
        "description": "RFC 9457 problem details, plus the error's own fields",
        "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                       "status": {"type": "integer"}, "detail": {"type": "string"}},
        "required": ["type", "title", "status", "detail"],
    }
    schemas = {"Problem": base}
    for kind, problem in PROBLEM_TYPES.items():
        schemas[f"Problem.{kind.__name__}"] = _problem_schema(
            prefix, f"urn:celery-warmpool:error:{kind.__name__}", problem.statuses,
            problem.fields, f"{kind.__name__}: {(kind.__doc__ or '').strip().splitlines()[0]}")
    for name, (status, members) in REQUEST_PROBLEMS.items():
        schemas[f"Problem.{name}"] = _problem_schema(prefix, "about:blank", [status], members,
                                                     f"{status}: a problem of the request")
    return schemas


def _problem_schema(prefix: str, kind: str, statuses: list[int],
                    fields: dict[str, dict[str, Any]], description: str) -> dict[str, Any]:
    status = {"const": statuses[0]} if len(statuses) == 1 else {"enum": statuses}
    return {"description": description, "allOf": [{"$ref": f"{prefix}Problem"}, {
        "type": "object",
        "properties": {"type": {"const": kind}, "status": status, **fields},
        "required": list(fields)}]}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _lookup(exc: BaseException) -> tuple[str, Problem]:
    for kind, problem in PROBLEM_TYPES.items():
        if isinstance(exc, kind):
            return kind.__name__, problem
    return "Internal", _UNEXPECTED
