"""Work lost with a restarting Redis broker is sent again: calls by their waiting caller,
casts from the record each caller process keeps (and a copy never runs beside another).

A message popped in the broker's last moment exists nowhere afterwards. The tests make
such a loss on purpose: they take the message out of the queue while no worker listens,
then restart the broker (a redis-server of the test's own, which is the result store
too, as in the usual set-up), and only then start a worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore

from celery_warmpool.client.resends import SentCasts
from celery_warmpool.wire.marks import CAST_MARGIN, TakenMark, taken_key
from celery_warmpool.worker import claims as claims_module
from celery_warmpool.worker.claims import CallClaims
from tests.conftest import PrivateRedis, wait_until
from tests.flower_page import free_port
from tests.test_claims import run_if_claimed
from tests.test_streams import chunks
from tests.test_worker import INCREMENT, counter

pytestmark = pytest.mark.integration


def claims_of(node: str) -> CallClaims:
    return CallClaims(SimpleNamespace(node=node))  # type: ignore[arg-type]


def sent_task(backend: Any, task_id: str) -> Any:
    return SimpleNamespace(request=SimpleNamespace(id=task_id), backend=backend)


@pytest.fixture
def backend(private_redis: PrivateRedis) -> Any:
    return Celery("resends", broker=f"{private_redis.url}/0",
                  backend=f"{private_redis.url}/1", set_as_current=False).backend


# -- the worker's side: which copy of a cast runs ----------------------------------------

def test_a_cast_runs_again_as_the_same_copy_but_never_beside_another(backend):
    task_id = str(uuid.uuid4())
    task, runs = sent_task(backend, task_id), []
    node_a, node_b = claims_of("node-a"), claims_of("node-b")

    run_if_claimed(node_a, task, "pool", None, lambda: runs.append("first"), copy=0)
    # The same message delivered again (its process died): at least once, it runs.
    run_if_claimed(node_b, task, "pool", None, lambda: runs.append("again"), copy=0)
    # A copy its caller sent again, as no mark was seen yet: dropped.
    with pytest.raises(Ignore):
        run_if_claimed(node_b, task, "pool", None, lambda: runs.append("copy 1"), copy=1)

    assert runs == ["first", "again"]
    store = redis.Redis.from_url(backend.url)
    assert TakenMark.parse(store.get(taken_key(task_id))).copy == 0
    assert store.pttl(taken_key(task_id)) > (CAST_MARGIN - 10) * 1000


def test_a_copy_sent_again_runs_where_the_first_was_lost(backend):
    task_id = str(uuid.uuid4())
    task, runs = sent_task(backend, task_id), []
    run_if_claimed(claims_of("node-a"), task, "pool", None, lambda: runs.append("copy 1"), copy=1)
    with pytest.raises(Ignore):  # the first copy, found after all: dropped
        run_if_claimed(claims_of("node-b"), task, "pool", None, lambda: runs.append("copy 0"),
                                     copy=0)
    assert runs == ["copy 1"]


def test_a_batch_claims_its_messages_in_one_go(backend):
    calls, casts = [str(uuid.uuid4()) for _ in range(2)], [str(uuid.uuid4()) for _ in range(2)]
    deadline = time.time() + 10
    node_a, node_b = claims_of("node-a"), claims_of("node-b")
    assert node_a.claim_all(backend, [(calls[0], deadline, None), (casts[0], None, 0)]) == [
        True, True]
    # Delivered again after a batch's process died: the same copies run again; a cast's
    # other copy, a new call and a new cast's copy do not clash.
    assert node_b.claim_all(backend, [
        (calls[0], deadline, None), (casts[0], None, 0), (casts[0], None, 1),
        (calls[1], deadline, None), (casts[1], None, 1)]) == [True, True, False, True, True]
    node_b.release_all(backend, [calls[1], casts[1]])
    store = redis.Redis.from_url(backend.url)
    assert store.exists(taken_key(calls[1]), taken_key(casts[1])) == 0


def test_a_batch_runs_unmarked_when_the_store_is_away():
    away = Celery("resends", backend=f"redis://127.0.0.1:{free_port()}/0",
                  set_as_current=False).backend
    away.client.connection_pool.connection_kwargs["socket_connect_timeout"] = 0.5
    assert claims_of("node-a").claim_all(away, [("a", None, 0), ("b", None, None)]) == [
        True, True]


def test_a_cast_without_a_deadline_runs_unmarked_rather_than_never(monkeypatch):
    monkeypatch.setattr(claims_module, "UNMARKED_AFTER", 0.5)
    away = Celery("resends", backend=f"redis://127.0.0.1:{free_port()}/0",
                  set_as_current=False).backend
    task = sent_task(away, str(uuid.uuid4()))
    started = time.monotonic()
    assert run_if_claimed(claims_of("node-a"), task, "pool", None, lambda: "ran", copy=0) == "ran"
    assert time.monotonic() - started < 5


# -- the caller's side: the casts it keeps ---------------------------------------------

def test_casts_not_taken_are_sent_again_as_their_next_copy(backend):
    store = redis.Redis.from_url(backend.url)
    sent: list[list[tuple[str, int]]] = []
    casts = SentCasts(lambda messages: sent.append(messages))  # type: ignore[arg-type,return-value]
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for task_id in ids:
        casts.add(task_id, lambda copy, task_id=task_id: (task_id, copy))  # type: ignore[misc]
    store.set(taken_key(ids[1]), "{}")

    casts.check(store)
    casts.check(store)

    assert sent == [[(ids[0], 1), (ids[2], 1)], [(ids[0], 2), (ids[2], 2)]]
    assert len(casts) == 2  # the one taken is forgotten


def test_casts_are_kept_for_a_while_and_a_bounded_number():
    casts = SentCasts(lambda messages: None, kept=0.2, most=3)
    for number in range(5):
        casts.add(str(number), lambda copy: None)  # type: ignore[arg-type,return-value]
    assert len(casts) == 3
    time.sleep(0.3)
    casts.add("last", lambda copy: None)  # type: ignore[arg-type,return-value]
    assert len(casts) == 1


# -- end to end: lost in a broker restart, sent again, run once ---------------------------

def take_out(server: PrivateRedis, queue: str, task_id: str) -> None:
    """Remove the message of ``task_id`` from ``queue``, as a broker's last pop would."""
    store = redis.Redis(port=server.port)
    for raw in store.lrange(queue, 0, -1):
        if json.loads(raw)["headers"]["id"] == task_id:
            assert store.lrem(queue, 1, raw) == 1
            return
    raise AssertionError(f"{task_id} is not in {queue}")


