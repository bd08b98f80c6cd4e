"""A pool under a burst of ten times what it serves, with ``max_queued`` and without.

    python bench/overload.py                      # Redis, about a minute
    python bench/overload.py --broker amqp://guest:guest@127.0.0.1:5672//
    python bench/overload.py --redis redis://127.0.0.1:6391 --quick

One threads node (``-c 8``) hosts two pools of two agents each, whose action sleeps 50 ms:
each serves 40 calls a second. ``bounded`` has ``max_queued=20``, ``unbounded`` none. In
one run:

1. **The burst.** For ``--seconds`` (3), calls arrive at ten times that (400 a second,
   open loop: ``warm.acall`` on one event loop, each at its time) at ``bounded``, then
   the same at ``unbounded``;
   every call waits ``timeout=5`` to start. Rows: calls admitted, refused (``PoolBusy``),
   timed out (``CheckoutTimeout``); the latency of the calls served (p50, p99) and of
   every call; how soon each refusal came (p50, p99, most), from the caller's publish
   and from the call itself (which adds the event loop's and the publishing threads'
   own delays); the most calls found waiting (queued + reserved, sampled every 5 ms)
   against the bound.
2. **The caller's cost.** One thread calls each pool in turn, far under the bound, in
   blocks of 50 (so that the machine's drift hits both alike); this process's CPU per
   call to ``bounded`` over that to ``unbounded``.

Targets (issue 23): refusals within 5 ms of the caller's publish (p99); no admitted call timing out;
the calls waiting never over the bound plus the stated tolerance (the node's reserve
room, its capacity: 2); the caller's cost with the bound at most 1.05 times without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import Check, print_targets  # noqa: E402
from celery_warmpool import CheckoutTimeout, PoolBusy  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402
from celery_warmpool.wire.backlog import BacklogBoard, totals  # noqa: E402

WORK = {"type": "bench.work", "data": {"seconds": 0.05}}
#: Agents per pool, and the calls a second one pool serves.
SIZE = 2
SERVES = SIZE / 0.05
BOUND = 20
TOLERANCE = SIZE
REFUSAL_P99_TARGET = 0.005
COST_TARGET = 1.05


@dataclass
class Burst:
    pool: str
    served: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    #: How long each refused call's publish took (from the message's send to PoolBusy).
    refused_publish: list[float] = field(default_factory=list)
    timed_out: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    most_waiting: int = 0

    @property
    def every(self) -> list[float]:
        return self.served + self.refused + self.timed_out


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Waiting:
    """Samples the calls waiting for a pool (queued in the broker, reserved on nodes)."""

    def __init__(self, app: Any, broker: str, queue: str) -> None:
        self.queue = queue
        self.board = BacklogBoard.of(app)
        self.redis = redis.Redis.from_url(broker) if broker.startswith("redis") else None
        self.connection = None if self.redis else app.connection_for_write()
        self.channel = None if self.redis else self.connection.channel()

    def now(self) -> int:
        if self.redis is not None:
            queued = int(self.redis.llen(self.queue))
        else:
            queued = int(self.channel.queue_declare(queue=self.queue,
                                                    passive=True).message_count)
        reserved = totals(self.board.read(self.queue)).reserved if self.board else 0
        return queued + reserved

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.connection is not None:
            self.connection.release()


def burst(warm: Any, app: Any, broker: str, pool: str, seconds: float) -> Burst:
    """Calls at ten times what ``pool`` serves, for ``seconds``; what became of each."""
    found = Burst(pool)
    waiting = Waiting(app, broker, warm.spec(pool).queue)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            count = waiting.now()
            found.most_waiting = max(found.most_waiting, count)
            time.sleep(0.005)

    async def call() -> None:
        started = time.perf_counter()
        try:
            await warm.acall(pool, WORK, timeout=5.0, call_timeout=5.0)
            kind = found.served
        except PoolBusy:
            kind = found.refused
        except CheckoutTimeout:
            kind = found.timed_out
        except Exception as exc:
            found.failed.append(f"{type(exc).__name__}: {exc}")
            return
        kind.append(time.perf_counter() - started)

    async def arrivals() -> None:
        # Open loop: each call goes at its time, whether the earlier ones ended or not.
        rate = 10 * SERVES
        calls = []
        begun = time.perf_counter()
        for index in range(int(rate * seconds)):
            delay = begun + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.ensure_future(call()))
        await asyncio.gather(*calls)

    publisher = warm.client.publisher
    send = publisher.send

    def timed_send(message: Any) -> None:
        started = time.perf_counter()
        try:
            send(message)
        except PoolBusy:
            found.refused_publish.append(time.perf_counter() - started)
            raise

    publisher.send = timed_send
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        asyncio.run(arrivals())
    finally:
        publisher.send = send
    sampling.set()
    sampler.join(5)
    waiting.close()
    return found


def caller_cost(warm: Any, blocks: int, per_block: int = 50) -> dict[str, float]:
    """This process's CPU seconds per call to each pool, one call at a time."""
    cpu = {"bounded": 0.0, "unbounded": 0.0}
    for pool in cpu:
        warm.call(pool, {"type": "bench.work", "data": {"seconds": 0.0}})  # warm up
    for block in range(blocks):
        order = ["bounded", "unbounded"] if block % 2 == 0 else ["unbounded", "bounded"]
        for pool in order:
            started = time.process_time()
            for _ in range(per_block):
                warm.call(pool, {"type": "bench.work", "data": {"seconds": 0.0}})
            cpu[pool] += time.process_time() - started
    return {pool: seconds / (blocks * per_block) for pool, seconds in cpu.items()}


