"""Who may call the gateway, and how much they may send: two ASGI middlewares.

Both answer before the application sees the request, so a refused request costs no
work: no token (or the wrong one) is ``401``, a body over the limit ``413``.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import http_problem, problem_response

__all__ = ["DEFAULT_MAX_BODY", "BodyLimit", "BodyTooLarge", "TokenGuard"]

#: The largest request body taken by default: 1 MiB.
DEFAULT_MAX_BODY = 1 << 20
#: Paths anyone may read: a load balancer's health check carries no token.
OPEN_PATHS = frozenset({"/healthz"})
#: Pages a browser opens by address, where ``?token=`` stands in for the header.
PAGES = frozenset({"/", "/docs", "/openapi.json"})


class TokenGuard:
    """Require ``Authorization: Bearer <token>`` on every path but ``/healthz``.

    The token is compared in constant time. The pages a browser opens by address (the
    live page, ``/docs``, ``/openapi.json``) take it as ``?token=`` too.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = http_problem(401, "Unauthorized",
                           "this gateway needs 'Authorization: Bearer <token>'")
        response = problem_response(body, {"WWW-Authenticate": 'Bearer realm="warmpool"'})
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        given = _bearer(scope)
        if given is None and scope["method"] == "GET" and route_path(scope) in PAGES:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = query.get("token", [""])[0].encode()
        return given is not None and hmac.compare_digest(given, self.token)


def route_path(scope: Scope) -> str:
    """The request's path within this app: mounted under ``/warm``, ``/warm/healthz`` is
    ``/healthz`` (Starlette keeps the whole path and the mount point in ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):][:1] in ("/", ""):
        return path[len(root):] or "/"
    return path


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else None
    return None


class BodyLimit:
    """Refuse a request body over ``max_body`` bytes with ``413``, without reading it whole.

    A declared ``Content-Length`` over the limit is refused at once; a body sent in chunks
    is counted as it arrives and refused when the count passes the limit.
    """

    def __init__(self, app: ASGIApp, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await problem_response(self._problem())(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # Raised inside the handler's read: the app's handler for
                    # HTTPException answers it with the problem it carries.
                    raise BodyTooLarge(self._problem())
            return message

        await self.app(scope, counted, send)

    def _problem(self) -> dict[str, Any]:
        return http_problem(413, "Content Too Large",
                            f"the request body is over {self.max_body} bytes",
                            max_body=self.max_body)


class BodyTooLarge(HTTPException):
    """A body that passed the limit while it was read; ``problem`` is the answer."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(413, str(problem["detail"]))
        self.problem = problem


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
