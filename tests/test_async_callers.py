"""The caller's side at scale: one reply listener per process, the asyncio API, fan-out."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from celery_warmpool import (
    ActionFailed,
    AgentLost,
    BrokerUnavailable,
    CallTimeout,
    CheckoutTimeout,
    InvalidSignal,
    UnknownPool,
    UnknownSignal,
)
from celery_warmpool.client.listener import ReplyListener
from tests.conftest import RABBITMQ_BROKER, REDIS_BACKEND, PrivateRedis, at_once, wait_until
from tests.test_worker import counter, work

pytestmark = pytest.mark.integration


def echo(value: Any) -> dict[str, Any]:
    return {"type": "counter.echo", "data": {"value": value}}


def touch(path: Path, seconds: float = 0.0) -> dict[str, Any]:
    return {"type": "counter.touch", "data": {"path": str(path), "seconds": seconds}}


def listener_of(warm: Any) -> ReplyListener:
    listener = warm.client.listener()
    assert listener is not None
    return listener


def redis_connections_of_this_process(port: int = 6379) -> int:
    """Connections this process holds to the Redis server on ``port``."""
    return sum(1 for connection in psutil.Process().net_connections("tcp")
               if connection.raddr and connection.raddr.port == port
               and connection.status == psutil.CONN_ESTABLISHED)


def subscribed_result_channels() -> int:
    """Result channels subscribed on the test result store's server, by anyone."""
    channels = redis.Redis.from_url(REDIS_BACKEND).pubsub_channels("celery-task-meta-*")
    return len(channels)


def test_a_thousand_concurrent_acalls_are_all_answered_right(start_worker, client):
    start_worker(counter(8), pool="threads", concurrency=8)
    _, warm = client(counter(8))

    async def main() -> list[Any]:
        return await asyncio.gather(*(warm.acall("counter", echo(index), timeout=30)
                                      for index in range(1000)))

    before = subscribed_result_channels()  # other apps of this test run may hold some
    replies = asyncio.run(main())
    assert [reply.result for reply in replies] == list(range(1000))
    listener = listener_of(warm)
    wait_until(lambda: listener.subscriptions == 0, 5, "every subscription dropped")
    # Replies come on the process's one reply channel: no result channel was subscribed.
    assert subscribed_result_channels() == before


def test_every_contract_error_comes_through_acall(start_worker, client, tmp_path):
    worker = start_worker(counter(1), pool="prefork", concurrency=1)
    _, warm = client(counter(1))

    async def outcome(pool: str, signal: Any, **options: Any) -> BaseException | None:
        try:
            await warm.acall(pool, signal, **options)
        except Exception as exc:
            return exc
        return None

    async def main() -> None:
        assert isinstance(await outcome("nope", echo(1)), UnknownPool)
        assert isinstance(await outcome("counter", {"type": "counter.increment",
                                                    "data": {"by": "x"}}), InvalidSignal)
        assert isinstance(await outcome("counter", {"type": "counter.nope"}), UnknownSignal)
        assert isinstance(await outcome("counter", {"type": "counter.fail"}), ActionFailed)
        overrun = await outcome("counter", work(3), call_timeout=0.5)
        assert isinstance(overrun, CallTimeout) and overrun.timeout == 0.5
        # The one agent is busy: a call that may not wait for it times out, never runs.
        busy = asyncio.ensure_future(warm.acall("counter", work(2), timeout=10))
        await asyncio.sleep(0.5)
        late = await outcome("counter", echo(2), timeout=0.3)
        assert isinstance(late, CheckoutTimeout) and late.pool == "counter"
        await busy
        # The child running a call dies under it.
        doomed = asyncio.ensure_future(outcome("counter", work(5), timeout=10, call_timeout=20))
        await asyncio.sleep(1.0)
        for child in psutil.Process(worker.pid).children():
            child.kill()
        lost = await doomed
        assert isinstance(lost, AgentLost) and lost.pool == "counter"

    asyncio.run(main())
    _, warm = client(counter(1), broker="redis://127.0.0.1:1/0")

    async def no_broker() -> None:
        started = time.monotonic()
        error = await outcome("counter", echo(1), timeout=1.0)
        assert isinstance(error, BrokerUnavailable), error
        assert "127.0.0.1:1" in str(error) and time.monotonic() - started < 3

    asyncio.run(no_broker())


def test_the_event_loop_keeps_ticking_through_a_broker_restart(private_redis: PrivateRedis,
                                                              start_worker, client):
    broker, backend = f"{private_redis.url}/0", f"{private_redis.url}/1"
    start_worker(counter(8), pool="threads", concurrency=8, broker=broker, backend=backend)
    _, warm = client(counter(8), broker=broker, backend=backend)
    gaps: list[float] = []

    async def tick(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def call(index: int) -> Any:
        try:
            return (await warm.acall("counter", echo(index), timeout=20)).result
        except Exception as exc:
            return exc

    async def main() -> list[Any]:
        stop = asyncio.Event()
        calls = [asyncio.ensure_future(call(index)) for index in range(1000)]
        await asyncio.sleep(0)  # every call has built and queued its message
        ticker = asyncio.ensure_future(tick(stop))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(private_redis.restart, 3.0)
        outcomes = await asyncio.gather(*calls)
        stop.set()
        await ticker
        return outcomes

    outcomes = asyncio.run(main())
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.3f}s"
    unanswered = [outcome for outcome in outcomes if isinstance(outcome, CheckoutTimeout)]
    assert not unanswered, f"{len(unanswered)} calls got no reply: {unanswered[:3]}"
    assert outcomes == list(range(1000))


