"""Replies stored where Celery stores them and published on their callers' channels, one
round trip each, and a batch's replies in one (a real Redis; no worker)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import states
from celery.app.task import Context

from celery_warmpool import ActionFailed
from celery_warmpool.wire.message import CallMessage
from celery_warmpool.wire.replies import envelope, opened
from celery_warmpool.wire.scoped import scoped
from celery_warmpool.worker.batches import store_all
from tests.conftest import REDIS_BACKEND, REDIS_BROKER
from tests.integration_app import make_app

SPECS = [{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 1}]
CHANNEL = "warmpool:reply:test-caller"


class Counting:
    """A redis client's pipelines, counted: how many round trips and which commands."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.round_trips = 0
        self.commands: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.client.pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            self.round_trips += 1
            self.commands += [str(command[0][0]) for command in pipe.command_stack]
            return real_execute(*a, **k)

        pipe.execute = execute
        return pipe


@pytest.fixture
def backend() -> Any:
    redis.Redis.from_url(REDIS_BACKEND).flushdb()
    app, _ = make_app(REDIS_BROKER, REDIS_BACKEND, SPECS)
    own = scoped(app).results.backend
    own.client = Counting(own.client)  # type: ignore[assignment]
    return own


def request(task_id: str, reply: str | None = CHANNEL) -> Context:
    return Context(id=task_id, args=CallMessage("counter", [], reply=reply).to_args())


def test_a_reply_is_stored_and_published_on_its_callers_channel_in_one_round_trip(backend):
    store = redis.Redis.from_url(REDIS_BACKEND)
    listening = store.pubsub()
    listening.subscribe(CHANNEL)
    assert listening.get_message(timeout=5)["type"] == "subscribe"
    backend.mark_as_done("t1", [{"result": 1}], request=request("t1"))
    published = listening.get_message(timeout=5)
    assert published is not None
    task_id, value = opened(published["data"])
    assert task_id == b"t1" and json.loads(value)["result"] == [{"result": 1}]
    assert store.get(backend.get_key_for_task("t1")) == value
    assert backend.client.round_trips == 1
    assert backend.client.commands == ["SETEX", "PUBLISH"]  # no read before the store
    assert envelope("t1", value) == published["data"]


def test_a_message_sent_by_celery_is_stored_and_published_as_celery_does(backend):
    store = redis.Redis.from_url(REDIS_BACKEND)
    key = backend.get_key_for_task("t2")
    listening = store.pubsub()
    listening.subscribe(key)
    assert listening.get_message(timeout=5)["type"] == "subscribe"
    backend.mark_as_done("t2", [1], request=request("t2", reply=None))
    published = listening.get_message(timeout=5)
    assert published is not None and published["data"] == store.get(key)


def test_a_batchs_replies_are_stored_in_one_round_trip(backend):
    runtime = SimpleNamespace(app=backend.app, dead_letter=lambda *a, **k: None)
    replies = [SimpleNamespace(to_wire=lambda number=number: {"result": number})
               for number in range(7)]
    items = [{"id": f"b{number}", "kind": "call", "pool": "counter", "signal": {},
              "reply_to": None, "correlation_id": f"b{number}", "retries": 0,
              "args": list(CallMessage("counter", [], reply=CHANNEL).to_args())}
             for number in range(8)]
    failed = ActionFailed("no", "counter.x", "x", "ValueError: no")
    store_all(runtime, [*zip(items, replies, strict=False), (items[7], failed)])
    assert backend.client.round_trips == 1
    assert backend.client.commands == ["SETEX", "PUBLISH"] * 8
    metas = [backend.get_task_meta(f"b{number}") for number in range(8)]
    assert [meta["status"] for meta in metas] == [states.SUCCESS] * 7 + [states.FAILURE]
    assert [meta["result"][0]["result"] for meta in metas[:7]] == list(range(7))
