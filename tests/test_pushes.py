"""Pool calls pushed to a Redis broker directly, and the outbox that sends coroutines'
publishes together (a real Redis; no worker)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
import redis
from celery import signals

from celery_warmpool import PoolBusy, Signal
from celery_warmpool.client.outbox import Outbox
from celery_warmpool.client.pushes import RedisPushes
from celery_warmpool.wire.message import CALL_TASK, CallMessage
from tests.conftest import RABBITMQ_BROKER, REDIS_BACKEND, REDIS_BROKER
from tests.integration_app import make_app

QUEUE = "warmpool.pushes"
SPECS = [{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 1,
          "queue": QUEUE}]
CALL = CallMessage("counter", [Signal.new("counter.echo", {"value": "x"}).to_wire()], 100.0,
                   5.0, reply="warmpool:reply:test", sent=99.0)


@pytest.fixture
def broker() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_BROKER)
    client.flushdb()
    return client


def test_a_call_pushed_directly_is_what_kombu_would_write(broker):
    app, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    publisher = warm.client.publisher
    assert isinstance(publisher._pushes, RedisPushes)
    message = publisher.message(CALL_TASK, "t1", CALL, QUEUE)
    publisher.send(message)
    ours = json.loads(broker.rpop(QUEUE))
    with app.producer_or_acquire() as producer:  # kombu's own publish of the same message
        app.amqp.send_task_message(producer, message.name, message.body, retry=False,
                                   **message.options)
    kombus = json.loads(broker.rpop(QUEUE))
    ours_tag, kombus_tag = (found["properties"].pop("delivery_tag") for found in (ours, kombus))
    assert ours_tag != kombus_tag  # each has its own, as kombu gives
    assert ours == kombus
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}


def test_the_publish_signals_are_sent_when_something_listens(broker):
    _, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    publisher = warm.client.publisher
    heard: list[tuple[str, Any]] = []

    def before(sender: Any = None, headers: Any = None, routing_key: Any = None,
               **kwargs: Any) -> None:
        heard.append(("before", (sender, headers["id"], routing_key)))

    def after(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        heard.append(("after", (sender, headers["id"])))

    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)
    try:
        publisher.send(publisher.message(CALL_TASK, "t2", CALL, QUEUE))
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert heard == [("before", (CALL_TASK, "t2", QUEUE)), ("after", (CALL_TASK, "t2"))]
    assert broker.llen(QUEUE) == 1


def test_an_app_that_wants_task_sent_events_publishes_through_kombu():
    app, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    app.conf.task_send_sent_event = True
    assert warm.client.publisher._pushes is None
    _, on_rabbitmq = make_app(RABBITMQ_BROKER, REDIS_BACKEND, SPECS)
    assert on_rabbitmq.client.publisher._pushes is None


def test_the_outbox_sends_what_came_together_and_settles_each_with_its_own_outcome():
    rounds: list[list[int]] = []
    first_round = threading.Event()

    def send_many(messages: list[int]) -> list[BaseException | None]:
        if not rounds:
            first_round.wait(5)  # hold the first round so that the rest pile up
        rounds.append(list(messages))
        return [PoolBusy("busy", "pool", 1, 1, 0.5) if number % 10 == 9 else None
                for number in messages]

    outbox = Outbox(send_many)

    async def one(number: int) -> str:
        try:
            await outbox.send(number)
        except PoolBusy:
            return "refused"
        return "sent"

    async def main() -> list[str]:
        first = asyncio.ensure_future(one(0))
        await asyncio.sleep(0.05)  # the first round is out, held
        rest = [asyncio.ensure_future(one(number)) for number in range(1, 100)]
        await asyncio.sleep(0.05)
        first_round.set()
        return [await first, *await asyncio.gather(*rest)]

    outcomes = asyncio.run(main())
    assert outcomes == ["refused" if number % 10 == 9 else "sent" for number in range(100)]
    assert rounds == [[0], list(range(1, 100))]  # 99 publishes in one round


def test_direct_pushes_in_one_round_keep_each_bounded_pools_refusals(broker):
    _, warm = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    publisher = warm.client.publisher
    messages = [publisher.message(CALL_TASK, f"t{number}", CALL, QUEUE, max_queued=3)
                for number in range(5)]
    outcomes = publisher.send_many(messages)
    assert [outcome is None for outcome in outcomes] == [True, True, True, False, False]
    assert all(isinstance(outcome, PoolBusy) for outcome in outcomes[3:])
    assert broker.llen(QUEUE) == 3
