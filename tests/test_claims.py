"""The taken mark: a worker marks a call before it starts it, and only one copy runs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore

from celery_warmpool.core.errors import CheckoutTimeout
from celery_warmpool.core.signal import Signal
from celery_warmpool.wire.marks import (
    CLAIM,
    TAKEN_MARGIN,
    TakenMark,
    cancel_key,
    mark_cancelled,
    taken_key,
    taken_ttl,
    taken_value,
)
from celery_warmpool.wire.message import CALL_TASK, CallMessage
from celery_warmpool.worker.claims import CallClaims
from tests.conftest import REDIS_BROKER, wait_until
from tests.flower_page import free_port
from tests.test_worker import INCREMENT, counter


def test_a_mark_reads_back_what_the_worker_wrote():
    assert taken_key("abc") == "warmpool:taken:abc"
    assert TakenMark.parse(taken_value("node-a", 41, 12.5)) == TakenMark("node-a", 41, 12.5)
    assert TakenMark.parse(taken_value("node-a", 41, 12.5).encode()) == TakenMark(
        "node-a", 41, 12.5)
    with pytest.raises(ValueError):
        TakenMark.parse(b'{"node": "node-a"}')
    with pytest.raises(ValueError):
        TakenMark.parse(b"not json")


def test_a_mark_lives_until_the_deadline_and_the_margin():
    assert taken_ttl(110.0, now=100.0) == 10.0 + TAKEN_MARGIN
    assert taken_ttl(90.0, now=100.0) == TAKEN_MARGIN
    assert taken_ttl(None, now=100.0) == TAKEN_MARGIN


def sent_task(backend: Any, task_id: str, name: str = CALL_TASK) -> Any:
    """What the claims read of a task: its request's id, its name and its result store."""
    return SimpleNamespace(request=SimpleNamespace(id=task_id), backend=backend, name=name)


def run_if_claimed(claims: CallClaims, task: Any, pool: str, deadline: float | None,
                   run: Callable[[], Any], copy: int | None = None) -> Any:
    """``run()`` if ``claims`` marks the work of ``task`` taken, as a worker does; else
    drop it (:class:`Ignore`)."""
    if not claims.claim(task.backend, pool, str(task.request.id), deadline, copy):
        raise Ignore()
    return run()


@pytest.fixture
def redis_backend(private_redis: Any) -> Any:
    # A redis-server of the test's own: other test runs share the test databases.
    return Celery("claims", broker=f"{private_redis.url}/0", backend=f"{private_redis.url}/1",
                  set_as_current=False).backend


def store_of(backend: Any) -> redis.Redis:
    return redis.Redis.from_url(backend.url)


def claims_of(node: str) -> CallClaims:
    return CallClaims(SimpleNamespace(node=node))  # type: ignore[arg-type]


@pytest.mark.integration
def test_the_first_copy_runs_and_marks_the_call_a_second_copy_is_dropped(redis_backend):
    claims, task_id = claims_of("node-a"), str(uuid.uuid4())
    task = sent_task(redis_backend, task_id)
    deadline = time.time() + 10
    assert run_if_claimed(claims, task, "pool", deadline, lambda: "ran") == "ran"
    ran_again = []
    with pytest.raises(Ignore):
        run_if_claimed(claims, task, "pool", deadline, lambda: ran_again.append(1))
    assert ran_again == []
    store = store_of(redis_backend)
    mark = TakenMark.parse(store.get(taken_key(task_id)))
    assert mark.node == "node-a" and abs(mark.at - time.time()) < 5
    assert (10 + TAKEN_MARGIN - 5) * 1000 < store.pttl(taken_key(task_id)) <= (
        10 + TAKEN_MARGIN) * 1000


@pytest.mark.integration
def test_a_released_mark_lets_another_node_take_the_call(redis_backend):
    # What a batch handed back to the broker does with the marks it set (a single call
    # is marked only once it holds an agent, after any hand-back).
    claims, task_id = claims_of("node-a"), str(uuid.uuid4())
    task = sent_task(redis_backend, task_id)
    assert claims.claim(redis_backend, "pool", task_id, time.time() + 10) is True
    claims.release(redis_backend, task_id)
    assert store_of(redis_backend).exists(taken_key(task_id)) == 0
    assert run_if_claimed(claims_of("node-b"), task, "pool", time.time() + 10,
                          lambda: "b") == "b"


@pytest.mark.integration
def test_a_call_its_caller_left_is_dropped_at_its_claim_in_the_same_round_trip(
        redis_backend):
    store = store_of(redis_backend)
    left_before, left_while_waiting = str(uuid.uuid4()), str(uuid.uuid4())
    # Left before any worker took it: the caller marked it taken (and cancelled).
    mark_cancelled(store, task_id=left_before, seconds=10)
    # Left while it waited in a worker: only its cancel mark.
    store.set(cancel_key(left_while_waiting), b"1", px=10_000)
    claims = claims_of("node-a")
    assert claims.claim(redis_backend, "pool", left_before, time.time() + 10) is False
    assert claims.claim(redis_backend, "pool", left_while_waiting, time.time() + 10) is False
    assert store.get(taken_key(left_while_waiting)) is None  # not marked by this copy


def message(sent: float | None = None) -> CallMessage:
    return CallMessage("pool", [], time.time() + 10, 5.0, sent=sent)


