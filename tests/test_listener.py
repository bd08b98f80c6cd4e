"""The reply listener under faults: a result store that restarts, replies that come early,
callers that leave, and what a caller prints about it.

The result store is a redis-server of the test's own (``private_redis``), so that it can
be restarted and its pub/sub channels counted without other tests' channels among them;
the broker is the shared test database, unless the broker's restart is the point.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis

from celery_warmpool import CallTimeout, CheckoutTimeout
from celery_warmpool.client.listener import ReplyListener
from celery_warmpool.core.signal import Signal
from tests.conftest import ROOT, PrivateRedis, wait_until
from tests.test_async_callers import echo, listener_of
from tests.test_worker import counter, work

pytestmark = pytest.mark.integration

#: Seconds the result store stays down in the restart tests.
DOWN = 2.0
#: Seconds a freed subscription may take to leave the listener and Redis: the listener's
#: thread sends it at once; this is slack for a loaded machine.
AT_ONCE = 1.0


def store_of(server: PrivateRedis) -> str:
    return f"{server.url}/1"


def numsub(server: PrivateRedis, channel: bytes) -> int:
    """Subscribers of ``channel`` on ``server``, as Redis counts them."""
    return int(redis.Redis(port=server.port).pubsub_numsub(channel)[0][1])


def result_channels(server: PrivateRedis) -> set[bytes]:
    return set(redis.Redis(port=server.port).pubsub_channels("celery-task-meta-*"))


def next_payload(mailbox: Any, within: float) -> bytes | None:
    """The next payload (a stored or published value) in ``mailbox``, passing over the
    listener's own notices; ``None`` if none came within ``within`` seconds."""
    deadline = time.monotonic() + within
    while (remaining := deadline - time.monotonic()) > 0:
        item = mailbox.take(remaining)
        if isinstance(item, bytes):
            return item
    return None


def outage_lines(records: list[logging.LogRecord]) -> list[str]:
    return [record.getMessage() for record in records
            if record.name == "celery_warmpool.client.listener"
            and record.levelno >= logging.WARNING]


def test_calls_in_flight_get_their_replies_across_a_result_store_restart(
        private_redis, start_worker, client, caplog):
    caplog.set_level(logging.WARNING, "celery_warmpool.client.listener")
    backend = store_of(private_redis)
    start_worker(counter(4), pool="threads", concurrency=4, backend=backend)
    app, warm = client(counter(4), backend=backend)
    assert warm.call("counter", echo("up")).result == "up"
    listener = listener_of(warm)
    # A reply stored but never published (as if the store took it while the listener was
    # away): only the listener's read after it reconnects can deliver it.
    key = app.backend.get_key_for_task("stored-while-away")
    early = listener.subscribe(key, key)
    wait_until(lambda: numsub(private_redis, key) == 1, 5, "the early channel subscribed")
    redis.Redis.from_url(backend).set(key, b"kept through the restart")
    outcomes: list[Any] = [None] * 8

    def call(index: int) -> None:
        try:
            outcomes[index] = warm.call("counter", work(0.8), timeout=20, call_timeout=5)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=call, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    # Every call subscribed and the first four running: their work ends while the store
    # is down, so their replies are stored (the worker retries) once it is back.
    wait_until(lambda: listener.subscriptions == 9, 5, "eight calls waiting")
    private_redis.restart(DOWN)
    for thread in threads:
        thread.join(40)
    assert [type(outcome).__name__ for outcome in outcomes] == ["AgentReply"] * 8
    assert next_payload(early.mailbox, 5.0) == b"kept through the restart"
    listener.unsubscribe(early)
    wait_until(lambda: listener.subscriptions == 0, 2, "every subscription dropped")
    lines = outage_lines(caplog.records)
    assert len(lines) == 1, lines
    seconds = float(re.search(r"unreachable for ([\d.]+)s", lines[0]).group(1))  # type: ignore[union-attr]
    assert DOWN <= seconds < DOWN + 3, lines[0]
    assert f"result store {backend}" in lines[0] and "reconnected" in lines[0]


def test_a_reply_published_before_the_subscription_is_read(private_redis, start_worker,
                                                           client):
    backend = store_of(private_redis)
    start_worker(counter(1), pool="threads", concurrency=2, backend=backend)
    app, warm = client(counter(1), backend=backend)
    task_id = "published-early"
    key = app.backend.get_key_for_task(task_id)
    watcher = redis.Redis.from_url(backend).pubsub()
    watcher.subscribe(key)
    assert watcher.get_message(timeout=5)["type"] == "subscribe"
    # The call's message goes out with nobody of the caller's side subscribed.
    message = warm.client.call_message(task_id, "counter", [Signal.parse(echo("early"))], 5.0,
                                       5.0)
    warm.client.publisher.send(message)
    published = watcher.get_message(timeout=10)
    assert published is not None and published["type"] == "message"
    watcher.close()
    listener = listener_of(warm)
    subscription = listener.subscribe(key, key)
    payload = next_payload(subscription.mailbox, 5.0)
    listener.unsubscribe(subscription)
    assert payload == published["data"]
    assert warm.client.read_reply(payload)[0]["result"] == "early"
    assert next_payload(subscription.mailbox, 0.3) is None, "the reply was delivered twice"