def queued_ids(server: PrivateRedis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["id"]
            for raw in redis.Redis(port=server.port).lrange(queue, 0, -1)]


def test_calls_streams_and_casts_lost_with_the_broker_run_once_after_its_restart(
        private_redis, start_worker, client, tmp_path):
    specs = counter(1)
    broker, backend = f"{private_redis.url}/0", f"{private_redis.url}/1"
    _, warm = client(specs, broker=broker, backend=backend)
    queue = warm.spec("counter").queue
    lost_cast = warm.cast("counter", INCREMENT).id
    kept_cast = warm.cast("counter", INCREMENT).id
    replies: list[Any] = []
    produced = tmp_path / "produced"
    callers = [
        threading.Thread(target=lambda: replies.append(
            warm.call("counter", INCREMENT, timeout=90))),
        threading.Thread(target=lambda: replies.append(list(warm.stream(
            "counter", chunks(3, log=produced), timeout=90)))),
    ]
    for caller in callers:
        caller.start()
    wait_until(lambda: len(queued_ids(private_redis, queue)) == 4, 10, "four messages queued")
    waited = [task_id for task_id in queued_ids(private_redis, queue)
              if task_id not in (lost_cast, kept_cast)]
    for task_id in (lost_cast, *waited):
        take_out(private_redis, queue, task_id)

    private_redis.restart(down=0.5)
    # After the restart: the call, the stream and the lost cast sent again, and the cast
    # still queued too (nothing tells it from a lost one), as copies that cannot run twice.
    wait_until(lambda: sorted(queued_ids(private_redis, queue)) == sorted(
        [kept_cast, lost_cast, *waited, kept_cast]), 20, "all sent again")
    worker = start_worker(specs, pool="threads", concurrency=2, broker=broker,
                          backend=backend)
    for caller in callers:
        caller.join(60)

    # Each ran once: two casts, the call and the stream, then this call.
    assert warm.call("counter", INCREMENT, timeout=30).state["count"] == 5
    assert [0, 1, 2] in replies and len(replies) == 2
    assert produced.read_text().split() == ["0", "1", "2", "end"]  # it ran once
    wait_until(lambda: f"cast (copy 1) {kept_cast} was taken already" in worker.log(), 10,
               "the second copy of the cast still queued dropped")


def test_a_broker_on_its_own_server_is_watched_and_what_it_lost_sent_again(
        private_redis, start_worker, client, caplog):
    # The result store stays up: only the broker's own watch sees the restart.
    caplog.set_level(logging.WARNING, "celery_warmpool.client.listener")
    specs = counter(1)
    broker = f"{private_redis.url}/0"
    _, warm = client(specs, broker=broker)
    queue = warm.spec("counter").queue
    lost_cast = warm.cast("counter", INCREMENT).id
    replies: list[Any] = []
    caller = threading.Thread(target=lambda: replies.append(
        warm.call("counter", INCREMENT, timeout=90)))
    caller.start()
    wait_until(lambda: len(queued_ids(private_redis, queue)) == 2, 10, "two messages queued")
    for task_id in queued_ids(private_redis, queue):
        take_out(private_redis, queue, task_id)

    private_redis.restart(down=0.5)
    wait_until(lambda: len(queued_ids(private_redis, queue)) == 2, 20, "both sent again")
    assert lost_cast in queued_ids(private_redis, queue)
    start_worker(specs, pool="threads", concurrency=2, broker=broker)
    caller.join(60)

    assert replies and warm.call("counter", INCREMENT, timeout=30).state["count"] == 3
    lines = [record.getMessage() for record in caplog.records
             if record.name == "celery_warmpool.client.listener"
             and str(private_redis.port) in record.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"broker {broker} was unreachable for")
