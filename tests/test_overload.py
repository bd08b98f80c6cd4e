"""Overload the caller sees, and the backlog signal, on real workers and both brokers.

A pool is frozen with ``counter.hold`` calls (each holds its agent until a file exists),
so that the numbers of calls queued, reserved and running are known exactly; creating
the file lets them all go.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from celery_warmpool import PoolBusy, PoolStatus
from celery_warmpool.wire.backlog import BacklogBoard, totals
from tests.conftest import RABBITMQ_BROKER, REDIS_BROKER, ROOT, wait_until
from tests.flower_page import free_port
from tests.http_gateway import GatewayProcess
from tests.test_metrics import scrape_until
from tests.test_outages import private_urls

pytestmark = pytest.mark.integration

BROKERS = {"redis": REDIS_BROKER, "rabbitmq": RABBITMQ_BROKER}


def bounded(size: int, max_queued: int | None, **options: Any) -> list[dict[str, Any]]:
    """A pool ``counter`` on a queue of its own (RabbitMQ keeps a queue's arguments: a
    queue left by another test, with another bound, would not do)."""
    return [{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": size,
             "max_queued": max_queued, "queue": f"warmpool.overload.{uuid.uuid4().hex[:8]}",
             **options}]


def hold(gate: Path) -> dict[str, Any]:
    return {"type": "counter.hold", "data": {"path": str(gate)}}


def touch(path: Path) -> dict[str, Any]:
    return {"type": "counter.touch", "data": {"path": str(path)}}


def work(seconds: float) -> dict[str, Any]:
    return {"type": "counter.work", "data": {"seconds": seconds}}


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """The file that lets held calls go: created at the end of the test whatever happens,
    before its workers stop (a warm shutdown would wait for them)."""
    path = tmp_path / "go"
    yield path
    path.touch()


@pytest.fixture
def queues() -> Iterator[list[tuple[str, str]]]:
    """(broker, queue) pairs the test made, deleted after it (RabbitMQ keeps them)."""
    made: list[tuple[str, str]] = []
    yield made
    for broker, queue in made:
        if broker.startswith("amqp"):
            with Connection(broker) as connection:
                channel = connection.channel()
                channel.queue_delete(queue)
                channel.close()


def parts(status: PoolStatus) -> dict[str, Any]:
    return {"queued": status.queued, "reserved": status.reserved, "running": status.running,
            "capacity": status.capacity, "backlog": status.backlog}


def frozen(warm: Any, running: int, waiting: int, within: float = 30) -> None:
    """Wait until ``running`` calls run and ``waiting`` more wait, as the nodes report on
    the board too (the admission script reads it there)."""
    queue = warm.spec("counter").queue
    board = BacklogBoard.of(warm.app)
    assert board is not None

    seen: list[Any] = []

    def settled() -> bool:
        status = warm.status("counter", timeout=2.0)
        load = totals(board.read(queue))
        seen[:] = [parts(status), load]
        return (status.running == running and (status.queued or 0) + status.reserved == waiting
                and (load.running, load.reserved) == (status.running, status.reserved))

    try:
        wait_until(settled, within, f"{running} running and {waiting} waiting")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen}") from None
    finally:
        board.close()


CASES = [("redis", "threads", 20), ("redis", "prefork", None),
         ("rabbitmq", "threads", None), ("rabbitmq", "prefork", 20)]


@pytest.mark.parametrize("broker,execution,max_queued", CASES)
def test_each_part_of_the_backlog_is_exact(start_worker, client, queues, gate, broker,
                                           execution, max_queued):
    specs = bounded(2, max_queued)
    url = BROKERS[broker]
    queues.append((url, specs[0]["queue"]))
    start_worker(specs, pool=execution, concurrency=8 if execution == "threads" else 2,
                 broker=url)
    _, warm = client(specs, broker=url)
    casts = [warm.cast("counter", hold(gate)) for _ in range(10)]
    frozen(warm, running=2, waiting=8)
    status = warm.status("counter")
    # Two run, and the node reserves as many more, unless the pool is bounded on
    # RabbitMQ (which counts only what it has not delivered): then none.
    reserved = 0 if (broker, max_queued) == ("rabbitmq", 20) else 2
    assert parts(status) == {"queued": 8 - reserved, "reserved": reserved, "running": 2,
                             "capacity": 2, "backlog": 10}
    assert parts(asyncio.run(warm.astatus("counter"))) == parts(status)
    gate.touch()
    for result in casts:
        result.get(timeout=30)
    wait_until(lambda: parts(warm.status("counter")) == {
        "queued": 0, "reserved": 0, "running": 0, "capacity": 2, "backlog": 0}, 10,
        "the backlog drained")


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_call_past_the_bound_is_refused_before_it_is_queued_and_never_runs(
        start_worker, client, queues, gate, tmp_path, broker):
    specs = bounded(1, 3)
    url = BROKERS[broker]
    queues.append((url, specs[0]["queue"]))
    start_worker(specs, pool="threads", concurrency=4, broker=url)
    _, warm = client(specs, broker=url)
    admitted = [warm.cast("counter", hold(gate)) for _ in range(4)]
    frozen(warm, running=1, waiting=3)
    refused = tmp_path / "refused"

    def refusal(call: Callable[[], Any]) -> PoolBusy:
        with pytest.raises(PoolBusy) as caught:
            call()
        return caught.value

    busy = [
        refusal(lambda: warm.cast("counter", touch(refused))),
        refusal(lambda: warm.call("counter", touch(refused))),
        refusal(lambda: warm.transaction("counter", [touch(refused), touch(refused)])),
        refusal(lambda: asyncio.run(warm.acall("counter", touch(refused)))),
        refusal(lambda: asyncio.run(warm.acast("counter", touch(refused)))),
        refusal(lambda: list(warm.stream("counter", touch(refused)))),
    ]
    assert {(error.pool, error.count, error.bound, error.capacity) for error in busy} == {
        ("counter", 3, 3, 1)}
    assert all(error.retry_after > 0 for error in busy)
    mapped = list(warm.map("counter", [touch(refused)] * 3, return_exceptions=True))
    assert [type(item) for item in mapped] == [PoolBusy] * 3
    assert warm.status("counter").queued == (2 if broker == "redis" else 3)  # unchanged
    gate.touch()
    assert [result.get(timeout=30)[0]["result"] for result in admitted] == [True] * 4
    wait_until(lambda: warm.status("counter").backlog == 0, 10, "the backlog drained")
    # Nothing refused was queued anywhere: nothing refused ever ran.
    time.sleep(0.5)
    assert not refused.exists()


def test_retry_after_is_within_twice_the_measured_drain_time(start_worker, client, queues):
    specs = bounded(2, 20)
    queues.append((REDIS_BROKER, specs[0]["queue"]))
    start_worker(specs, pool="threads", concurrency=8)
    _, warm = client(specs)
    stop = threading.Event()
    refusals: list[tuple[float, PoolBusy]] = []

    def keep_full() -> None:
        # Two agents at 0.1 s a call drain 20 calls a second; this keeps 20 waiting.
        while not stop.is_set():
            try:
                warm.cast("counter", work(0.1))
            except PoolBusy as exc:
                refusals.append((time.monotonic(), exc))
                time.sleep(0.01)

    feeders = [threading.Thread(target=keep_full) for _ in range(2)]
    for feeder in feeders:
        feeder.start()
    time.sleep(4.0)  # long enough for the nodes to measure their drain rate
    stop.set()
    for feeder in feeders:
        feeder.join(10)
    stopped, last = refusals[-1]

    def waiting() -> int:
        status = warm.status("counter")
        return (status.queued or 0) + status.reserved

    while waiting() > 0:
        time.sleep(0.01)
    drained = time.monotonic() - stopped
    assert last.count >= 20
    assert drained / 2 <= last.retry_after <= drained * 2, (last.retry_after, drained)


def test_the_bound_holds_after_a_broker_restart_and_nothing_admitted_is_lost(
        private_redis, start_worker, client, queues):
    broker, backend = private_urls(private_redis)
    specs = bounded(2, 10)
    start_worker(specs, pool="threads", concurrency=8, broker=broker, backend=backend)
    _, warm = client(specs, broker=broker, backend=backend)
    admitted: list[Any] = []
    refused = [0]
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            try:
                admitted.append(warm.cast("counter", work(0.05)))
            except PoolBusy:
                refused[0] += 1
                time.sleep(0.02)

    feeders = [threading.Thread(target=feed) for _ in range(2)]
    for feeder in feeders:
        feeder.start()
    time.sleep(1.0)
    private_redis.restart(down=1.0)
    time.sleep(1.5)
    stop.set()
    for feeder in feeders:
        feeder.join(30)
    assert refused[0] > 0  # the bound was met, before and after the restart
    done = [result.get(timeout=60) for result in admitted]
    assert len(done) == len(admitted)  # every admitted cast ran: none lost


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_bound_holds_under_a_thousand_concurrent_callers(start_worker, client, queues,
                                                             gate, broker):
    specs = bounded(2, 50)
    url = BROKERS[broker]
    queues.append((url, specs[0]["queue"]))
    start_worker(specs, pool="threads", concurrency=8, broker=url)
    _, warm = client(specs, broker=url)
    start = threading.Barrier(1000)
    outcomes: list[Any] = [None] * 1000

    def cast(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = warm.cast("counter", hold(gate))
        except PoolBusy as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=cast, args=(index,)) for index in range(1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    admitted = [item for item in outcomes if not isinstance(item, PoolBusy)]
    assert all(isinstance(item, PoolBusy) for item in outcomes if item not in admitted)
    # Two run; the rest wait. The node took its reserve while the callers came: a
    # call admitted in the moment before it told the board is the stated tolerance
    # (at most its reserve room, the pool's capacity: 2).
    wait_until(lambda: warm.status("counter").running == 2, 10, "two running")
    status = warm.status("counter")
    waiting = (status.queued or 0) + status.reserved
    assert len(admitted) == waiting + 2
    assert 50 <= waiting <= 50 + 2, waiting
    gate.touch()
    for result in admitted:
        result.get(timeout=60)


def test_a_node_joining_counts_its_capacity_only_once_warm(start_worker, client, queues):
    specs = bounded(2, None)
    first = start_worker(specs, pool="threads", concurrency=4)
    _, warm = client(specs)
    board = BacklogBoard.of(warm.app)
    assert board is not None
    queue = specs[0]["queue"]
    wait_until(lambda: totals(board.read(queue)).capacity == 2, 10, "the first node counted")
    second = start_worker(specs, pool="threads", concurrency=4, wait=False,
                          env={"WARMPOOL_TEST_SETUP_SECONDS": "3"}).launch()
    warming = time.monotonic()
    while time.monotonic() - warming < 2.0:  # the second node warms for 3 s
        assert warm.status("counter").capacity == 2
        assert set(board.read(queue)) == {first.hostname}
        time.sleep(0.2)
    assert second.wait_until_ready(timeout=60)
    wait_until(lambda: totals(board.read(queue)).capacity == 4, 10, "both nodes counted")
    assert warm.status("counter").capacity == 4
    board.close()


def strings(document: Any) -> Iterator[str]:
    """Every string in a YAML document, keys and values, however deep."""
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for key, value in document.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(document, list):
        for item in document:
            yield from strings(item)


def test_the_backlog_gauges_are_exact_and_the_scaling_manifests_read_them(
        start_worker, client, queues, gate):
    port = free_port()
    specs = bounded(2, None)
    start_worker(specs, pool="threads", concurrency=8,
                 env={"WARMPOOL_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    _, warm = client(specs)
    url = f"http://127.0.0.1:{port}/metrics"
    casts = [warm.cast("counter", hold(gate)) for _ in range(10)]
    frozen(warm, running=2, waiting=8)
    samples = scrape_until(url, lambda found: found.get("warmpool_pool_backlog") == 10)
    assert (samples["warmpool_pool_backlog"], samples["warmpool_pool_capacity"]) == (10, 2)
    # The manifests reference only metrics a node exports.
    manifests = sorted((ROOT / "deploy" / "keda").glob("*.yaml"))
    referenced = {name for path in manifests
                  for document in yaml.safe_load_all(path.read_text())
                  for text in strings(document)
                  for name in re.findall(r"\bwarmpool_[a-z_]+", text)}
    assert {"warmpool_pool_backlog", "warmpool_pool_capacity"} <= referenced
    with urllib.request.urlopen(url, timeout=10) as response:
        exported = {family.name for family in
                    text_string_to_metric_families(response.read().decode())}
    assert referenced <= exported, referenced - exported
    gate.touch()
    for result in casts:
        result.get(timeout=30)
    samples = scrape_until(url, lambda found: found.get("warmpool_pool_backlog") == 0)
    assert (samples["warmpool_pool_backlog"], samples["warmpool_pool_capacity"]) == (0, 2)


def test_a_refused_call_is_429_with_retry_after_and_503_with_no_agent_anywhere(
        start_worker, client, queues, gate):
    specs = bounded(1, 2)
    worker = start_worker(specs, pool="threads", concurrency=4)
    _, warm = client(specs)
    increment = {"type": "counter.increment", "data": {"by": 1}}
    with GatewayProcess("tests.integration_app", worker.env) as gateway:
        gateway.checked()  # every response must be one the document describes
        with gateway.client() as http:
            assert [http.post("/pools/counter/cast", json=hold(gate)).status_code
                    for _ in range(3)] == [202] * 3
            frozen(warm, running=1, waiting=2)
            for route in ("call", "cast"):
                refused = http.post(f"/pools/counter/{route}", json=increment)
                body = refused.json()
                assert (refused.status_code, body["type"], body["title"]) == (
                    429, "urn:celery-warmpool:error:PoolBusy", "Pool busy")
                assert (body["pool"], body["count"], body["bound"], body["capacity"]) == (
                    "counter", 2, 2, 1)
                assert refused.headers["retry-after"] == str(max(1, math.ceil(
                    body["retry_after"])))
            gate.touch()
            wait_until(lambda: warm.status("counter").backlog == 0, 10, "drained")
            worker.stop()  # no node anywhere now: its report leaves the board
            assert [http.post("/pools/counter/cast", json=increment).status_code
                    for _ in range(2)] == [202] * 2
            unserved = http.post("/pools/counter/call", json=increment)
            body = unserved.json()
            assert (unserved.status_code, body["title"], body["capacity"], body["count"]) == (
                503, "No agent serves the pool", 0, 2)
            assert int(unserved.headers["retry-after"]) >= 1
