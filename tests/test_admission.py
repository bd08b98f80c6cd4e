"""The admission check, the backlog board and the drain rate, on a real Redis (no worker)."""

from __future__ import annotations

import json
import pickle
import time
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection

from celery_warmpool import ConfigurationError, PoolBusy, PoolSpec, Signal
from celery_warmpool.client.admission import (
    UNKNOWN_RETRY_AFTER,
    Bound,
    admit,
    busy,
    retry_after,
)
from celery_warmpool.core.status import PoolLoad
from celery_warmpool.http.problems import problem_for
from celery_warmpool.wire.backlog import BacklogBoard, board_key, decode, encode, totals
from celery_warmpool.wire.message import CALL_TASK, CallMessage
from celery_warmpool.worker.backlog import DrainMeter
from tests.conftest import RABBITMQ_BROKER, REDIS_BACKEND, REDIS_BROKER
from tests.integration_app import CounterAgent, make_app

QUEUE = "warmpool.admission"
SPECS = [{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 1,
          "queue": QUEUE}]


@pytest.fixture
def broker() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_BROKER)
    client.flushdb()
    return client


@pytest.fixture
def channel(broker: redis.Redis) -> Any:
    with Connection(REDIS_BROKER) as connection:
        yield connection.channel()


def message(channel: Any, task_id: str = "t1", priority: int = 0) -> dict[str, Any]:
    """A message as kombu writes it for ``QUEUE`` (before its push)."""
    body = channel.prepare_message("{}", priority, "application/json", "utf-8", {}, {})
    channel._inplace_augment_message(body, "", QUEUE)
    body["headers"]["id"] = task_id
    return dict(body)


def report(broker: redis.Redis, node: str, load: PoolLoad, ttl_ms: int) -> None:
    board = BacklogBoard(broker)
    board.report(QUEUE, node, load, ttl=ttl_ms / 1000)


def test_pool_busy_survives_celerys_round_trip():
    error = PoolBusy("pool 'x' is busy", "x", 12, 10, 0.75, 4)
    for copy in (type(error)(*error.args), pickle.loads(pickle.dumps(error))):
        assert (copy.pool, copy.count, copy.bound, copy.retry_after, copy.capacity) == (
            "x", 12, 10, 0.75, 4)
        assert str(copy) == "pool 'x' is busy"


def test_retry_after_is_the_waiting_calls_over_the_drain_rate():
    assert retry_after(20, 40.0) == 0.5
    assert retry_after(1, 1000.0) == 0.01  # never shorter
    assert retry_after(10**9, 0.5) == 3600.0  # never longer
    assert retry_after(5, 0.0) == UNKNOWN_RETRY_AFTER  # no rate known
    error = busy(Bound("x", QUEUE, 10), 10, 4, 20.0)
    assert (error.count, error.bound, error.capacity, error.retry_after) == (10, 10, 4, 0.5)
    assert "try again in 0.50s" in str(error)


def test_max_queued_is_checked_and_read_from_the_environment():
    with pytest.raises(ConfigurationError, match="max_queued"):
        PoolSpec("x", CounterAgent, max_queued=0)
    assert PoolSpec("x", CounterAgent).max_queued is None
    spec = PoolSpec("x", CounterAgent).with_environment({"WARMPOOL_X_MAX_QUEUED": "25"})
    assert spec.max_queued == 25


def test_the_script_counts_every_list_and_the_fresh_reports_and_pushes_under_the_bound(
        broker, channel):
    bound = Bound("counter", QUEUE, 6)
    # Two calls queued at priority 0, one at priority 9 (a list of its own).
    broker.lpush(QUEUE, b"a", b"b")
    broker.lpush(f"{QUEUE}\x06\x169", b"c")
    report(broker, "n1", PoolLoad(reserved=2, running=4, capacity=4, drain_rate=10.0), 60_000)
    report(broker, "gone", PoolLoad(reserved=50, capacity=50, drain_rate=99.0), 1)
    time.sleep(0.01)  # the second report has expired: it is not counted
    admit(channel, bound, message(channel))  # 3 queued + 2 reserved = 5 < 6: pushed
    assert broker.llen(QUEUE) == 3
    with pytest.raises(PoolBusy) as caught:
        admit(channel, bound, message(channel, "t2"))  # 6: refused, nothing pushed
    assert (caught.value.count, caught.value.bound, caught.value.capacity) == (6, 6, 4)
    assert caught.value.retry_after == pytest.approx(0.6)
    assert broker.llen(QUEUE) == 3
    pushed = json.loads(broker.lindex(QUEUE, 0))
    assert pushed["headers"]["id"] == "t1"


def test_the_script_pushes_to_the_messages_priority_list(broker, channel):
    admit(channel, Bound("counter", QUEUE, 5), message(channel, priority=9))
    assert (broker.llen(QUEUE), broker.llen(f"{QUEUE}\x06\x169")) == (0, 1)