def reply_channels(server: PrivateRedis) -> set[bytes]:
    return set(redis.Redis(port=server.port).pubsub_channels("warmpool:reply:*"))


def test_a_cancelled_call_leaves_the_listener_at_once(private_redis, start_worker, client):
    backend = store_of(private_redis)
    start_worker(counter(1), pool="threads", concurrency=2, backend=backend)
    _, warm = client(counter(1), backend=backend)
    listener = listener_of(warm)

    async def main() -> None:
        busy = asyncio.ensure_future(warm.acall("counter", work(2.0), timeout=5))
        await asyncio.to_thread(wait_until,
                                lambda: warm.status("counter").checked_out == 1, 5,
                                "the busy call running")
        waiting = asyncio.ensure_future(warm.acall("counter", echo("never"), timeout=10))
        await asyncio.to_thread(wait_until, lambda: listener.subscriptions == 2, 5,
                                "both calls waiting")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert listener.subscriptions == 1  # left at once, with no command to Redis
        await busy

    asyncio.run(main())
    assert listener.subscriptions == 0
    # One channel for every call of the process: no channel per call, subscribed or left.
    assert reply_channels(private_redis) == {listener.channel}
    assert result_channels(private_redis) == set()


def test_replies_reach_their_own_callers_among_a_thousand_in_flight(private_redis,
                                                                    start_worker, client):
    backend = store_of(private_redis)
    start_worker(counter(8), pool="threads", concurrency=16, backend=backend)
    _, warm = client(counter(8), backend=backend)
    listener = listener_of(warm)

    async def main() -> list[Any]:
        return await asyncio.gather(*(warm.acall("counter", echo(index), timeout=60)
                                      for index in range(1000)))

    replies = asyncio.run(main())
    assert [reply.result for reply in replies] == list(range(1000))
    assert listener.subscriptions == 0
    assert numsub(private_redis, listener.channel) == 1
    assert reply_channels(private_redis) == {listener.channel}


OTHER_CALLER = """
import sys
from tests.integration_app import make_app
from tests.test_worker import counter
app, warm = make_app(sys.argv[1], sys.argv[2], counter(2))
wrong = sum(warm.call("counter", {"type": "counter.echo", "data": {"value": f"theirs {i}"}},
                      timeout=30).result != f"theirs {i}" for i in range(300))
print(wrong, warm.client.listener().channel.decode())
"""


