"""The extension leaves the user's app as it is: its settings and queues, and how its own
tasks publish, store, route and signal. Publisher confirms and result-store retries apply
to the package's own messages and store calls only (``celery_warmpool.wire.scoped``); the pool
queues are declared by the package itself (``celery_warmpool.wire.queues``).

The workers here run ``tests.plain_app``: a user's app with plain tasks beside a counter
pool and a gate pool (work that waits until the test opens it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from celery.signals import after_task_publish, before_task_publish

from celery_warmpool.ops.processes import WorkerProcess
from celery_warmpool.wire.dead_letters import DeadLetter
from celery_warmpool.wire.scoped import scoped
from tests.conftest import (
    RABBITMQ_BROKER,
    REDIS_BACKEND,
    REDIS_BROKER,
    ROOT,
    PrivateRedis,
    wait_until,
)
from tests.plain_app import RECEIVED, make_app

pytestmark = pytest.mark.integration

INCREMENT = {"type": "counter.increment", "data": {"by": 1}}
#: Celery's own defaults for storing a result, which a plain task keeps.
CELERY_STORE_SETTINGS = {
    "app_backend": True, "always_retry": False, "max_sleep_between_retries_ms": 10_000,
    "retry_policy": {"max_retries": 20, "interval_start": 0, "interval_step": 1,
                     "interval_max": 1},
}
#: An app that knows only Celery's default queue, creates none, and routes everything
#: there.
ONE_QUEUE_CONF = {
    "task_create_missing_queues": False,
    "task_queues": {"celery": {"exchange": "celery", "routing_key": "celery"}},
    "task_routes": {"*": {"queue": "celery"}},
}


@pytest.fixture
def plain_worker(clean_redis: None) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``tests.plain_app`` workers; stop them afterwards."""
    workers: list[WorkerProcess] = []

    def start(*, broker: str = REDIS_BROKER, backend: str = REDIS_BACKEND,
              warm_pool: bool = True, conf: dict[str, Any] | None = None,
              pool: str = "threads", concurrency: int = 2,
              nodename: str | None = None) -> WorkerProcess:
        env = {"PYTHONPATH": str(ROOT), "PLAIN_APP_WARMPOOL": "1" if warm_pool else "0",
               "PLAIN_APP_CONF": json.dumps(conf or {})}
        worker = WorkerProcess("tests.plain_app", pool=pool, concurrency=concurrency,
                               broker=broker, backend=backend, env=env, cwd=ROOT,
                               nodename=nodename)
        workers.append(worker)
        return worker.start(timeout=90)

    yield start
    for worker in workers:
        worker.stop()
        worker.remove_log()


def settings_of(app: Any) -> dict[str, Any]:
    """Everything the app is configured with, and the queues it knows."""
    return {"conf": dict(app.conf), "queues": sorted(app.amqp.queues),
            "consume_from": sorted(app.amqp.queues.consume_from)}


@pytest.mark.parametrize("broker", [RABBITMQ_BROKER, REDIS_BROKER])
def test_the_extension_changes_none_of_the_apps_settings_or_queues(broker):
    from celery_warmpool.core.signal import Signal

    bare, _ = make_app(broker, REDIS_BACKEND, warm_pool=False, conf=ONE_QUEUE_CONF)
    app, warm = make_app(broker, REDIS_BACKEND, conf=ONE_QUEUE_CONF)
    assert warm is not None
    # What the package works out for itself, before and while it publishes.
    warm.client.call_message("an-id", "counter", [Signal.new("counter.increment")], 1.0, 1.0)
    own = scoped(app)
    assert own.producers.confirms is broker.startswith("amqp")
    assert own.results.backend is not app.backend
    assert settings_of(app) == settings_of(bare)
    assert settings_of(app)["queues"] == ["celery"]
    assert app.conf.broker_transport_options == {}
    assert not app.conf.result_backend_always_retry


def backends_of(app: Any) -> list[Any]:
    """The package's result backend as two threads get it."""
    found: list[Any] = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: found.append(scoped(app).results.backend))
        thread.start()
        thread.join()
    return found


def test_the_packages_result_store_is_shared_by_threads_only_where_that_is_safe(tmp_path):
    app, _ = make_app(REDIS_BROKER, REDIS_BACKEND)
    first, second = backends_of(app)
    assert first is second  # Redis stores through redis-py's thread-safe client
    assert first.always_retry and not app.backend.always_retry
    database, _ = make_app(REDIS_BROKER, f"db+sqlite:///{tmp_path / 'results.db'}")
    first, second = backends_of(database)
    assert first is not second  # one per thread, as Celery keeps app.backend
    assert first.always_retry and second.always_retry
    # Replies over RPC go to the caller's own queue: the app's backend, nothing to set.
    rpc, _ = make_app(RABBITMQ_BROKER, "rpc://")
    assert scoped(rpc).results.backend is rpc.backend


