"""Streaming calls against unary calls and Celery's progress states, in one run.

    python bench/streaming.py            # one to two minutes
    python bench/streaming.py --quick    # fewer rounds, smaller streams

Starts ``bench/streaming_app.py`` on a threads node (``-c 8``, 8 agents), then on a
prefork node (``-c 2``, one agent per child), on the local Redis (databases 10 and 11;
``WARMPOOL_BENCH_REDIS`` names another server), and on each measures, from this process:

- the time to the first chunk of ``warm.stream`` against the p50 of a unary
  ``warm.call`` of the same action and signal (interleaved, one at a time);
- one long stream: chunks per second, and the worker's CPU per chunk (``/proc/<pid>/stat``
  of the worker and its children) against its CPU per unary call;
- 200 streams of 100 chunks at once from one event loop (``warm.astream``): every chunk
  in order and none twice, and the most Redis connections this process held (psutil);
- cancellation: a stream closed after 5 chunks (a chunk every 20 ms); the generator's
  ``finally`` records when it ran, the reader when it closed: how long the generator ran
  on after its next chunk;
- the baseline: the same chunks sent with Celery's ``update_state`` progress states and
  read with ``AsyncResult.get(on_message=...)``, by the caller (Celery subscribes it as
  it sends) and by a reader that comes once the first chunk is out (another process: a
  web page, a caller that reconnected): chunks lost, time to the first chunk.

Databases 10 and 11; nothing is flushed (other benches may share them), and the bench's
pool and task queue are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import (  # noqa: E402
    Check,
    cpu_seconds,
    most_connections,
    print_targets,
    redis_url,
)
from celery_warmpool.ops.processes import WorkerProcess, child_pids  # noqa: E402

BROKER, BACKEND = redis_url(10), redis_url(11)
#: Targets of the streaming issue.
FIRST_CHUNK_TARGET = 1.2
CPU_RATIO_TARGET = 0.1
REDIS_CONNECTIONS_TARGET = 8
STOP_TARGET = 0.1
#: Concurrent streams, chunks each; chunks before closing a stream, seconds between chunks.
STREAMS, STREAM_CHUNKS = 200, 100
CLOSE_AFTER, CLOSE_PAUSE = 5, 0.02


@dataclass
class Node:
    """What one node did."""

    name: str
    unary: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    long_chunks: int = 0
    long_seconds: float = 0.0
    cpu_per_chunk: float = 0.0
    cpu_per_call: float = 0.0
    concurrent_ok: int = 0
    stream_lost: int = 0
    concurrent_seconds: float = 0.0
    connections: int = 0
    stopped_after_next: list[float] = field(default_factory=list)
    stopped_after_close: list[float] = field(default_factory=list)
    baseline_lost: list[int] = field(default_factory=list)
    baseline_late_lost: list[int] = field(default_factory=list)
    baseline_first: list[float] = field(default_factory=list)


def words(count: int, pause: float = 0.0, report: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"count": count, "pause": pause}
    if report:
        data["report"] = report
    return {"type": "bench.words", "data": data}


def first_chunks(warm: Any, node: Node, rounds: int) -> None:
    """Unary call latencies and times to the first chunk of the same signal, interleaved."""
    signal = words(8)
    for _ in range(rounds):
        started = time.perf_counter()
        warm.call("streaming", signal)
        node.unary.append(time.perf_counter() - started)
        started = time.perf_counter()
        with warm.stream("streaming", signal) as stream:
            next(stream)
            node.first.append(time.perf_counter() - started)
            for _ in stream:  # the rest, to its reply
                pass


def cpu_costs(warm: Any, worker: WorkerProcess, node: Node, chunks: int, calls: int) -> None:
    """One stream of ``chunks`` chunks, then ``calls`` unary calls: the worker's CPU each."""
    pids = [worker.pid, *child_pids(worker.pid)]
    before, started = cpu_seconds(*pids), time.perf_counter()
    stream = warm.stream("streaming", words(chunks), call_timeout=120)
    node.long_chunks = sum(1 for _ in stream)
    node.long_seconds = time.perf_counter() - started
    node.cpu_per_chunk = (cpu_seconds(*pids) - before) / chunks
    assert node.long_chunks == chunks, f"{node.long_chunks} of {chunks} chunks came"
    before = cpu_seconds(*pids)
    for _ in range(calls):
        warm.call("streaming", words(1))
    node.cpu_per_call = (cpu_seconds(*pids) - before) / calls


