"""Streaming calls through real workers: order, failures, lost processes, cancellation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from celery_warmpool import ActionFailed, AgentLost, ConfigurationError, Stream
from tests.conftest import RABBITMQ_BROKER, REDIS_BACKEND, wait_until
from tests.test_async_callers import echo, listener_of
from tests.test_worker import INCREMENT, counter

pytestmark = pytest.mark.integration


def chunks(count: int, *, delay: float = 0.0, fail_after: int | None = None,
           log: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"count": count, "delay": delay, "fail_after": fail_after}
    if log is not None:
        data["log"] = str(log)
    return {"type": "counter.chunks", "data": data}


def produced(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.parametrize("execution,broker", [
    ("prefork", None), ("threads", None),
    pytest.param("prefork", RABBITMQ_BROKER, marks=pytest.mark.rabbitmq),
])
def test_a_thousand_chunks_arrive_in_order_none_lost_none_twice(start_worker, client,
                                                                execution, broker):
    options = {"broker": broker} if broker else {}
    start_worker(counter(2), pool=execution, concurrency=2, **options)
    _, warm = client(counter(2), **options)
    stream = warm.stream("counter", chunks(1000))
    assert isinstance(stream, Stream)
    assert list(stream) == list(range(1000))
    assert stream.reply.state["count"] == 1 and stream.reply.action == "chunks"
    wait_until(lambda: listener_of(warm).subscriptions == 0, 5, "subscriptions dropped")


def test_a_failure_after_three_chunks_leaves_the_state_unchanged(start_worker, client):
    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    before = warm.call("counter", INCREMENT).state["count"]
    seen: list[Any] = []
    with pytest.raises(ActionFailed) as failed:
        for chunk in warm.stream("counter", chunks(10, fail_after=3)):
            seen.append(chunk)
    assert seen == [0, 1, 2]
    assert "asked to fail after 3 chunks" in str(failed.value)
    assert warm.call("counter", INCREMENT).state["count"] == before + 1


def test_a_child_killed_mid_stream_ends_it_in_agent_lost(start_worker, client, tmp_path):
    worker = start_worker(counter(1), pool="prefork", concurrency=1)
    _, warm = client(counter(1))
    seen: list[Any] = []
    with pytest.raises(AgentLost) as lost:
        for chunk in warm.stream("counter", chunks(100, delay=0.05), call_timeout=30):
            seen.append(chunk)
            if chunk == 4:
                for child in psutil.Process(worker.pid).children():
                    child.kill()
    assert seen[:5] == [0, 1, 2, 3, 4] and seen == list(range(len(seen)))
    assert lost.value.pool == "counter"
    # The pool is whole again: a replacement child serves the next call.
    assert warm.call("counter", echo("again"), timeout=30).result == "again"


@pytest.mark.parametrize("execution", ["prefork", "threads"])
def test_break_stops_the_generator_and_the_agent_serves_on(start_worker, client, tmp_path,
                                                          execution):
    start_worker(counter(1), pool=execution, concurrency=1)
    _, warm = client(counter(1))
    log = tmp_path / "log"
    before = warm.call("counter", INCREMENT).state["count"]
    with warm.stream("counter", chunks(1000, delay=0.01, log=log)) as stream:
        for chunk in stream:
            if chunk == 5:
                break
    stopped_at = time.monotonic()
    wait_until(lambda: "end" in produced(log), 5, "the generator's finally ran")
    took = time.monotonic() - stopped_at
    indexes = [int(index) for index in produced(log) if index != "end"]
    assert max(indexes) < 5 + 30, f"it went on to chunk {max(indexes)}"
    assert took < 1.0
    # Healthy, state unchanged (a stopped stream is not a success), serving at once.
    assert warm.call("counter", INCREMENT, timeout=2).state["count"] == before + 1
    status = warm.status("counter")
    assert status.counters.streams_cancelled == 1
    assert status.counters.replacements == 0


def test_a_slow_reader_pauses_the_generator(start_worker, client, tmp_path):
    start_worker(counter(1, stream_buffer=8), pool="threads", concurrency=2)
    _, warm = client(counter(1, stream_buffer=8))
    log = tmp_path / "log"
    stream = warm.stream("counter", chunks(100, log=log))
    assert next(stream) == 0
    time.sleep(1.0)  # the reader stops; the generator runs at most the buffer ahead
    ahead = len(produced(log))
    assert 8 <= ahead <= 8 + 2, f"the generator produced {ahead} chunks"
    assert list(stream) == list(range(1, 100))


def test_an_abandoned_reader_is_given_up_after_the_idle_timeout(start_worker, client,
                                                                tmp_path):
    options = {"stream_buffer": 4, "stream_idle_timeout": 1.0}
    start_worker(counter(1, **options), pool="threads", concurrency=2)
    _, warm = client(counter(1, **options))
    log = tmp_path / "log"
    stream = warm.stream("counter", chunks(100, log=log))
    assert next(stream) == 0
    # The reader stops reading and never closes (a crashed caller, say).
    wait_until(lambda: "end" in produced(log), 5, "the generator was stopped")
    assert len(produced(log)) <= 4 + 2
    assert warm.call("counter", echo("next"), timeout=2).result == "next"
    stream.close()


def test_context_cancelled_is_seen_by_an_action_whose_acall_was_cancelled(start_worker,
                                                                        client, tmp_path):
    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    path = tmp_path / "seen"

    async def main() -> None:
        call = asyncio.ensure_future(warm.acall(
            "counter", {"type": "counter.until_cancelled", "data": {"path": str(path)}},
            timeout=5, call_timeout=20))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    wait_until(path.exists, 5, "the action ended")
    assert path.read_text() == "cancelled"


def test_streams_read_from_one_event_loop(start_worker, client):
    start_worker(counter(4), pool="threads", concurrency=4)
    _, warm = client(counter(4))

    async def read(count: int) -> list[Any]:
        return [chunk async for chunk in warm.astream("counter", chunks(count))]

    async def main() -> list[list[Any]]:
        return await asyncio.gather(*(read(50) for _ in range(40)))

    assert asyncio.run(main()) == [list(range(50))] * 40


def test_a_stream_needs_a_redis_result_store(client):
    _, warm = client(counter(1), backend="rpc://")
    with pytest.raises(ConfigurationError, match="Redis result store"):
        warm.stream("counter", chunks(3))
    assert REDIS_BACKEND  # the other tests' store is Redis


def test_a_generator_that_pauses_longer_than_the_idle_timeout_is_not_cancelled(
        start_worker, client):
    # The reader reads every chunk at once; the generator pauses between them for
    # longer than stream_idle_timeout: the reader is there, the work must go on.
    options = {"stream_idle_timeout": 1.0}
    start_worker(counter(1, **options), pool="threads", concurrency=2)
    _, warm = client(counter(1, **options))
    assert list(warm.stream("counter", chunks(3, delay=1.5), call_timeout=30)) == [0, 1, 2]