class FakeTimer:
    """A worker timer that only records what is asked of it."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def call_after(self, seconds: float, function: Callable[[], None]) -> None:
        self.calls.append(function)


def test_a_node_with_no_pool_call_in_flight_adds_no_wake_ups_to_its_event_loop():
    from celery_warmpool.worker.late_calls import LateCalls

    app, _ = make_app(REDIS_BROKER, REDIS_BACKEND)
    late_calls, timer = LateCalls(app), FakeTimer()
    late_calls.start(timer)
    assert timer.calls == []  # nothing to look for until a call arrives
    late_calls.watch()
    late_calls.watch()
    assert len(timer.calls) == 1  # one look at a time
    timer.calls.pop()()  # the look finds no call waiting (none is reserved here)
    assert timer.calls == []  # and the looks stop
    late_calls.watch()
    assert len(timer.calls) == 1  # until the next call arrives


def channel_name(producer: Any) -> str:
    """RabbitMQ's name for the channel ``producer`` publishes on."""
    sock = producer.connection.connection.sock
    host, port = sock.getsockname()[:2]
    peer_host, peer_port = sock.getpeername()[:2]
    return f"{host}:{port} -> {peer_host}:{peer_port} ({producer.channel.channel_id})"


def confirm_modes() -> dict[str, bool]:
    """RabbitMQ's own view: whether each channel on the node is in confirm mode."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_channels", "--no-table-headers", "-q", "name", "confirm"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    modes = {}
    for line in listed.splitlines():
        name, _, mode = line.rpartition("\t")
        modes[name] = mode == "true"
    return modes


@pytest.mark.rabbitmq
def test_a_plain_task_publishes_without_a_confirm_and_the_package_with_one(plain_worker):
    plain_worker(broker=RABBITMQ_BROKER)
    # One connection and one producer in the app's pool: the one add.delay() used.
    app, warm = make_app(RABBITMQ_BROKER, REDIS_BACKEND, conf={"broker_pool_limit": 1})
    unconfirmed, quiet = make_app(RABBITMQ_BROKER, REDIS_BACKEND, conf={
        "warmpool_confirm_publish": False})
    assert warm is not None and quiet is not None

    assert app.tasks["plain.add"].delay(2, 3).get(timeout=10) == 5
    with app.producer_pool.acquire(block=True) as producer:
        plain = channel_name(producer)
        assert producer.channel._confirm_selected is False
    assert warm.call("counter", INCREMENT, timeout=10).state["count"] == 1
    with scoped(app).producers.acquire() as producer:
        own = channel_name(producer)
        assert producer.channel._confirm_selected is True
    warm.dead_letters.send(warm.spec("counter"), DeadLetter.of(
        "counter", INCREMENT, ValueError("a letter"), task_id="dead-1"))
    with scoped(app).producers.acquire() as producer:
        dead_letters = channel_name(producer)
    assert warm.dead_letters.purge(warm.spec("counter")) == 1
    assert quiet.call("counter", INCREMENT, timeout=10).state["count"] == 2
    with scoped(unconfirmed).producers.acquire() as producer:
        opted_out = channel_name(producer)

    modes = confirm_modes()
    assert {name: modes[name] for name in (plain, own, dead_letters, opted_out)} == {
        plain: False, own: True, dead_letters: True, opted_out: False}
    assert "confirm_publish" not in app.pool.connection.transport_options


def test_a_plain_tasks_result_is_stored_as_the_app_says(plain_worker):
    plain_worker()
    app, _ = make_app(REDIS_BROKER, REDIS_BACKEND)
    settings = app.tasks["plain.store_settings"].delay().get(timeout=10)
    assert settings == CELERY_STORE_SETTINGS


def test_in_a_store_outage_a_pool_reply_waits_for_the_store_and_a_plain_result_does_not(
        plain_worker, private_redis: PrivateRedis, tmp_path: Path):
    backend = f"{private_redis.url}/1"
    # The app's own retry policy gives up at once: its plain task cannot outwait the outage.
    conf = {"result_backend_transport_options": {"retry_policy": {
        "max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}}}
    worker = plain_worker(backend=backend, conf=conf)
    app, warm = make_app(REDIS_BROKER, backend, conf=conf)
    assert warm is not None
    assert warm.call("counter", INCREMENT, timeout=10).state["count"] == 1  # listening
    release = tmp_path / "release"
    replies: list[Any] = []
    caller = threading.Thread(target=lambda: replies.append(warm.call(
        "gate", {"type": "gate.pass", "data": {"started": str(tmp_path / "call"),
                                               "release": str(release)}},
        timeout=10, call_timeout=60)))
    caller.start()
    plain = app.tasks["plain.gated_add"].delay(str(tmp_path / "plain"), str(release), 2, 3)
    wait_until(lambda: (tmp_path / "call").exists() and (tmp_path / "plain").exists(), 30,
               "both the pool call and the plain task started")

    private_redis.stop()
    release.touch()  # both end now, and store their results while the store is away
    # Celery's last word on a result it could not store, after the app's own retries.
    wait_until(lambda: "Exception raised outside body" in worker.log(), 30,
               "the worker gave up storing the plain task's result")
    wait_until(lambda: "Failed operation _store_result. Retrying" in worker.log(), 30,
               "the worker kept trying to store the pool call's reply")
    private_redis.start()
    caller.join(60)

    assert [reply.result for reply in replies] == ["passed"]
    assert AsyncResult(plain.id, app=app).state == "PENDING"  # its result was never stored
    assert not worker.exited()


@pytest.mark.parametrize("broker", [REDIS_BROKER,
                                    pytest.param(RABBITMQ_BROKER, marks=pytest.mark.rabbitmq)])
def test_pool_calls_are_served_whatever_the_apps_queue_settings(plain_worker, broker):
    worker = plain_worker(broker=broker, conf=ONE_QUEUE_CONF)
    app, warm = make_app(broker, REDIS_BACKEND, conf=ONE_QUEUE_CONF)
    assert warm is not None
    warm.cast("counter", INCREMENT)
    assert warm.call("counter", INCREMENT, timeout=10).state["count"] == 2
    assert app.tasks["plain.peek"].delay().get(timeout=10) == 2
    assert app.tasks["plain.add"].delay(2, 3).get(timeout=10) == 5
    assert sorted(app.amqp.queues) == ["celery"]
    consumed = app.control.inspect(destination=[worker.hostname], timeout=5).active_queues()
    assert [queue["name"] for queue in consumed[worker.hostname]] == ["celery"]


def seen_publishing(app: Any, send: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """What ``send()`` returns, and what the publish signals showed of its message."""
    shown: dict[str, Any] = {}

    def before(sender: Any = None, **kwargs: Any) -> None:
        shown["before"] = {"sender": sender, "exchange": kwargs["exchange"],
                           "routing_key": kwargs["routing_key"],
                           "declare": [queue.name for queue in kwargs["declare"] or ()],
                           "headers": kwargs["headers"], "properties": kwargs["properties"],
                           "retry_policy": kwargs["retry_policy"]}

    def after(sender: Any = None, **kwargs: Any) -> None:
        shown["after"] = {"sender": sender, "exchange": kwargs["exchange"],
                          "routing_key": kwargs["routing_key"], "headers": kwargs["headers"]}

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    try:
        result = send()
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    return result, shown


def anonymous(value: Any, task_id: str, oid: str) -> Any:
    """``value`` with the task's id and the app's id replaced by placeholders."""
    text = json.dumps(value, default=str, sort_keys=True)
    return json.loads(text.replace(task_id, "<task id>").replace(oid, "<app id>"))


@pytest.mark.rabbitmq
def test_a_plain_task_behaves_as_without_the_extension(plain_worker):
    store = redis.Redis.from_url(REDIS_BACKEND)
    seen = {}
    for warm_pool in (False, True):
        worker = plain_worker(broker=RABBITMQ_BROKER, warm_pool=warm_pool, pool="prefork",
                              concurrency=1, nodename="plain@%h")
        app, _ = make_app(RABBITMQ_BROKER, REDIS_BACKEND, warm_pool=warm_pool)
        result, shown = seen_publishing(app, app.tasks["plain.add"].si(4, 2).delay)
        value = result.get(timeout=10)
        received = [json.loads(item) for item in store.lrange(RECEIVED, 0, -1)]
        store.delete(RECEIVED)
        worker.stop()
        seen[warm_pool] = anonymous({"result": value, "published": shown,
                                     "received": received}, result.id, app.thread_oid)

    assert seen[True] == seen[False]
    received = seen[True]["received"]
    assert len(received) == 1
    assert received[0]["replaced_task_nesting"] == 0
    assert received[0]["request_class"] == "celery.worker.request.Request"
    assert received[0]["delivery_info"]["routing_key"] == "celery"
    assert seen[True]["result"] == 6


def test_the_celery_suite_plugin_installs_a_warm_pool_on_the_suites_apps(tmp_path: Path):
    suite_test = tmp_path / "test_suite_app.py"
    suite_test.write_text(
        "from celery_warmpool import WarmPool\n\n"
        "def test_app(celery_app, celery_session_app):\n"
        "    for app in (celery_app, celery_session_app):\n"
        "        assert isinstance(app.warmpool, WarmPool)\n"
        "        assert list(app.warmpool.specs) == ['suite']\n"
        "        assert app.warmpool.spec('suite').size == 1\n"
        "        assert sorted(app.amqp.queues) == ['celery']\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "celery.contrib.pytest", "-p", "tests.celery_suite_plugin", str(suite_test)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