def test_a_cancelled_acall_never_runs(start_worker, client, tmp_path):
    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    marker = tmp_path / "ran"

    async def main() -> None:
        busy = asyncio.ensure_future(warm.acall("counter", work(1.5), timeout=5))
        await asyncio.sleep(0.3)  # the one agent is busy now: the next call waits for it
        waiting = asyncio.ensure_future(warm.acall("counter", touch(marker), timeout=10))
        await asyncio.sleep(0.3)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await busy
        # The pool is free again and takes the next call at once.
        assert (await warm.acall("counter", echo("after"))).result == "after"

    asyncio.run(main())
    time.sleep(0.5)
    assert not marker.exists(), "a call cancelled before it started ran"
    assert listener_of(warm).subscriptions == 0


def test_an_interrupted_blocking_call_never_runs(start_worker, client, tmp_path):
    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    marker = tmp_path / "ran"
    busy = threading.Thread(target=warm.call, args=("counter", work(1.5)),
                            kwargs={"timeout": 5})
    busy.start()
    time.sleep(0.3)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), 2))  # Ctrl-C
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        warm.call("counter", touch(marker), timeout=10)
    busy.join()
    assert warm.call("counter", echo("after")).result == "after"
    time.sleep(0.5)
    assert not marker.exists(), "an interrupted call ran"
    assert listener_of(warm).subscriptions == 0


def test_a_reply_stored_before_the_subscription_is_read(clean_redis, client):
    app, warm = client(counter(1))
    key = app.backend.get_key_for_task("stored-early")
    redis.Redis.from_url(REDIS_BACKEND).set(key, b"the reply")
    subscription = listener_of(warm).subscribe(key, key)
    assert subscription.mailbox.take(5.0) == b"the reply"
    listener_of(warm).unsubscribe(subscription)


def test_two_event_loops_in_two_threads_share_the_listener(start_worker, client):
    start_worker(counter(4), pool="threads", concurrency=4)
    _, warm = client(counter(4))

    def loop_in_a_thread(base: int) -> list[Any]:
        async def main() -> list[Any]:
            replies = await asyncio.gather(*(warm.acall("counter", echo(base + index))
                                             for index in range(50)))
            return [reply.result for reply in replies]

        first = asyncio.run(main())
        return first + asyncio.run(main())  # a second loop, after the first closed

    results = at_once(loop_in_a_thread, [0, 1000])
    assert results == [list(range(50)) * 2, list(range(1000, 1050)) * 2]


def test_map_keeps_order_reads_lazily_and_can_return_exceptions(start_worker, client):
    start_worker(counter(4), pool="threads", concurrency=4)
    _, warm = client(counter(4))
    read: list[int] = []

    def signals(count: int) -> Any:
        for index in range(count):
            read.append(index)
            yield echo(index)

    replies = warm.map("counter", signals(1000), concurrency=8)
    first = next(replies)
    assert first.result == 0
    assert len(read) <= 9, f"read {len(read)} signals for 8 in flight"
    assert [reply.result for reply in replies] == list(range(1, 1000))

    mixed = [echo(0), {"type": "counter.nope"}, echo(2)]
    with pytest.raises(UnknownSignal):
        list(warm.map("counter", mixed))
    outcomes = list(warm.map("counter", mixed, return_exceptions=True))
    assert outcomes[0].result == 0 and outcomes[2].result == 2
    assert isinstance(outcomes[1], UnknownSignal)

    async def amap() -> list[Any]:
        return [reply.result async for reply in warm.amap("counter", signals(20),
                                                          concurrency=4)]

    assert asyncio.run(amap()) == list(range(20))


def test_256_calling_threads_hold_few_redis_connections(start_worker, client):
    start_worker(counter(8), pool="threads", concurrency=8)
    _, warm = client(counter(8))
    warm.call("counter", echo("warm"))
    before = redis_connections_of_this_process()
    seen: list[int] = []
    barrier = threading.Barrier(256)

    def caller(index: int) -> Any:
        barrier.wait()
        results = [warm.call("counter", echo(index), timeout=30).result for _ in range(3)]
        seen.append(redis_connections_of_this_process())
        return results

    results = at_once(caller, list(range(256)), within=120)
    assert results == [[index] * 3 for index in range(256)]
    # The caller's own: the reply listener's, the producer pool's and the app's.
    assert max(seen) - before <= 16, f"{max(seen)} connections (before: {before})"


def test_a_forked_process_calls_through_a_listener_of_its_own(start_worker, client):
    start_worker(counter(2), pool="threads", concurrency=2)
    _, warm = client(counter(2))
    assert warm.call("counter", echo("parent")).result == "parent"
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a call, then out without running the parent's clean-up
        try:
            result = warm.call("counter", echo("child"), timeout=10).result
            os.write(writer, str(result).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    assert os.read(reader, 100) == b"child"
    assert warm.call("counter", echo("parent again")).result == "parent again"


@pytest.mark.rabbitmq
def test_a_result_backend_without_a_listener_keeps_working(start_worker, client):
    start_worker(counter(2), pool="threads", concurrency=2, broker=RABBITMQ_BROKER,
                 backend="rpc://")
    _, warm = client(counter(2), broker=RABBITMQ_BROKER, backend="rpc://")
    assert warm.client.listener() is None
    assert warm.call("counter", echo(1)).result == 1

    async def main() -> list[Any]:
        replies = await asyncio.gather(*(warm.acall("counter", echo(index))
                                         for index in range(20)))
        return [reply.result for reply in replies]

    assert asyncio.run(main()) == list(range(20))
    with pytest.raises(ActionFailed):
        warm.call("counter", {"type": "counter.fail"})
