"""Errors as RFC 9457 problem details (``application/problem+json``).

One table says which status and title each of the contract's exceptions gets; a problem
carries the exception's message as ``detail`` and its fields (``pool``, ``waited``, ...)
as members of its own. Nothing in a problem carries a traceback, and any URL in it has
its password masked, whatever the exception held.
"""

from __future__ import annotations

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
    InvalidSignal,
    UnknownPool,
    UnknownSignal,
    WarmPoolError,
)

__all__ = ["MEDIA_TYPE", "PROBLEM_TYPES", "Problem", "problem_for", "problem_response"]

MEDIA_TYPE = "application/problem+json"
#: Seconds a caller refused for a full pool is told to wait before it tries again.
RETRY_AFTER = 1
#: ``scheme://user:password@`` in any text: the password is masked before it leaves.
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


class Problem(NamedTuple):
    """How one exception type is told over HTTP."""

    status: int
    title: str
    #: The exception's attributes that become the problem's own members.
    fields: tuple[str, ...]


#: The contract's exceptions, most specific first (the first ``isinstance`` match wins).
PROBLEM_TYPES: dict[type[WarmPoolError], Problem] = {
    UnknownPool: Problem(404, "Unknown pool", ("pool",)),
    InvalidSignal: Problem(422, "Invalid signal", ("signal_type", "errors")),
    UnknownSignal: Problem(422, "Unknown signal type", ("signal_type",)),
    ActionFailed: Problem(500, "Action failed", ("signal_type", "action", "cause")),
    AgentLost: Problem(502, "Agent lost", ("pool", "node", "pid", "signal_type",
                                          "may_have_run")),
    CheckoutTimeout: Problem(503, "No agent free in time", ("pool", "waited", "size",
                                                             "max_overflow")),
    BrokerUnavailable: Problem(503, "Broker unavailable", ("url", "waited")),
    CallTimeout: Problem(504, "Call timed out", ("signal_type", "timeout")),
}
_UNEXPECTED = Problem(500, "Internal error", ())


def problem_for(exc: BaseException) -> tuple[dict[str, Any], dict[str, str]]:
    """The problem document of ``exc`` and the headers its response carries.

    An exception outside the table is an internal error: its message is not told (it
    may hold anything), only its type.
    """
    kind, problem = _lookup(exc)
    body: dict[str, Any] = {
        "type": f"urn:celery-warmpool:error:{kind}",
        "title": problem.title,
        "status": problem.status,
        "detail": str(exc) if problem is not _UNEXPECTED else
        f"the gateway failed with {type(exc).__name__}; its log has the details",
    }
    for name in problem.fields:
        body[name] = getattr(exc, name, None)
    headers = {"Retry-After": str(RETRY_AFTER)} if isinstance(exc, CheckoutTimeout) else {}
    return masked(body), headers


def http_problem(status: int, title: str, detail: str,
                 **members: Any) -> dict[str, Any]:
    """A problem about the request itself (no route, no token, too large): ``about:blank``
    with the HTTP status's own title, as RFC 9457 says."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail,
            **members}


def problem_response(body: dict[str, Any], headers: Mapping[str, str] | None = None,
                     ) -> JSONResponse:
    """``body`` as an ``application/problem+json`` response of its status."""
    return JSONResponse(body, status_code=int(body["status"]), headers=headers,
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


def _lookup(exc: BaseException) -> tuple[str, Problem]:
    for kind, problem in PROBLEM_TYPES.items():
        if isinstance(exc, kind):
            return kind.__name__, problem
    return "Internal", _UNEXPECTED