def test_a_bounded_call_is_written_byte_for_byte_as_kombu_writes_it(broker):
    _, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    publisher = warm.client.publisher
    call = CallMessage("counter", [Signal.new("counter.echo", {}).to_wire()], 100.0, 5.0)
    written = []
    for max_queued in (None, 100):  # kombu's own LPUSH, then the admission script
        publisher.send(publisher.message(CALL_TASK, "t1", call, QUEUE, max_queued))
        written.append(json.loads(broker.rpop(QUEUE)))
    tags = [found["properties"].pop("delivery_tag") for found in written]
    assert tags[0] != tags[1]  # each publish has its own, as kombu gives
    assert written[0] == written[1]
    assert written[0]["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}


def test_a_copy_sent_again_is_not_held_to_the_bound(broker):
    _, warm = make_app(REDIS_BROKER, REDIS_BACKEND, [{**SPECS[0], "max_queued": 1}])
    publisher = warm.client.publisher
    call = CallMessage("counter", [Signal.new("counter.echo", {}).to_wire()], None, None)
    first = publisher.message(CALL_TASK, "t1", call, QUEUE, 1)
    publisher.send(first)
    with pytest.raises(PoolBusy):
        publisher.send(publisher.message(CALL_TASK, "t2", call, QUEUE, 1))
    publisher.send(first.again())  # admitted once: sent again whatever waits
    assert broker.llen(QUEUE) == 2


def test_the_board_keeps_a_report_for_its_ttl_and_sums_nodes(broker):
    board = BacklogBoard(broker)
    board.report(QUEUE, "a", PoolLoad(reserved=1, running=2, capacity=3, drain_rate=1.5))
    board.report(QUEUE, "b", PoolLoad(reserved=4, running=0, capacity=2, drain_rate=0.25),
                 ttl=0.05)
    assert set(board.read(QUEUE)) == {"a", "b"}
    assert totals(board.read(QUEUE)) == PoolLoad(reserved=5, running=2, capacity=5,
                                                 drain_rate=1.75)
    time.sleep(0.1)
    assert set(board.read(QUEUE)) == {"a"}
    board.withdraw(QUEUE, "a")
    assert board.read(QUEUE) == {}
    assert broker.type(board_key(QUEUE)) in (b"hash", b"none")
    load = PoolLoad(reserved=7, running=8, capacity=9, drain_rate=12.345)
    assert decode(encode(load) + " 123") == load


def test_the_drain_rate_counts_only_busy_intervals():
    meter = DrainMeter(window=10.0)
    meter.sample(0.0, 0, busy=True)
    meter.sample(1.0, 20, busy=False)  # busy from 0 to 1: 20 a second
    meter.sample(2.0, 22, busy=True)  # idle from 1 to 2: not counted
    assert meter.sample(3.0, 42, busy=True) == pytest.approx(20.0)
    assert meter.sample(14.0, 42, busy=False) == 0.0  # busy and no start: it drains nothing
    idle = DrainMeter()
    idle.sample(0.0, 0, busy=False)
    assert idle.sample(2.0, 3, busy=False) == pytest.approx(1.5)  # no busy interval: all
    assert idle.sample(3.0, 1, busy=False) == 0.0  # counters went back (a child died)


@pytest.mark.parametrize("capacity,status,title", [(3, 429, "Pool busy"),
                                                   (0, 503, "No agent serves the pool")])
def test_pool_busy_over_http_is_429_or_503_with_no_agent(capacity, status, title):
    body, headers = problem_for(PoolBusy("busy", "x", 9, 8, 2.2, capacity))
    assert (body["status"], body["title"], body["count"], body["bound"]) == (status, title, 9, 8)
    assert (body["retry_after"], body["capacity"]) == (2.2, capacity)
    assert headers == {"Retry-After": "3"}


@pytest.mark.parametrize("broker,backend", [(REDIS_BROKER, "cache+memory://"),
                                            (RABBITMQ_BROKER, "rpc://")])
def test_calls_through_celerys_own_publish_are_held_to_the_bound_too(broker, backend):
    # A result store without a reply listener: the call goes out through apply_async,
    # on a producer of the package's, which holds it to the bound all the same.
    queue = f"warmpool.admission.{uuid.uuid4().hex[:8]}"
    specs = [{**SPECS[0], "queue": queue, "max_queued": 2}]
    app, warm = make_app(broker, backend, specs)
    try:
        for _ in range(2):
            warm.cast("counter", {"type": "counter.echo", "data": {}})
        with pytest.raises(PoolBusy) as caught:
            warm.call("counter", {"type": "counter.echo", "data": {}}, timeout=0.5)
        assert (caught.value.count, caught.value.bound, caught.value.capacity) == (2, 2, 0)
    finally:
        with app.connection_for_write() as connection:
            channel = connection.channel()
            channel.queue_delete(queue)
            channel.close()