def concurrent_streams(warm: Any, node: Node) -> None:
    """``STREAMS`` streams of ``STREAM_CHUNKS`` chunks at once, from one event loop."""
    expected = [f"word-{index}" for index in range(STREAM_CHUNKS)]

    async def read() -> list[Any]:
        stream = warm.astream("streaming", words(STREAM_CHUNKS), timeout=60, call_timeout=60)
        return [chunk async for chunk in stream]

    async def main() -> list[list[Any]]:
        return await asyncio.gather(*(read() for _ in range(STREAMS)))

    found: list[int] = []
    with most_connections(found):
        started = time.perf_counter()
        results = asyncio.run(main())
        node.concurrent_seconds = time.perf_counter() - started
    node.concurrent_ok = sum(1 for chunks in results if chunks == expected)
    node.stream_lost = sum(len(set(expected) - set(chunks)) for chunks in results)
    node.connections = max(found)


def cancellations(warm: Any, node: Node, rounds: int) -> None:
    """Close a stream after ``CLOSE_AFTER`` chunks; how soon its generator stopped."""
    store = redis.Redis.from_url(BACKEND)
    try:
        for _ in range(rounds):
            report = f"bench:stopped:{uuid.uuid4().hex}"
            stream = warm.stream("streaming", words(10_000, CLOSE_PAUSE, report))
            for read, _ in enumerate(stream, 1):
                if read == CLOSE_AFTER:
                    break
            closed = time.time()
            stream.close()
            popped = store.blpop([report], timeout=10)
            assert popped is not None, "the generator never reported its end"
            outcome = json.loads(popped[1])
            after = [moment for moment in outcome["yielded"] if moment >= closed]
            node.stopped_after_close.append(outcome["ended"] - closed)
            # No chunk after the close: it stopped before producing another one.
            node.stopped_after_next.append(outcome["ended"] - after[0] if after else 0.0)
    finally:
        store.close()


class Progress:
    """What a reader of progress states saw: the chunk indexes, when the first came."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seen: set[int] = set()
        self.first: float | None = None

    def on_message(self, message: dict[str, Any]) -> None:
        if message["status"] == "PROGRESS":
            if self.first is None:
                self.first = time.perf_counter() - self.started
            self.seen.add(message["result"]["i"])


@contextmanager
def celery_app(name: str) -> Iterator[Any]:
    """A Celery app of its own on the bench's databases; its connections closed after."""
    from celery import Celery

    app = Celery(name, broker=BROKER, backend=BACKEND, set_as_current=False)
    app.conf.task_default_queue = "bench.streaming"
    try:
        yield app
    finally:
        # Closed here, so that they do not count as the next node's reader's connections.
        app.backend.result_consumer.stop()
        app.backend.client.connection_pool.disconnect()
        app.close()


def baseline(node: Node, rounds: int) -> None:
    """The same chunks as Celery progress states, read with ``get(on_message=...)``:
    by the caller (subscribed as it sends), and by a reader that comes once the first
    chunk is out (another process: a web page, a reconnecting client)."""
    with celery_app("progress_caller") as caller_app, celery_app("late_reader") as late_app:
        for _ in range(rounds):
            caller = Progress()
            result = caller_app.send_task("bench.progress", (STREAM_CHUNKS,))
            assert result.get(on_message=caller.on_message, timeout=30,
                              interval=0.01) == STREAM_CHUNKS
            node.baseline_lost.append(STREAM_CHUNKS - len(caller.seen))
            if caller.first is not None:
                node.baseline_first.append(caller.first)
        for _ in range(rounds):
            late = Progress()
            result = caller_app.send_task("bench.progress", (STREAM_CHUNKS,))
            while late_app.backend.get_task_meta(result.id)["status"] == "PENDING":
                time.sleep(0.0005)
            late_app.AsyncResult(result.id).get(on_message=late.on_message, timeout=30,
                                                interval=0.01)
            node.baseline_late_lost.append(STREAM_CHUNKS - len(late.seen))