def report(bursts: list[Burst], cost: dict[str, float]) -> list[Check]:
    print(f"one threads node, pools of {SIZE} agents at 50 ms a call ({SERVES:.0f} calls/s "
          f"each); a burst of {10 * SERVES:.0f} calls/s, max_queued={BOUND} on 'bounded'\n")
    print(f"{'pool':<11}{'served':>7}{'refused':>8}{'timed out':>10}{'failed':>7}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'all p99':>9}{'most waiting':>13}")
    for row in bursts:
        print(f"{row.pool:<11}{len(row.served):>7}{len(row.refused):>8}"
              f"{len(row.timed_out):>10}{len(row.failed):>7}"
              f"{percentile(row.served, 0.5) * 1e3:>8.0f}"
              f"{percentile(row.served, 0.99) * 1e3:>8.0f}"
              f"{percentile(row.every, 0.99) * 1e3:>9.0f}{row.most_waiting:>13}")
        for failure in row.failed[:3]:
            print(f"  failed: {failure}")
    held = bursts[0]
    print(f"\nrefused calls, ms       {'p50':>7}{'p99':>8}{'max':>8}")
    for name, samples in (("from the publish", held.refused_publish),
                          ("from the call", held.refused)):
        print(f"  {name:<21}{percentile(samples, 0.5) * 1e3:>7.2f}"
              f"{percentile(samples, 0.99) * 1e3:>8.2f}{max(samples, default=0) * 1e3:>8.2f}")
    ratio = cost["bounded"] / cost["unbounded"]
    print(f"\ncaller's CPU per call: bounded {cost['bounded'] * 1e3:.3f} ms, unbounded "
          f"{cost['unbounded'] * 1e3:.3f} ms\n")
    return [
        ("refused within, from the publish (p99 ms)",
         percentile(held.refused_publish, 0.99) * 1e3, f"<= {REFUSAL_P99_TARGET * 1e3:g}",
         percentile(held.refused_publish, 0.99) <= REFUSAL_P99_TARGET),
        ("admitted calls timed out", len(held.timed_out), "0", not held.timed_out),
        ("most calls waiting", held.most_waiting, f"<= {BOUND + TOLERANCE}",
         held.most_waiting <= BOUND + TOLERANCE),
        ("caller's cost, bounded / unbounded", ratio, f"<= {COST_TARGET}",
         ratio <= COST_TARGET),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=None,
                        help="broker URL (default: the Redis of --redis, database 14)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="the Redis server for the result store (database 15)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each burst")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    options = parser.parse_args()
    broker = options.broker or f"{options.redis}/14"
    backend = f"{options.redis}/15"
    run = uuid.uuid4().hex[:8]
    os.environ.update({"WARMPOOL_BROKER_URL": broker, "WARMPOOL_RESULT_BACKEND": backend,
                       "OVERLOAD_RUN": run, "OVERLOAD_MAX_QUEUED": str(BOUND),
                       "OVERLOAD_SIZE": str(SIZE)})
    from bench.overload_app import app, warm

    for url in {broker, backend}:
        if url.startswith("redis"):
            redis.Redis.from_url(url).flushdb()
    worker = WorkerProcess("bench.overload_app", pool="threads", concurrency=8,
                           broker=broker, backend=backend, cwd=ROOT, loglevel="WARNING",
                           env={key: os.environ[key] for key in (
                               "OVERLOAD_RUN", "OVERLOAD_MAX_QUEUED", "OVERLOAD_SIZE")}
                           | {"PYTHONPATH": str(ROOT)})
    worker.start()
    seconds = 1.5 if options.quick else options.seconds
    try:
        bursts = []
        for pool in ("bounded", "unbounded"):
            bursts.append(burst(warm, app, broker, pool, seconds))
            # Let the pool drain before the next burst (the unbounded one's calls
            # expire unrun past their timeout).
            time.sleep(6.0)
        cost = caller_cost(warm, blocks=4 if options.quick else 20)
    finally:
        worker.stop()
        if broker.startswith("amqp"):
            with app.connection_for_write() as connection:
                channel = connection.channel()
                for pool in ("bounded", "unbounded"):
                    channel.queue_delete(warm.spec(pool).queue)
    print(f"broker: {broker.split('@')[-1]}")
    checks = report(bursts, cost)
    print_targets(checks, width=44)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
