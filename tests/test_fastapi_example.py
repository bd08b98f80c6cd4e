"""The FastAPI example under load: 256 concurrent HTTP requests, every answer checked.

``python examples/fastapi_embeddings.py --serve`` runs as it would from a terminal: a
prefork node (``-c 2``) hosting the real MiniLM pool, and the example's app under
uvicorn in a process of its own, both on the test Redis databases. The test sends 256
``POST /embed`` at once (httpx, a connection each) and checks every answer; for a few
known sentences the vector is the one a direct ``warm.call`` gives.

While the server answers them, the test counts its Redis connections (psutil on the
uvicorn process, sorted by the database Redis says each is on):

- on the broker's database, the producer pool's: coroutines publish from
  ``PUBLISH_THREADS`` threads, each holding one broker connection of the app's producer
  pool, and kombu's Redis channel opens two sockets per connection (the one it checks the
  server with when the channel opens, kept for consuming, and the one it publishes on):
  at most ``2 * PUBLISH_THREADS``;
- everything else, at most 8: the reply listener's (its one pub/sub connection and the
  one it reads stored replies and writes cancel marks on) and whatever else the server
  opens (the gateway's health check, on a ``/healthz``).

The example's own command (its burst and what it prints), its refusal of a result
store other than Redis, and its route's errors as the gateway's problems are tested
too.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from celery_warmpool.client.publisher import PUBLISH_THREADS
from celery_warmpool.ops.processes import ManagedProcess
from examples import fastapi_embeddings
from examples.embeddings import app, sentences, warm
from examples.fastapi_embeddings import Answer, burst, sampled
from examples.launch import python_path, settings
from tests.conftest import RABBITMQ_BROKER, REDIS_BACKEND, REDIS_BROKER, ROOT, wait_until
from tests.flower_page import free_port

pytestmark = pytest.mark.integration

REQUESTS = 256
KNOWN = ["A warm pool keeps the model loaded.",
         "Celery workers serve sentence embeddings.",
         "The quick brown fox jumps over the lazy dog.",
         "Redis carries every reply back to its caller."]
#: Largest difference allowed between a vector over HTTP and one from warm.call: the
#: worker may encode a sentence in batches of different sizes (different padding).
TOLERANCE = 1e-5
OTHER_CONNECTIONS = 8


@dataclass(frozen=True)
class Connections:
    """One count of the server's Redis connections, by what holds them."""

    producer_pool: int  # on the broker's database
    other: int  # the rest: the result store's database, or not yet listed by Redis


def database(url: str) -> int:
    return int(url.rsplit("/", 1)[1])


def redis_port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def connections(pid: int, admin: redis.Redis) -> Connections:
    """The Redis connections of process ``pid`` now, sorted by their database."""
    port = redis_port(REDIS_BROKER)
    ports = {connection.laddr.port
             for connection in psutil.Process(pid).net_connections(kind="tcp")
             if connection.raddr and connection.raddr.port == port
             and connection.status == psutil.CONN_ESTABLISHED}
    on_broker = sum(1 for client in admin.client_list()
                    if int(client["addr"].rsplit(":", 1)[1]) in ports
                    and int(client["db"]) == database(REDIS_BROKER))
    return Connections(on_broker, len(ports) - on_broker)


@pytest.fixture
def example(clean_redis: None) -> Iterator[tuple[str, ManagedProcess]]:
    """``python examples/fastapi_embeddings.py --serve`` on the test databases: its URL
    and the process; interrupted (Ctrl-C) afterwards, which must stop it cleanly."""
    assert database(REDIS_BROKER) != database(REDIS_BACKEND)
    app.conf.update(settings(REDIS_BROKER, REDIS_BACKEND, None))  # for warm.call here
    port = free_port()
    command = [sys.executable, str(ROOT / "examples" / "fastapi_embeddings.py"), "--serve",
               "--port", str(port), "--broker", REDIS_BROKER, "--backend", REDIS_BACKEND]
    process = ManagedProcess(command, env={**os.environ, "PYTHONPATH": python_path()},
                             cwd=Path("/tmp")).launch()
    try:
        assert process.wait_for_log("Ctrl-C stops", timeout=90), process.log()
        yield f"http://127.0.0.1:{port}", process
        assert process.process is not None
        process.process.send_signal(signal.SIGINT)
        assert process.process.wait(60) == 0, process.log()
        assert "worker stopped (exit status 0)" in process.log()
    finally:
        process.kill()
        process.remove_log()


def uvicorn_pid(example: ManagedProcess) -> int:
    """The example's uvicorn process (a child of the example's own)."""
    found = [child.pid for child in psutil.Process(example.pid).children(recursive=True)
             if "uvicorn" in " ".join(child.cmdline())]
    assert len(found) == 1, found
    return found[0]