def test_two_caller_processes_never_see_each_others_replies(private_redis, start_worker,
                                                            client):
    from tests.conftest import REDIS_BROKER

    backend = store_of(private_redis)
    start_worker(counter(2), pool="threads", concurrency=4, backend=backend)
    _, warm = client(counter(2), backend=backend)
    other = subprocess.Popen([sys.executable, "-c", OTHER_CALLER, REDIS_BROKER, backend],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        wrong = sum(warm.call("counter", echo(f"mine {index}"), timeout=30).result
                    != f"mine {index}" for index in range(300))
        out, _ = other.communicate(timeout=120)
    finally:
        other.kill()
    their_wrong, their_channel = out.split()
    assert (wrong, int(their_wrong)) == (0, 0)
    assert their_channel.encode() != listener_of(warm).channel


def test_a_reply_published_while_the_listener_reconnects_is_read_from_the_store(
        private_redis):
    from celery_warmpool.wire.replies import envelope

    listener = ReplyListener({"host": "127.0.0.1", "port": private_redis.port, "db": 1},
                             "test")
    store = redis.Redis(port=private_redis.port, db=1)
    first = listener.expect("before", b"reply-before")
    wait_until(lambda: numsub(private_redis, listener.channel) == 1, 5, "the channel subscribed")
    store.set(b"reply-before", b"stored")
    store.publish(listener.channel, envelope("before", b"stored"))
    assert next_payload(first.mailbox, 5.0) == b"stored"
    listener.forget(first)

    waiting = listener.expect("during", b"reply-during")
    # The listener's connection dropped; the reply is stored and published before it is
    # back: nobody hears the message, the read after the reconnection finds the value.
    # In one transaction, so that the listener cannot be back before the publish.
    together = store.pipeline(transaction=True)
    together.client_kill_filter(_type="pubsub")
    together.set(b"reply-during", b"stored while away")
    together.publish(listener.channel, envelope("during", b"stored while away"))
    assert together.execute()[2] == 0  # nobody heard it
    assert next_payload(waiting.mailbox, 10.0) == b"stored while away"
    assert next_payload(waiting.mailbox, 0.3) is None, "the reply was delivered twice"
    listener.forget(waiting)


def test_a_pool_task_sent_by_celery_still_answers_apply_async_get(start_worker, client):
    from celery_warmpool.wire.message import CallMessage

    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    call = CallMessage("counter", [Signal.parse(echo("through celery")).to_wire()],
                       time.time() + 10, 5.0)
    sent = warm.handle_task.apply_async(call.to_args(), queue=warm.spec("counter").queue)
    [reply] = sent.get(timeout=10)
    assert reply["result"] == "through celery"


def test_calls_that_time_out_free_their_subscriptions(private_redis, start_worker, client):
    backend = store_of(private_redis)
    start_worker(counter(1), pool="threads", concurrency=2, backend=backend)
    specs = [*counter(1), {**counter(1)[0], "name": "unserved"}]  # no worker hosts it
    _, warm = client(specs, backend=backend)
    warm.client.reply_grace = 0.2
    listener = listener_of(warm)
    with pytest.raises(CallTimeout):
        warm.call("counter", work(3.0), timeout=5, call_timeout=0.5)
    wait_until(lambda: listener.subscriptions == 0, AT_ONCE, "the overrun call freed")
    with pytest.raises(CheckoutTimeout):
        warm.call("unserved", echo("nobody"), timeout=0.3, call_timeout=0.1)
    wait_until(lambda: listener.subscriptions == 0, AT_ONCE, "the unserved call freed")
    wait_until(lambda: result_channels(private_redis) == set(), AT_ONCE, "no channel subscribed")


def test_a_caller_through_a_broker_restart_prints_nothing_on_stderr(private_redis,
                                                                     start_worker):
    broker, backend = f"{private_redis.url}/0", store_of(private_redis)
    start_worker(counter(2), pool="threads", concurrency=4, broker=broker, backend=backend)
    caller = subprocess.Popen(
        [sys.executable, "-m", "tests.quiet_caller", broker, backend, "6"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None and caller.stdout.readline() == "calling\n"
        private_redis.restart(DOWN)
        out, err = caller.communicate(timeout=60)
    finally:
        caller.kill()
    assert caller.returncode == 0 and err == "", err
    *lines, counts = out.splitlines()
    outcomes = json.loads(counts)
    assert {"call", "acall", "cast"} <= set(outcomes), outcomes
    failed = {kind: count for kind, count in outcomes.items() if " " in kind}
    assert failed == {}, failed
    # One line for the outage: the listener's, on the result store it lost and got back.
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"WARNING celery_warmpool.client.listener: result store "
                               f"{backend} was unreachable for "), lines[0]
    assert "reconnected" in lines[0] and "restart" not in lines[0]



def test_a_cast_leaves_celerys_result_consumer_alone(start_worker, client):
    # Celery's apply_async subscribes its own result consumer to every task it sends
    # (RedisBackend.on_task_call); dropped while the store is away, each such
    # AsyncResult's __del__ printed "... The Celery application must be restarted".
    start_worker(counter(1), pool="threads", concurrency=2)
    app, warm = client(counter(1))
    results = [warm.cast("counter", echo(index)) for index in range(20)]
    assert [type(result).__name__ for result in results] == ["AsyncResult"] * 20
    consumer = app.backend.result_consumer
    assert consumer.subscribed_to == set() and consumer._pubsub is None
    assert [reply["result"] for reply in results[-1].get(timeout=10)] == [19]


def test_a_map_left_after_its_first_reply_leaves_nothing_pending(start_worker, client, caplog):
    caplog.set_level(logging.WARNING)
    start_worker(counter(2), pool="threads", concurrency=4)
    _, warm = client(counter(2))
    replies = warm.map("counter", [echo(index) for index in range(20)], concurrency=4)
    assert next(replies).result == 0
    replies.close()
    del replies
    gc.collect()
    assert [record.getMessage() for record in caplog.records if record.name == "asyncio"] == []
    wait_until(lambda: listener_of(warm).subscriptions == 0, 1, "every subscription dropped")


def test_a_command_the_store_refuses_does_not_stop_the_listener(clean_redis, caplog):
    listener = ReplyListener({"host": "127.0.0.1", "port": 6379, "db": 9}, "test")
    listener.submit(lambda client: client.execute_command("NO-SUCH-COMMAND"))
    key = b"warmpool-test:refused"
    redis.Redis(db=9).set(key, b"stored")
    subscription = listener.subscribe(key, key)
    assert next_payload(subscription.mailbox, 5.0) == b"stored"
    redis.Redis(db=9).publish(key, b"published")
    assert next_payload(subscription.mailbox, 5.0) == b"published"
    listener.unsubscribe(subscription)
    redis.Redis(db=9).delete(key)


def test_a_health_check_interval_is_not_taken_for_an_outage(clean_redis, caplog):
    listener = ReplyListener({"host": "127.0.0.1", "port": 6379, "db": 9,
                              "health_check_interval": 1}, "test")
    key = b"warmpool-test:healthy"
    subscription = listener.subscribe(key, key)
    time.sleep(2.5)  # two health checks' worth
    redis.Redis(db=9).publish(key, b"published")
    assert next_payload(subscription.mailbox, 5.0) == b"published"
    assert listener.outage() is None
    assert not outage_lines(caplog.records)
    listener.unsubscribe(subscription)