@pytest.mark.integration
@pytest.mark.rabbitmq
def test_a_broker_that_keeps_its_messages_needs_no_mark_only_a_cancel_check(private_redis):
    from tests.conftest import RABBITMQ_BROKER

    backend = Celery("claims", broker=RABBITMQ_BROKER, backend=f"{private_redis.url}/1",
                     set_as_current=False).backend
    store, claims = store_of(backend), claims_of("node-a")
    fresh, left = str(uuid.uuid4()), str(uuid.uuid4())
    store.set(cancel_key(left), b"1", px=10_000)
    # Taken at once, sent a moment ago: its caller is there; nothing read or written.
    assert claims.admit(sent_task(backend, fresh), message(time.time()), waited=False)
    assert store.exists(taken_key(fresh)) == 0
    # Its caller left while it waited (for an agent, or in the queue): dropped.
    assert not claims.admit(sent_task(backend, left), message(time.time()), waited=True)
    assert not claims.admit(sent_task(backend, left), message(time.time() - 5), waited=False)
    assert store.exists(taken_key(left)) == 0


@pytest.mark.integration
def test_a_mark_whose_answer_was_lost_is_still_ours(redis_backend, monkeypatch):
    # The claim's script ran on the server, and its answer was lost to a dropped
    # connection: tried again, it finds the key set, by this very process.
    client = redis_backend.client
    real_evalsha = client.evalsha
    lost: list[int] = []

    def run_then_lose_the_answer(*args: Any, **kwargs: Any) -> Any:
        answer = real_evalsha(*args, **kwargs)
        if not lost:
            lost.append(1)
            raise redis.ConnectionError("the answer was lost")
        return answer

    monkeypatch.setattr(client, "evalsha", run_then_lose_the_answer)
    task = sent_task(redis_backend, str(uuid.uuid4()))
    redis_backend.client.script_load(CLAIM)
    assert run_if_claimed(claims_of("node-a"), task, "pool", time.time() + 10,
                          lambda: "ran") == "ran"
    assert lost == [1]
    with pytest.raises(Ignore):
        run_if_claimed(claims_of("node-b"), task, "pool", time.time() + 10, lambda: "ran")


def test_a_result_store_away_past_the_deadline_is_checkout_timeout():
    backend = Celery("claims", broker=REDIS_BROKER,
                     backend=f"redis://127.0.0.1:{free_port()}/0",
                     set_as_current=False).backend
    task = sent_task(backend, str(uuid.uuid4()))
    started = time.monotonic()
    with pytest.raises(CheckoutTimeout) as caught:
        run_if_claimed(claims_of("node-a"), task, "pool", time.time() + 0.5, lambda: "ran")
    assert time.monotonic() - started < 3.0
    assert caught.value.pool == "pool" and "not run" in str(caught.value)


def test_a_result_store_that_holds_no_marks_runs_every_copy():
    backend = Celery("claims", backend="cache+memory://", set_as_current=False).backend
    task = sent_task(backend, str(uuid.uuid4()))
    claims = claims_of("node-a")
    assert [run_if_claimed(claims, task, "pool", time.time() + 10, lambda: "ran")
            for _ in range(2)] == ["ran", "ran"]


@pytest.mark.integration
def test_a_call_published_twice_runs_once_on_a_worker(private_redis, start_worker, client):
    specs = counter(1)
    broker, backend = f"{private_redis.url}/0", f"{private_redis.url}/1"
    worker = start_worker(specs, pool="threads", concurrency=2, broker=broker, backend=backend)
    _, warm = client(specs, broker=broker, backend=backend)
    store = redis.Redis.from_url(backend)
    task_id = str(uuid.uuid4())
    publisher = warm.client.publisher
    message = publisher.message(
        CALL_TASK, task_id,
        CallMessage("counter", [Signal.parse(INCREMENT).to_wire()], time.time() + 10, 5.0),
        warm.spec("counter").queue)
    publisher.send(message)
    publisher.send(message)  # the same call again, as a caller that saw no mark would

    wait_until(lambda: "this copy is dropped" in worker.log(), 20,
               "the worker dropped the second copy")
    # The copies run side by side: the second may be dropped before the first has stored.
    wait_until(lambda: store.exists(f"celery-task-meta-{task_id}"), 10, "the reply stored")
    stored = json.loads(store.get(f"celery-task-meta-{task_id}"))
    assert stored["status"] == "SUCCESS"
    assert stored["result"][0]["state"]["count"] == 1
    assert warm.call("counter", INCREMENT).state["count"] == 2  # it ran once, not twice
    mark = TakenMark.parse(store.get(taken_key(task_id)))
    assert mark.node == worker.hostname


class ReservedCall:
    """A call waiting in a worker's main process (what LateCalls reads of a request)."""

    def __init__(self, task_id: str, deadline: float) -> None:
        self.id, self.name = task_id, CALL_TASK
        self.args = CallMessage("pool", [], deadline, 5.0).to_args()


@pytest.mark.integration
def test_a_late_call_is_answered_unless_a_copy_of_it_was_taken(private_redis, monkeypatch):
    from celery.worker import state as worker_state

    from celery_warmpool.worker.late_calls import LateCalls

    app = Celery("claims", broker=f"{private_redis.url}/0", backend=f"{private_redis.url}/1",
                 set_as_current=False)
    waiting, taken = str(uuid.uuid4()), str(uuid.uuid4())
    calls = [ReservedCall(waiting, time.time() - 5), ReservedCall(taken, time.time() - 5)]
    monkeypatch.setattr(worker_state, "reserved_requests", set(calls))
    monkeypatch.setattr(worker_state, "active_requests", set())
    assert run_if_claimed(claims_of("node-b"), sent_task(app.backend, taken), "pool",
                                        time.time() + 10, lambda: "ran elsewhere") == (
        "ran elsewhere")

    assert LateCalls(app).answer_late_calls() == 1
    assert app.backend.get_task_meta(waiting)["status"] == "FAILURE"
    assert app.backend.get_task_meta(taken)["status"] == "PENDING"  # its copy answers