def assert_embedding(answer: Answer, node: str) -> list[float]:
    """``answer`` is a 200 with a unit vector of 384 floats from ``node``; the vector."""
    assert answer.status == 200, (answer.text, answer.status, answer.body)
    assert set(answer.body) == {"embedding", "node", "duration"}, answer.body
    vector = answer.body["embedding"]
    assert len(vector) == 384 and all(isinstance(value, float) for value in vector)
    assert math.isclose(math.fsum(value * value for value in vector), 1.0, abs_tol=1e-4)
    assert answer.body["node"] == node
    assert answer.body["duration"] > 0
    return list(vector)


def test_256_concurrent_requests_all_answered_right_over_few_connections(
        example: tuple[str, ManagedProcess]) -> None:
    url, process = example
    found = re.search(r"worker (\S+) ready in", process.log())
    assert found, process.log()
    node = found.group(1)
    server = uvicorn_pid(process)
    admin = redis.Redis.from_url(REDIS_BROKER)
    texts = KNOWN + sentences(REQUESTS - len(KNOWN))
    with httpx.Client(base_url=url, timeout=30) as http:
        pools = http.get("/warmpool/pools").json()
        assert [pool["name"] for pool in pools["pools"]] == ["embedder"]
        refused = http.post("/embed", json={"text": ""})
        assert refused.status_code == 422  # the route's own model, before any call

    started = time.monotonic()
    with sampled(lambda: connections(server, admin), every=0.05) as counts:
        answers, _ = asyncio.run(burst(url, texts))
    elapsed = time.monotonic() - started

    assert [answer.text for answer in answers] == texts
    vectors = [assert_embedding(answer, node) for answer in answers]
    assert len({tuple(vector) for vector in vectors}) == REQUESTS  # one per sentence
    for text, vector in zip(KNOWN, vectors[:len(KNOWN)], strict=True):
        direct = warm.call("embedder", {"type": "text.embed", "data": {"text": text}},
                           timeout=30).result
        gap = max(abs(ours - theirs) for ours, theirs in zip(vector, direct, strict=True))
        assert gap <= TOLERANCE, (text, gap)

    producers = max(count.producer_pool for count in counts)
    others = max(count.other for count in counts)
    assert 1 <= producers <= 2 * PUBLISH_THREADS, counts
    assert 1 <= others <= OTHER_CONNECTIONS, counts

    # A prefork child publishes its numbers a few times a second: the last batch's count
    # may reach the status a moment after its reply.
    wait_until(lambda: warm.status("embedder").counters.calls == REQUESTS + len(KNOWN), 5,
               f"the status counted {REQUESTS + len(KNOWN)} calls")
    assert warm.status("embedder").counters.call_failures == 0
    print(f"{REQUESTS} requests in {elapsed:.2f} s; Redis connections of the server: "
          f"{producers} of the producer pool, {others} others")


def test_the_command_sends_its_burst_and_prints_what_it_measured(clean_redis: None) -> None:
    port = free_port()
    finished = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fastapi_embeddings.py"), "--requests", "32",
         "--port", str(port), "--broker", REDIS_BROKER, "--backend", REDIS_BACKEND],
        cwd="/tmp", capture_output=True, text=True, timeout=120, check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert f"serving http://127.0.0.1:{port}: POST /embed" in output
    assert "first request: 384 floats from warm-" in output
    assert re.search(r"32 concurrent requests in [\d.]+ s: \d+ requests/s, p50 \d+ ms, "
                     r"p99 \d+ ms, 0 errors", output), output
    held = re.search(r"the server process held at most (\d+) Redis connections", output)
    assert held and 2 <= int(held.group(1)) <= OTHER_CONNECTIONS + 2 * PUBLISH_THREADS, output
    gap = re.search(r"the same vector as warm.call for '.+': largest difference (\S+)", output)
    assert gap and float(gap.group(1)) <= TOLERANCE, output
    # The first request, the burst and the example's own warm.call.
    assert "/warmpool/pools/embedder/status: state ready, 34 calls" in output
    assert "worker stopped (exit status 0)" in output


def test_the_command_refuses_a_result_store_other_than_redis() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fastapi_embeddings.py"),
         "--broker", RABBITMQ_BROKER, "--backend", "rpc://"],
        cwd="/tmp", capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 2
    assert "this example needs a Redis result store, not rpc://" in finished.stderr
    assert "starting a worker" not in finished.stdout


def test_a_pool_error_is_answered_as_the_gateway_answers_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastapi_embeddings, "POOL", "missing")

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=fastapi_embeddings.site)
        async with httpx.AsyncClient(transport=transport, base_url="http://site") as http:
            return await http.post("/embed", json={"text": "hello"})

    answer = asyncio.run(post())
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert (problem["type"], problem["title"], problem["pool"]) == (
        "urn:celery-warmpool:error:UnknownPool", "Unknown pool", "missing")
