"""Shared fixtures: real brokers, real workers running ``tests.integration_app``."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_warmpool.ops.processes import ManagedProcess, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
# Other databases may be given (two test runs on one Redis must not share queues).
REDIS_BROKER = os.environ.get("WARMPOOL_TEST_REDIS_BROKER", "redis://127.0.0.1:6379/2")
REDIS_BACKEND = os.environ.get("WARMPOOL_TEST_REDIS_BACKEND", "redis://127.0.0.1:6379/3")
# A virtual host of its own may be given too (rabbitmqctl add_vhost; guest given rights).
RABBITMQ_BROKER = os.environ.get("WARMPOOL_TEST_RABBITMQ_BROKER",
                                 "amqp://guest:guest@127.0.0.1:5672//")


def at_once(call: Callable[[Any], Any], items: list[Any], within: float = 30) -> list[Any]:
    """``call(item)`` for each item, all from their own threads at once; each outcome (a
    value or the exception raised) in the items' order."""
    outcomes: list[Any] = [None] * len(items)
    start = threading.Barrier(len(items))

    def run(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = call(items[index])
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(within)
    return outcomes


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Return once ``condition()`` holds; fail saying ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} within {within}s")
        time.sleep(0.05)


@pytest.fixture
def clean_redis() -> Iterator[None]:
    """Empty the broker and result databases the integration tests use."""
    for url in (REDIS_BROKER, REDIS_BACKEND):
        redis.Redis.from_url(url).flushdb()
    yield


@pytest.fixture
def start_worker(clean_redis: None) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``tests.integration_app`` workers with given pools; stop them afterwards."""
    workers: list[WorkerProcess] = []

    def start(specs: list[dict[str, Any]] | None = None, *, pool: str = "prefork",
              concurrency: int = 2, broker: str = REDIS_BROKER, backend: str = REDIS_BACKEND,
              env: dict[str, str] | None = None, args: tuple[str, ...] = (),
              wait: bool = True, timeout: float = 90.0) -> WorkerProcess:
        environment = {"WARMPOOL_TEST_SPECS": json.dumps(specs) if specs else "null",
                       "PYTHONPATH": str(ROOT), **(env or {})}
        worker = WorkerProcess("tests.integration_app", pool=pool, concurrency=concurrency,
                               broker=broker, backend=backend, env=environment,
                               args=args, cwd=ROOT)
        workers.append(worker)
        if wait:
            worker.start(timeout=timeout)
        return worker

    yield start
    for worker in workers:
        worker.stop()
        worker.remove_log()


@pytest.fixture
def client() -> Callable[..., Any]:
    """Build the caller's side of ``tests.integration_app`` for given pools."""
    from tests.integration_app import make_app

    def build(specs: list[dict[str, Any]] | None = None, broker: str = REDIS_BROKER,
              backend: str = REDIS_BACKEND) -> Any:
        return make_app(broker, backend, specs)

    return build


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, kept on disk (appendonly), so
    that a restart keeps its messages as a production broker's does."""

    def __init__(self, directory: Path) -> None:
        from tests.flower_page import free_port

        self.port = free_port()
        self.directory = directory
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> PrivateRedis:
        self.process = ManagedProcess(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(self.directory)], log_path=self.directory / "redis.log").launch()
        client = redis.Redis(port=self.port)
        wait_until(lambda: _answers(client), 10, f"redis-server on port {self.port} answered")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        # No retries: redis-py would retry SHUTDOWN (the server closing the connection is
        # its answer) with backoff for seconds, and the outage would last that much longer.
        client = redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)  # appendonly already has it
        assert self.process.process is not None
        self.process.process.wait(10)
        self.process = None

    def restart(self, down: float) -> None:
        """Stop the server, keep it down ``down`` seconds, start it again on the same port."""
        self.stop()
        time.sleep(down)
        self.start()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server this test may stop and restart (never the shared one)."""
    server = PrivateRedis(tmp_path).start()
    yield server
    if server.process is not None:
        server.process.kill()
