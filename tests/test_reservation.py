"""Each pool's queue is reserved on its own bound: running <= capacity and reserved but
not running <= capacity, per pool and per node, also after a broker reconnection."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.test_outages import private_urls
from tests.test_worker import counter, max_overlap, work

pytestmark = pytest.mark.integration

TWO_POOLS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "tally", "agent": "tests.integration_app:CounterAgent", "size": 1},
]


def taken(app: Any, node: str, queue: str) -> int:
    """Messages of ``queue`` the node holds (running and reserved), as the node counts them
    in one go. (``inspect active`` and ``inspect reserved`` are two broadcasts: a task that
    starts between them would be counted twice.)"""
    pool = queue.removeprefix("warmpool.")
    parts = app.warmpool.status_reader.collect(pool, timeout=2.0, destination=[node])
    return sum(part.reservations.get(node, (0, 0))[0] for part in parts.get(pool, []))


def inspect_taken(app: Any, node: str, queue: str) -> int:
    """The same count from Celery's own ``inspect`` (two broadcasts, so not atomic)."""
    inspect = app.control.inspect(destination=[node], timeout=1.0)
    requests = [*((inspect.active() or {}).get(node) or []),
                *((inspect.reserved() or {}).get(node) or [])]
    return sum(1 for request in requests
               if (request.get("delivery_info") or {}).get("routing_key") == queue)


def most_taken_while(app: Any, node: str, queue: str, results: list[Any]) -> int:
    """The most messages of ``queue`` the node held while ``results`` were not all ready."""
    most = 0
    while not all(result.ready() for result in results):
        most = max(most, taken(app, node, queue))
        time.sleep(0.05)
    return most


def overlap_of(results: list[Any]) -> int:
    replies = [result.get(timeout=30)[0] for result in results]
    return max_overlap([(reply["result"]["last_start"], reply["result"]["last_end"])
                        for reply in replies])


@pytest.mark.parametrize("execution,concurrency", [("threads", 8), ("prefork", 2)])
def test_each_pool_is_bounded_on_its_own(start_worker, client, execution, concurrency):
    worker = start_worker(TWO_POOLS, pool=execution, concurrency=concurrency)
    app, warm = client(TWO_POOLS)
    # Capacity of 'counter' on this node: 2 agents (threads), or 2 children (prefork).
    casts = [warm.cast("counter", work(0.8)) for _ in range(10)]
    time.sleep(0.3)
    # Celery's own view agrees (taken when nothing is moving between its two lists).
    assert inspect_taken(app, worker.hostname, "warmpool.counter") <= 4
    most = most_taken_while(app, worker.hostname, "warmpool.counter", casts)
    assert most <= 4, most
    assert overlap_of(casts) == 2
    status = warm.status_reader.collect("counter", timeout=2.0,
                                        destination=[worker.hostname])["counter"][0]
    assert status.reservations[worker.hostname] == (0, 4)  # idle now; window 2 x 2
    # The other pool's queue was never starved of its own room.
    assert warm.call("tally", work(0.0), timeout=5).pool == "tally"


@pytest.mark.parametrize("execution,concurrency", [("threads", 8), ("prefork", 2)])
def test_the_bound_holds_after_a_broker_reconnection(private_redis, start_worker, client,
                                                      execution, concurrency):
    broker, backend = private_urls(private_redis)
    worker = start_worker(TWO_POOLS, pool=execution, concurrency=concurrency,
                          broker=broker, backend=backend)
    app, warm = client(TWO_POOLS, broker=broker, backend=backend)
    first = [warm.cast("counter", work(1.0)) for _ in range(4)]
    time.sleep(0.5)  # some of them running, the rest reserved
    private_redis.restart(down=1.0)
    casts = first + [warm.cast("counter", work(0.8)) for _ in range(10)]
    most = most_taken_while(app, worker.hostname, "warmpool.counter", casts)
    assert most <= 4, most
    replies = [result.get(timeout=60)[0] for result in casts]
    assert len(replies) == 14
    assert not worker.exited()


def test_a_busy_pool_holds_no_more_than_its_window_across_many_nodes(start_worker, client):
    # Two threads nodes each hosting a pool of 1: four slow casts are shared out, two
    # apiece (one running, one reserved), never three on one node.
    first = start_worker(counter(1), pool="threads", concurrency=4)
    second = start_worker(counter(1), pool="threads", concurrency=4)
    app, warm = client(counter(1))
    casts = [warm.cast("counter", work(1.0)) for _ in range(4)]
    held: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            held.append(max(taken(app, node.hostname, "warmpool.counter")
                            for node in (first, second)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    replies = [result.get(timeout=30)[0] for result in casts]
    stop.set()
    sampler.join(5)
    assert max(held) <= 2
    assert {reply["node"] for reply in replies} == {first.hostname, second.hostname}
