"""The URL fetcher: agents that hold a keep-alive HTTP client, inside a Celery worker.

Run it (starts a local website and its own worker on an embedded broker):

    python examples/url_fetcher.py

On Redis: ``python examples/url_fetcher.py --broker redis://127.0.0.1:6379/0``.

Each agent opens its HTTP connection in ``setup()`` (the warm-up), reuses it for every
fetch, and closes it in ``teardown()``. The local site counts TCP connections and
requests, so the reuse is visible from the server's side; a plain task that connects per
request is the comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import http.client
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentReply,
    AgentState,
    PoolSpec,
    Signal,
    WarmPool,
    resource,
)
from examples.launch import BrokerChoice, example_app, parse_options, running_worker
from examples.local_site import LocalSite

#: Where the agents connect at warm-up (the example sets it for its worker).
ORIGIN_VARIABLE = "URL_FETCHER_ORIGIN"
_TITLE = re.compile(rb"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


class FetchError(Exception):
    """The server answered with an error status."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    reused_connection: bool

    @property
    def title(self) -> str:
        found = _TITLE.search(self.body)
        return found.group(1).decode(errors="replace").strip() if found else ""


class KeepAliveClient:
    """HTTP/1.1 GETs over one persistent connection per origin (``http://`` only)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._connections: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def connect(self, url: str) -> None:
        """Open the connection to ``url``'s origin now, so the first fetch is warm too."""
        self._connection(_origin(url))[0].connect()

    def get(self, url: str, timeout: float | None = None) -> Response:
        """GET ``url``; a kept connection the server has closed meanwhile is reopened once."""
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        origin = _origin(url)
        connection, reused = self._connection(origin)
        try:
            return self._get(connection, path, timeout, reused)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self._drop(origin)
            if not reused:
                raise
        connection, _ = self._connection(origin)
        return self._get(connection, path, timeout, False)

    def close(self) -> None:
        """Close every connection."""
        for origin in list(self._connections):
            self._drop(origin)

    def _connection(self, origin: tuple[str, int]) -> tuple[http.client.HTTPConnection, bool]:
        existing = self._connections.get(origin)
        if existing is not None and existing.sock is not None:
            return existing, True
        connection = http.client.HTTPConnection(*origin, timeout=self.timeout)
        self._connections[origin] = connection
        return connection, False

    def _get(self, connection: http.client.HTTPConnection, path: str, timeout: float | None,
             reused: bool) -> Response:
        connection.timeout = timeout or self.timeout
        if connection.sock is not None:
            connection.sock.settimeout(connection.timeout)
        connection.request("GET", path)
        response = connection.getresponse()
        return Response(response.status, response.read(), reused)

    def _drop(self, origin: tuple[str, int]) -> None:
        connection = self._connections.pop(origin, None)
        if connection is not None:
            connection.close()


def _origin(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are fetched, got {url!r}")
    return parts.hostname, parts.port or 80


class FetcherState(AgentState):
    client: Any = resource()  # kept across reset(), never sent in a reply
    fetches: int = 0
    last_fetch: dict[str, Any] | None = None


class Fetch(Action):
    """GET a URL with the agent's client; a status of 400 or more is an error."""

    name = "fetch"

    class Params(BaseModel):
        url: str
        timeout: float = 5.0

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        response = context.state.client.get(params.url, timeout=params.timeout)
        if response.status >= 400:
            raise FetchError(f"GET {params.url} answered {response.status}")
        return {"fetches": context.state.fetches + 1,
                "last_fetch": self.summary(params.url, response)}

    def summary(self, url: str, response: Response) -> dict[str, Any]:
        """What the reply tells about the fetch (the body stays on the worker)."""
        return {"url": url, "status": response.status, "bytes": len(response.body),
                "title": response.title, "reused_connection": response.reused_connection,
                "fetched_at": time.time()}


class FetcherAgent(Agent[FetcherState]):
    """Holds a keep-alive HTTP client from warm-up to teardown."""

    signal_routes = {"fetch": Fetch}

    def setup(self) -> None:
        self.state.client = KeepAliveClient()
        origin = self.options.get("origin")
        if origin:
            self.state.client.connect(origin)

    def teardown(self) -> None:
        if self.state.client is not None:
            self.state.client.close()


app = example_app("url_fetcher")
warm = WarmPool(app, pools=[
    PoolSpec("fetcher", FetcherAgent, size=3,
             worker_opts={"origin": os.environ.get(ORIGIN_VARIABLE)}),
])


@warm.task(pool="fetcher", name="url_fetcher.title")
def title(agent: FetcherAgent, url: str) -> str:
    """A pool-aware task using the agent's client directly."""
    return str(agent.state.client.get(url).title)


@app.task(name="url_fetcher.fetch_without_pool")
def fetch_without_pool(url: str) -> int:
    """The comparison: a plain task that opens (and closes) a connection per request."""
    client = KeepAliveClient()
    try:
        return client.get(url).status
    finally:
        client.close()


PAGES = {f"/item/{number}": f"<title>Item {number}</title><p>{'x' * 2000}</p>"
         for number in range(10)}


def fetch(url: str) -> Signal:
    return Signal.new("fetch", {"url": url}, source="/examples/url_fetcher")


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "Agents holding keep-alive HTTP clients.", argv)
    with LocalSite(PAGES, latency=0.01) as site:
        opened = demonstrate(site, choice)
        closed = site.wait_until_closed(timeout=5)
    print(f"after shutdown: {closed.closed} of {opened} connections closed "
          "(the agents' teardown() closed theirs)")
    return 0 if closed.closed >= opened else 1


def demonstrate(site: LocalSite, choice: BrokerChoice) -> int:
    """Fetch through the pool, then without it; return how many connections were opened."""
    with running_worker(app, "examples.url_fetcher", choice, pool="threads", concurrency=4,
                        env={ORIGIN_VARIABLE: site.origin}):
        warmed = site.counters()
        print(f"after warm-up: the site saw {warmed.connections} connections and "
              f"{warmed.requests} requests (each agent connected in setup())")

        first = warm.call("fetcher", fetch(site.url("/item/0")))
        print(f"one call: {first.state['last_fetch']['title']!r} by {first.agent_id}, "
              f"reused connection: {first.state['last_fetch']['reused_connection']}, "
              f"client in reply: {'client' in first.state}")

        urls = [site.url(f"/item/{n % len(PAGES)}") for n in range(30)]
        casts = [warm.cast("fetcher", fetch(url)) for url in urls]
        replies = [AgentReply.model_validate(result.get(timeout=30, interval=0.01)[0])
                   for result in casts]
        agents = {reply.agent_id for reply in replies}
        reused = sum(bool(reply.state["last_fetch"]["reused_connection"]) for reply in replies)
        print(f"cast {len(casts)} fetches: served by {len(agents)} agents, "
              f"{reused} of {len(replies)} on a reused connection")
        print(f"pool-aware task: title {title.delay(site.url('/item/7')).get(timeout=10)!r}")

        pooled = site.counters()
        print(f"with the pool: {pooled.requests} requests over {pooled.connections} "
              "TCP connections")

        for url in urls[:10]:
            fetch_without_pool.delay(url).get(timeout=10, interval=0.01)
        cold = site.counters()
        print(f"without a pool: {cold.requests - pooled.requests} requests over "
              f"{cold.connections - pooled.connections} TCP connections")
    return cold.connections


if __name__ == "__main__":
    sys.exit(main())
