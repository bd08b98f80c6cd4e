"""``create_app(warm)``: the HTTP front door of a :class:`~celery_warmpool.WarmPool`.

Every route awaits the asyncio caller (``warm.acall``, ``acast``, ``astream``,
``astatus``, ``anodes``) on the server's one event loop: no thread per request. Errors
are answered as problems (:mod:`.problems`), the token and the body limit are checked
before a route runs (:mod:`.guard`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response

from ..core.arguments import seconds
from ..core.errors import InvalidSignal, UnknownPool, WarmPoolError
from ..core.signal import Signal
from ..core.spec import PoolOptions, PoolSpec
from .guard import DEFAULT_MAX_BODY, BodyLimit, BodyTooLarge, TokenGuard
from .health import HealthCheck
from .openapi import extend, routes_of
from .page import page_html
from .problems import JSONBody, http_problem, json_text, problem_for, problem_response

if TYPE_CHECKING:
    from ..extension import WarmPool

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

#: Seconds the generator of a stream whose reader left is given to stop.
CLOSE_TIMEOUT = 5.0
_END = object()
_Default = TypeVar("_Default", float, None)


class Gateway:
    """What the routes share: the WarmPool, the pools served, the health check."""

    def __init__(self, warm: WarmPool, pools: Iterable[str] | None) -> None:
        self.warm = warm
        names = list(warm.specs) if pools is None else list(pools)
        for name in names:
            warm.spec(name)  # UnknownPool for a name the app does not have
        self.pools = names
        self.health = HealthCheck(warm.app)

    def spec(self, pool: str) -> PoolSpec:
        """The spec of a pool this gateway serves.

        Raises:
            UnknownPool: the app has no such pool, or this gateway does not serve it.
        """
        if pool not in self.pools:
            raise UnknownPool(f"this gateway serves no pool {pool!r} (it serves: "
                              f"{', '.join(self.pools) or 'none'})", pool)
        return self.warm.spec(pool)

    async def signal(self, request: Request) -> tuple[str, Signal]:
        """The pool a request names and the signal its body holds.

        Raises:
            UnknownPool: see :meth:`spec`.
            InvalidSignal: the body is not JSON (strict JSON: no ``NaN``, which no reply
                could carry back), not an object, or not a valid signal.
        """
        pool: str = request.path_params["pool"]
        self.spec(pool)
        body = await request.body()
        try:
            document = json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:  # nested too deep: RecursionError
            raise InvalidSignal(f"the request body is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidSignal("the request body must be a signal: a JSON object, got "
                                f"{_json_kind(document)}")
        return pool, Signal.parse(document)

    def describe(self, spec: PoolSpec, nodes: list[Any]) -> dict[str, Any]:
        """What ``GET /pools`` tells of one pool: the pool options, never ``initial_state``
        or ``worker_opts`` (they may hold anything, keys and passwords included)."""
        options = {name: getattr(spec, name) for name in PoolOptions.model_fields}
        options["discard_on"] = [f"{kind.__module__}.{kind.__qualname__}"
                                 for kind in spec.discard_on]
        options["warmup"] = [signal.to_wire() for signal in spec.warmup]
        return {
            "name": spec.name,
            "agent": f"{spec.agent.__module__}.{spec.agent.__qualname__}",
            "queue": spec.queue,
            "options": options,
            "signals": [route.describe() for route in routes_of(spec)],
            "nodes": [record.model_dump(mode="json") for record in nodes
                      if spec.name in record.pools],
        }


def create_app(warm: WarmPool, *, token: str | None = None,
               max_body: int = DEFAULT_MAX_BODY, pools: Iterable[str] | None = None,
               ) -> FastAPI:
    """An ASGI app serving ``warm``'s pools over HTTP (see the module and docs/http.md).

    Arguments:
        token: with one, every route but ``/healthz`` needs ``Authorization: Bearer``.
        max_body: the largest request body taken, in bytes (``413`` past it).
        pools: the pools served (default: every pool of the app).

    Raises:
        UnknownPool: ``pools`` names a pool the app does not have.
    """
    gateway = Gateway(warm, pools)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        gateway.health.close()

    app = FastAPI(title="celery-warmpool gateway", docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  description="Call, cast and stream signals to warm agent pools.")
    app.state.gateway = gateway
    _add_routes(app, gateway)
    _add_documents(app, gateway, bool(token))
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_body=max_body)
    if token:
        app.add_middleware(TokenGuard, token=token)
    return app


def _add_routes(app: FastAPI, gateway: Gateway) -> None:
    warm = gateway.warm

    # The routes about one pool are plain Starlette routes: FastAPI's per-request
    # parameter machinery costs more CPU than the rest of the gateway's own work, and
    # their documentation is written per pool by .openapi anyway.
    async def call(request: Request) -> Response:
        pool, signal = await gateway.signal(request)
        # The reply as the worker stored it: JSON in, JSON out, no model in between.
        reply = await warm.client.acall_data(
            pool, signal, timeout=_seconds(request, "timeout", 5.0),
            call_timeout=_seconds(request, "call_timeout", 5.0))
        return JSONBody(reply)

    async def cast(request: Request) -> Response:
        pool, signal = await gateway.signal(request)
        result = await warm.acast(pool, signal, timeout=_seconds(request, "timeout", None),
                                  call_timeout=_seconds(request, "call_timeout", None))
        return JSONBody({"id": result.id}, status_code=202)

    async def stream(request: Request) -> Response:
        pool, signal = await gateway.signal(request)
        chunks = warm.astream(pool, signal, timeout=_seconds(request, "timeout", 5.0),
                              call_timeout=_seconds(request, "call_timeout", 60.0))
        return await _event_stream(chunks)

    async def status(request: Request) -> Response:
        pool = request.path_params["pool"]
        gateway.spec(pool)
        found = await warm.astatus(pool, timeout=_seconds(request, "timeout", 1.0))
        return JSONBody(found.model_dump(mode="json"))

    for path, endpoint, method in (("call", call, "POST"), ("cast", cast, "POST"),
                                   ("stream", stream, "POST"), ("status", status, "GET")):
        app.add_route(f"/pools/{{pool}}/{path}", endpoint, methods=[method],
                      include_in_schema=False)

    @app.get("/pools")
    async def pools() -> Response:
        """Every pool served: its options, signal types and live nodes."""
        nodes = await warm.anodes(timeout=1.0)
        return JSONBody({"pools": [gateway.describe(warm.spec(name), nodes)
                                       for name in gateway.pools]})

    @app.get("/healthz")
    async def healthz() -> Response:
        """200 when the broker and the result store answer, else 503 naming which not."""
        parts = await gateway.health.check()
        down = sorted(part for part, state in parts.items() if state != "ok")
        if not down:
            return JSONBody(parts)
        detail = "; ".join(f"{part}: {parts[part]}" for part in down)
        return problem_response(http_problem(503, "Service Unavailable",
                                             f"not reachable: {detail}", **parts))

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())


def _seconds(request: Request, name: str, default: _Default) -> float | _Default:
    """The query parameter ``name``: a number of seconds (checked as the callers check
    theirs, see :mod:`celery_warmpool.core.arguments`), or ``default`` if not given.

    Raises:
        InvalidArgument: it is given and is not such a number.
    """
    given = request.query_params.get(name)
    if given is None:
        return default
    try:
        value: Any = float(given)
    except ValueError:
        value = given  # refused below, as the text it is
    return seconds(name, value)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not valid JSON")


def _json_kind(document: Any) -> str:
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return kinds.get(type(document), type(document).__name__)


async def _event_stream(chunks: Any) -> Response:
    """The SSE response of a stream. The first chunk is awaited before the response
    starts, so an error before any chunk (an unknown signal type, a full pool) is
    answered with its own status; later ones arrive as an ``error`` event."""
    iterator = aiter(chunks)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        first = _END
    except BaseException:
        await _close(chunks)
        raise
    return EventSourceResponse(_events(chunks, iterator, first), ping=15)


async def _events(chunks: Any, iterator: AsyncIterator[Any],
                  first: Any) -> AsyncIterator[dict[str, str]]:
    try:
        if first is not _END:
            yield {"event": "chunk", "data": json_text(first)}
            async for chunk in iterator:
                yield {"event": "chunk", "data": json_text(chunk)}
        yield {"event": "reply", "data": json_text(chunks.reply.model_dump(mode="json"))}
    except Exception as exc:
        if not isinstance(exc, WarmPoolError):
            logger.exception("stream failed")
        body, _ = problem_for(exc)
        yield {"event": "error", "data": json_text(body)}
    finally:
        # Also when the client went away: sse-starlette cancels this generator, and the
        # agent's generator is stopped only if the stream is closed.
        await _close(chunks)


async def _close(chunks: Any) -> None:
    """Close a stream, shielded from the cancellation that may be ending its reader."""
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await chunks.aclose()


def _add_documents(app: FastAPI, gateway: Gateway, token: bool) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=_version(), routes=app.routes,
                                   description=app.description)
            app.openapi_schema = extend(document, [gateway.warm.spec(name)
                                                   for name in gateway.pools], token=token)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # Swagger UI fetches the document without the page's header: pass the token the
        # page was opened with (already checked by the guard) on to it.
        given = request.query_params.get("token")
        url = "openapi.json" + (f"?token={quote(given)}" if given else "")
        return get_swagger_ui_html(openapi_url=url, title=f"{app.title}: docs")


def _add_error_handlers(app: FastAPI) -> None:
    async def warm_error(request: Request, exc: Exception) -> Response:
        body, headers = problem_for(exc)
        return problem_response(body, headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("request %s %s failed", request.method, request.url.path,
                         exc_info=exc)
        body, _ = problem_for(exc)
        return problem_response(body)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc, BodyTooLarge):
            return problem_response(exc.problem)
        return problem_response(http_problem(exc.status_code,
                                             HTTPStatus(exc.status_code).phrase,
                                             str(exc.detail)), exc.headers)

    async def invalid_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
                  for error in exc.errors()]
        return problem_response(http_problem(422, "Unprocessable Content",
                                             "invalid query or path parameters",
                                             errors=errors))

    app.add_exception_handler(WarmPoolError, warm_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)


def _version() -> str:
    from .. import __version__

    return __version__
