"""An asyncio web front end for the embedding model: FastAPI awaiting ``warm.acall``.

    pip install -e '.[ml,http]' httpx     # the model, FastAPI and uvicorn, an HTTP client
    python examples/fastapi_embeddings.py                 # 256 concurrent requests, then stop
    python examples/fastapi_embeddings.py --serve         # serve on :8000 until Ctrl-C
    python examples/fastapi_embeddings.py --broker redis://127.0.0.1:6379/12 \\
        --backend redis://127.0.0.1:6379/13 --port 8010

Needs Redis (``127.0.0.1:6379``, database 0 by default): the process's one reply
listener, through which every awaiting request gets its reply, listens to a Redis result
store; the broker may be Redis or RabbitMQ (``--broker``).

``POST /embed`` with ``{"text": "..."}`` answers ``{"embedding": [384 floats], "node":
..., "duration": ...}``: the route awaits ``warm.acall`` on the MiniLM pool of
``examples/embeddings.py``, so one event loop serves every request in flight, with no
thread per request. Beside it the pools' own HTTP gateway, ``create_app(warm)``, is
mounted under ``/warmpool`` (``/warmpool/pools``, ``/warmpool/pools/embedder/status``,
the live page at ``/warmpool/``).

The command starts a prefork node (``-c 2``) hosting the pool, serves the app under
uvicorn in a process of its own, fires 256 concurrent requests at it with httpx and
prints the throughput, p50 and p99, the errors, and the most Redis connections the
server process held while it served them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import argparse
import asyncio
import math
import os
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import psutil
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from celery_warmpool import WarmPoolError
from celery_warmpool.http import create_app
from celery_warmpool.http.problems import problem_for, problem_response
from celery_warmpool.ops.processes import ManagedProcess
from examples.embeddings import app, sentences, warm
from examples.launch import ROOT, BrokerChoice, parse_options, python_path, running_worker

POOL = "embedder"
REQUESTS = 256
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
#: Seconds a request may wait for an agent: a burst of 256 queues on two processes.
CHECKOUT_TIMEOUT = 10.0
CALL_TIMEOUT = 5.0

T = TypeVar("T")


class EmbedRequest(BaseModel):
    text: str = Field(min_length=1)


class Embedding(BaseModel):
    embedding: list[float]
    node: str | None
    duration: float


gateway = create_app(warm)


@asynccontextmanager
async def lifespan(site: FastAPI) -> AsyncIterator[None]:
    # Starlette runs no lifespan of a mounted app: the gateway's runs inside this one.
    async with gateway.router.lifespan_context(gateway):
        yield


site = FastAPI(title="Embeddings", lifespan=lifespan)


@site.post("/embed")
async def embed(request: EmbedRequest) -> Embedding:
    """The embedding of ``request.text``, from an agent of the pool."""
    reply = await warm.acall(POOL, {"type": "text.embed", "data": {"text": request.text}},
                             timeout=CHECKOUT_TIMEOUT, call_timeout=CALL_TIMEOUT)
    return Embedding(embedding=reply.result, node=reply.node, duration=reply.duration)


@site.exception_handler(WarmPoolError)
async def pool_error(request: Request, exc: Exception) -> Response:
    # The same problem documents (and statuses) as the mounted gateway's routes.
    body, headers = problem_for(exc)
    return problem_response(body, headers)


site.mount("/warmpool", gateway)


# -- running it -------------------------------------------------------------------------


@contextmanager
def serving(choice: BrokerChoice, port: int) -> Iterator[ManagedProcess]:
    """Serve :data:`site` under uvicorn on ``port`` in a process of its own until the
    block ends.

    Raises:
        RuntimeError: uvicorn did not start (its log is in the message).
    """
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_embeddings:site",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    environment = {**os.environ, **choice.environment(), "PYTHONPATH": python_path()}
    server = ManagedProcess(command, env=environment, cwd=ROOT).launch()
    try:
        if not server.wait_for_log("Uvicorn running on", timeout=30):
            raise RuntimeError(f"uvicorn did not start:\n{server.log()}")
        yield server
    finally:
        server.stop()
        server.remove_log()


def redis_connections(pid: int, port: int) -> int:
    """The established TCP connections of process ``pid`` to ``port``."""
    return sum(1 for connection in psutil.Process(pid).net_connections(kind="tcp")
               if connection.raddr and connection.raddr.port == port
               and connection.status == psutil.CONN_ESTABLISHED)


@contextmanager
def sampled(measure: Callable[[], T], every: float = 0.02) -> Iterator[list[T]]:
    """Call ``measure()`` every ``every`` seconds while the block runs (and once on either
    side of it); what it returned, in the list given."""
    values = [measure()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            values.append(measure())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield values
    finally:
        done.set()
        sampler.join()
        values.append(measure())


@dataclass(frozen=True)
class Answer:
    """What the server answered to one request (status 0: no HTTP answer at all)."""

    text: str
    status: int
    body: Any
    seconds: float


async def burst(url: str, texts: list[str]) -> tuple[list[Answer], float]:
    """``POST /embed`` each of ``texts``, all at once, each on its own connection.

    Returns the answers in the order of ``texts`` and the seconds the burst took.
    """
    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def post(text: str) -> Answer:
            started = time.perf_counter()
            try:
                response = await http.post("/embed", json={"text": text})
            except httpx.TransportError as exc:
                return Answer(text, 0, repr(exc), time.perf_counter() - started)
            return Answer(text, response.status_code, response.json(),
                          time.perf_counter() - started)

        started = time.perf_counter()
        answers = await asyncio.gather(*(post(text) for text in texts))
        return list(answers), time.perf_counter() - started


def is_embedding(answer: Answer) -> bool:
    """Whether ``answer`` is a 200 holding 384 finite floats."""
    if answer.status != 200:
        return False
    vector = answer.body.get("embedding")
    return (isinstance(vector, list) and len(vector) == 384
            and all(isinstance(value, float) and math.isfinite(value) for value in vector))


def percentile(values: list[float], share: int) -> float:
    """The ``share``-th percentile of ``values`` (at least two)."""
    return statistics.quantiles(values, n=100, method="inclusive")[share - 1]


def demonstrate(url: str, server: ManagedProcess, redis_port: int, count: int) -> int:
    """The burst of ``count`` requests, and what it shows; the number of wrong answers."""
    first = httpx.post(f"{url}/embed", json={"text": "hello"}, timeout=30)
    first.raise_for_status()
    print(f"first request: {len(first.json()['embedding'])} floats from "
          f"{first.json()['node']}")
    texts = sentences(count)
    with sampled(lambda: redis_connections(server.pid, redis_port)) as counts:
        answers, seconds = asyncio.run(burst(url, texts))
    wrong = sum(not is_embedding(answer) for answer in answers)
    latencies = [answer.seconds for answer in answers]
    print(f"{count} concurrent requests in {seconds:.2f} s: {count / seconds:.0f} "
          f"requests/s, p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.0f} ms, {wrong} errors")
    print(f"the server process held at most {max(counts)} Redis connections while "
          "serving them")
    direct = warm.call(POOL, {"type": "text.embed", "data": {"text": texts[0]}}, timeout=30)
    if answers[0].status == 200:
        gap = max(abs(ours - theirs)
                  for ours, theirs in zip(answers[0].body["embedding"], direct.result,
                                          strict=True))
        print(f"the same vector as warm.call for {texts[0]!r}: largest difference "
              f"{gap:.1e}")
    status = httpx.get(f"{url}/warmpool/pools/{POOL}/status", timeout=30).json()
    print(f"the mounted gateway's /warmpool/pools/{POOL}/status: state {status['state']}, "
          f"{status['counters']['calls']} calls, {status['counters']['batches']} batches")
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FastAPI awaiting warm.acall on a model pool.")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--requests", type=int, default=REQUESTS,
                        help=f"concurrent requests of the burst (default: {REQUESTS})")
    parser.add_argument("--serve", action="store_true",
                        help="serve until Ctrl-C instead of sending the burst")
    options, choice = parse_options(app, parser.description or "", argv, parser=parser,
                                    default_broker=DEFAULT_BROKER)
    if urlsplit(choice.backend).scheme not in ("redis", "rediss"):
        print(f"this example needs a Redis result store, not {choice.backend}: the reply "
              "listener listens to Redis (--backend redis://127.0.0.1:6379/0)",
              file=sys.stderr)
        return 2
    url = f"http://127.0.0.1:{options.port}"
    with (running_worker(app, "examples.embeddings", choice, pool="prefork", concurrency=2),
          serving(choice, options.port) as server):
        print(f"serving {url}: POST /embed, and the pools' gateway under /warmpool/")
        if options.serve:
            print(f"try: curl -s {url}/embed -H 'content-type: application/json' "
                  "-d '{\"text\": \"hello\"}'; Ctrl-C stops", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                print()
            return 0
        wrong = demonstrate(url, server, urlsplit(choice.backend).port or 6379,
                            options.requests)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