def run_node(name: str, pool: str, concurrency: int, quick: bool) -> Node:
    """Start a node, measure everything on it, stop it."""
    from bench.streaming_app import warm

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WARMPOOL_BENCH_SIZE": str(concurrency)}
    worker = WorkerProcess("bench.streaming_app", pool=pool, concurrency=concurrency,
                           broker=BROKER, backend=BACKEND, env=env, cwd=ROOT)
    node = Node(name)
    step: Callable[[str], None] = lambda what: print(f"  {name}: {what}", flush=True)  # noqa: E731
    try:
        worker.start()
        for _ in range(20):  # warm up: imports, connections, the reply listener
            warm.call("streaming", words(1))
            list(warm.stream("streaming", words(2)))
        step("first chunk against a unary call")
        first_chunks(warm, node, 30 if quick else 100)
        step("one long stream, then unary calls: CPU")
        cpu_costs(warm, worker, node, 5_000 if quick else 20_000, 200 if quick else 500)
        step(f"{STREAMS} streams of {STREAM_CHUNKS} chunks from one event loop")
        concurrent_streams(warm, node)
        step("closing streams early")
        cancellations(warm, node, 5 if quick else 10)
        step("baseline: update_state progress states")
        baseline(node, 10 if quick else 30)
    finally:
        worker.stop()
        worker.remove_log()
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller streams")
    options = parser.parse_args()
    os.environ.update({"WARMPOOL_BROKER_URL": BROKER, "WARMPOOL_RESULT_BACKEND": BACKEND})
    print(f"running (Redis: {BROKER} and {BACKEND}):", flush=True)
    nodes = [run_node("threads -c 8", "threads", 8, options.quick),
             run_node("prefork -c 2", "prefork", 2, options.quick)]
    for node in nodes:
        report(node)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def report(node: Node) -> None:
    unary_p50 = statistics.median(node.unary)
    first_p50 = statistics.median(node.first)
    baseline_first = statistics.median(node.baseline_first) if node.baseline_first else 0.0
    lost, late_lost = sum(node.baseline_lost), sum(node.baseline_late_lost)
    sent = STREAM_CHUNKS * len(node.baseline_lost)
    print(f"\n{node.name}\n")
    print(f"  {'':44}{'warm.stream':>14}{'update_state':>14}{'warm.call':>12}")
    print(f"  {'first chunk p50 (reply for warm.call)':44}{ms(first_p50):>14}"
          f"{ms(baseline_first):>14}{ms(unary_p50):>12}")
    ours = f"{node.stream_lost}/{STREAMS * STREAM_CHUNKS}"
    print(f"  {'chunks lost, read by the caller':44}{ours:>14}{f'{lost}/{sent}':>14}")
    print(f"  {'chunks lost, read by a late reader':44}{'-':>14}"
          f"{f'{late_lost}/{sent}':>14}")
    print(f"\n  one stream of {node.long_chunks} chunks in {node.long_seconds:.2f} s: "
          f"{node.long_chunks / node.long_seconds:.0f} chunks/s; worker CPU "
          f"{node.cpu_per_chunk * 1e6:.0f} us per chunk, {node.cpu_per_call * 1e6:.0f} us "
          "per unary call")
    print(f"  {STREAMS} streams x {STREAM_CHUNKS} chunks from one event loop in "
          f"{node.concurrent_seconds:.2f} s: {node.concurrent_ok} complete and in order, "
          f"{node.connections} Redis connections held at most")
    print(f"  closed after {CLOSE_AFTER} chunks ({len(node.stopped_after_next)} times): the "
          f"generator stopped {ms(max(node.stopped_after_next))} at most after its next "
          f"chunk, {ms(statistics.median(node.stopped_after_close))} p50 after the close")
    checks: list[Check] = [
        ("first chunk / unary call p50", first_p50 / unary_p50, f"<= {FIRST_CHUNK_TARGET}",
         first_p50 <= FIRST_CHUNK_TARGET * unary_p50),
        ("worker CPU per chunk / per unary call", node.cpu_per_chunk / node.cpu_per_call,
         f"<= {CPU_RATIO_TARGET}", node.cpu_per_chunk <= CPU_RATIO_TARGET * node.cpu_per_call),
        (f"{STREAMS} streams complete, in order, once", node.concurrent_ok, f"= {STREAMS}",
         node.concurrent_ok == STREAMS),
        ("Redis connections of the reader", node.connections,
         f"<= {REDIS_CONNECTIONS_TARGET}", node.connections <= REDIS_CONNECTIONS_TARGET),
        ("stopped after its next chunk (max, s)", max(node.stopped_after_next),
         f"<= {STOP_TARGET}", max(node.stopped_after_next) <= STOP_TARGET),
        ("update_state chunks lost, late reader", late_lost, "> 0", late_lost > 0),
    ]
    print("\n  targets")
    print_targets(checks, indent="    ", width=42, digits=3)


if __name__ == "__main__":
    main()
