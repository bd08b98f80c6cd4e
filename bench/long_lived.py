"""A long-lived caller: 100,000 calls from one process, one outage, nothing left behind.

    python bench/long_lived.py                 # 100,000 calls, about 6 minutes
    python bench/long_lived.py --quick         # 5,000 calls, a smoke test
    python bench/long_lived.py --calls 20000 --trace   # with tracemalloc's top growth

One threads node (``-c 16``) hosts the pool of ``bench/long_lived_app.py`` on a
redis-server of the run's own (appendonly), broker and result store alike. This process
is the caller a web server would be, with one reply listener for all of it:

- three threads with ``warm.call`` (and ``warm.stream`` for streams);
- one event loop with 48 coroutines and ``warm.acall`` (and ``warm.astream``);
- one thread with ``warm.map`` over batches of 20 signals.

By its number, a call is one of: 10% cancelled (a task cancelled in flight, a stream
closed after its first chunk, a map abandoned after its first reply), 5% timing out (an
action that sleeps longer than its ``call_timeout``), 5% a stream read to its end, the
rest an echo. Halfway through, the redis-server is stopped (SIGTERM, as a restart does)
and started again 1 to 3 s later.

Afterwards it prints the calls by outcome and these targets: every call ended as its kind
says (a reply, ``CallTimeout``, or cancelled), the reply listener holds no subscription,
Redis has no result or stream channel subscribed, and the resident memory (RSS) of this
process grew by at most 5% between the 10,000th call and the last (with fewer calls, the
tenth of them and the last). Exit status 0 if every target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.restarts import terminate  # noqa: E402
from bench.soak import RedisServer  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

POOL = "lived"
BLOCKING_CALLERS = 3
COROUTINES = 48
MAP_BATCH = 20
STREAM_CHUNKS = 4
#: Seconds a call may wait to start: enough to wait out the outage.
TIMEOUT = 10.0
#: A call's ``call_timeout``, and what the timing-out calls sleep instead.
CALL_TIMEOUT = 0.1
#: (Well past it: a watchdog late by a few tenths on a loaded machine still answers first.)
OVERRUN = {"type": "lived.sleep", "data": {"seconds": 0.6}}
#: What a call cancelled in flight runs, and when it is cancelled.
SLOW = {"type": "lived.sleep", "data": {"seconds": 0.05}}
CANCEL_AFTER = 0.01
#: Seconds the store stays down: least, most.
DOWN = (1.0, 3.0)
#: The most RSS growth allowed between the first measure and the last.
GROWTH = 0.05
#: Seconds the whole 100,000-call run may take.
WALL = 600.0

CANCEL, TIMES_OUT, STREAM, ECHO = "cancel", "time out", "stream", "echo"
#: What a call of each kind may end as.
EXPECTED = {CANCEL: {"cancelled", "reply"}, TIMES_OUT: {"CallTimeout"},
            STREAM: {"reply"}, ECHO: {"reply"}}


def kind_of(number: int) -> str:
    """A call's kind, by its number: 10% cancelled, 5% timing out, 5% streams."""
    rest = number % 100
    return CANCEL if rest < 10 else TIMES_OUT if rest < 15 else STREAM if rest < 20 else ECHO


def echo(number: int) -> dict[str, Any]:
    return {"type": "lived.echo", "data": {"value": number}}


def chunks() -> dict[str, Any]:
    return {"type": "lived.chunks", "data": {"count": STREAM_CHUNKS}}


@dataclass
class Run:
    """The calls handed out and their outcomes, shared by every caller."""

    total: int
    first_mark: int
    trace: bool
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    taken: int = 0
    done: int = 0
    rss: dict[int, int] = field(default_factory=dict)
    snapshots: list[tracemalloc.Snapshot] = field(default_factory=list)
    halfway: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        """The next call's number, or ``None`` once every call is handed out."""
        with self.lock:
            if self.taken >= self.total:
                return None
            self.taken += 1
            return self.taken

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        """Count one call's outcome; measure memory at the first mark and the end."""
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome not in EXPECTED[kind]:
                self.unexpected[f"{kind}: {outcome}"] += 1
                self.examples.setdefault(outcome, detail[:200])
            self.done += 1
            if self.done in (self.first_mark, self.total):
                self.rss[self.done] = psutil.Process().memory_info().rss
                if self.trace:
                    self.snapshots.append(tracemalloc.take_snapshot())
            if self.done == self.total // 2:
                self.halfway.set()


def outcome_of(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return type(error).__name__


def where(error: BaseException) -> str:
    """``error`` and the last frames it came through, for the report."""
    frames = traceback.extract_tb(error.__traceback__)[-3:]
    return f"{error!r} at " + " < ".join(
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames))


def blocking_caller(warm: Any, run: Run) -> None:
    while (number := run.take()) is not None:
        kind = kind_of(number)
        try:
            if kind == CANCEL:  # a stream closed after its first chunk
                stream = warm.stream(POOL, chunks(), timeout=TIMEOUT, call_timeout=5)
                next(stream)
                stream.close()
                run.record(kind, "cancelled")
            elif kind == TIMES_OUT:
                reply = warm.call(POOL, OVERRUN, timeout=TIMEOUT, call_timeout=CALL_TIMEOUT)
                run.record(kind, "reply", f"ran {reply.duration:.3f} s")
            elif kind == STREAM:
                read = list(warm.stream(POOL, chunks(), timeout=TIMEOUT, call_timeout=5))
                run.record(kind, "reply" if read == list(range(STREAM_CHUNKS)) else "wrong")
            else:
                reply = warm.call(POOL, echo(number), timeout=TIMEOUT)
                run.record(kind, "reply" if reply.result == number else "wrong")
        except Exception as exc:
            run.record(kind, outcome_of(exc), where(exc))


async def coroutine_caller(warm: Any, run: Run) -> None:
    while (number := run.take()) is not None:
        kind = kind_of(number)
        try:
            run.record(kind, *await one_acall(warm, number, kind))
        except Exception as exc:
            run.record(kind, outcome_of(exc), where(exc))


async def one_acall(warm: Any, number: int, kind: str) -> tuple[str, str]:
    """One call of ``kind`` from the event loop; its outcome and a detail."""
    if kind == CANCEL and number % 2:  # a stream closed after its first chunk
        async with warm.astream(POOL, chunks(), timeout=TIMEOUT, call_timeout=5) as stream:
            await anext(stream)
        return "cancelled", ""
    if kind == CANCEL:  # an acall cancelled in flight
        task = asyncio.ensure_future(warm.acall(POOL, SLOW, timeout=TIMEOUT))
        await asyncio.sleep(CANCEL_AFTER)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled", ""
        return "reply", "done before its cancel"
    if kind == TIMES_OUT:
        reply = await warm.acall(POOL, OVERRUN, timeout=TIMEOUT, call_timeout=CALL_TIMEOUT)
        return "reply", f"ran {reply.duration:.3f} s"
    if kind == STREAM:
        read = [chunk async for chunk in warm.astream(POOL, chunks(), timeout=TIMEOUT,
                                                      call_timeout=5)]
        return ("reply" if read == list(range(STREAM_CHUNKS)) else "wrong"), repr(read)
    reply = await warm.acall(POOL, echo(number), timeout=TIMEOUT)
    return ("reply" if reply.result == number else "wrong"), repr(reply.result)


def map_caller(warm: Any, run: Run) -> None:
    while True:
        numbers = [number for _ in range(MAP_BATCH) if (number := run.take()) is not None]
        if not numbers:
            return
        kinds = [kind_of(number) for number in numbers]
        signals = [OVERRUN if kind == TIMES_OUT else echo(number)
                   for number, kind in zip(numbers, kinds, strict=True)]
        replies = warm.map(POOL, signals, concurrency=MAP_BATCH, timeout=TIMEOUT,
                           call_timeout=CALL_TIMEOUT, return_exceptions=True)
        # A map whose first call is to be cancelled is abandoned after its first reply.
        abandon = kinds[0] == CANCEL
        for index, (number, kind) in enumerate(zip(numbers, kinds, strict=True)):
            if abandon and index == 1:
                replies.close()  # the calls still in flight are cancelled
            if abandon and index >= 1:
                run.record(CANCEL, "cancelled")
                continue
            reply = next(replies)
            expected = CANCEL if abandon else kind
            if isinstance(reply, Exception):
                run.record(expected, outcome_of(reply), where(reply))
            elif kind == TIMES_OUT:
                run.record(expected, "reply", f"ran {reply.duration:.3f} s")
            else:
                run.record(expected, "reply" if reply.result == number else "wrong")
        replies.close()


def restart_halfway(store: RedisServer, run: Run, downs: list[float],
                    rng: random.Random) -> None:
    """Stop the store as a restart does once half the calls are done; start it again."""
    run.halfway.wait()
    down = rng.uniform(*DOWN)
    terminate(store, signal.SIGTERM)
    time.sleep(down)
    store.start()
    downs.append(down)


def at_rest(warm: Any, store: RedisServer) -> tuple[int, int]:
    """The reply listener's subscriptions and Redis's result and stream channels with a
    subscriber, once the listener had a moment to send its last unsubscriptions."""
    listener = warm.client.listener()
    deadline = time.monotonic() + 5
    while listener.subscriptions and time.monotonic() < deadline:
        time.sleep(0.05)
    server = redis.Redis(port=store.port)
    channels = [channel for pattern in ("celery-task-meta-*", "warmpool:stream:*")
                for channel in server.pubsub_channels(pattern)]
    subscribed = sum(count for _, count in server.pubsub_numsub(*channels)) if channels else 0
    return listener.subscriptions, subscribed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls (default 100,000)")
    parser.add_argument("--quick", action="store_true", help="5,000 calls: a smoke test")
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc snapshots at both marks: the top growth by line")
    parser.add_argument("--seed", type=int, default=16, help="the outage's length (seed)")
    options = parser.parse_args()
    total = 5_000 if options.quick else options.calls
    folder = Path(tempfile.mkdtemp(prefix="warmpool-long-lived-"))
    store = RedisServer(folder)
    store.start()
    os.environ.update(WARMPOOL_BROKER_URL=f"{store.url}/0",
                      WARMPOOL_RESULT_BACKEND=f"{store.url}/1")
    worker = WorkerProcess("bench.long_lived_app", pool="threads", concurrency=16,
                           broker=f"{store.url}/0", backend=f"{store.url}/1",
                           env={"PYTHONPATH": str(ROOT)}, cwd=ROOT, loglevel="WARNING",
                           log_path=folder / "worker.log")
    verdict = 1
    try:
        worker.start(timeout=60)
        verdict = long_lived(store, total, options)
        return verdict
    finally:
        worker.stop()
        store.stop()
        if verdict == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"(the worker's and the store's logs are kept in {folder})")


def long_lived(store: RedisServer, total: int, options: argparse.Namespace) -> int:
    from bench.long_lived_app import warm

    if options.trace:
        tracemalloc.start(12)
    run = Run(total, first_mark=min(10_000, total // 10), trace=options.trace)
    downs: list[float] = []
    started = time.monotonic()
    callers: list[Callable[[], Any]] = [
        *[lambda: blocking_caller(warm, run)] * BLOCKING_CALLERS,
        lambda: asyncio.run(_gathered(warm, run)),
        lambda: map_caller(warm, run),
        lambda: restart_halfway(store, run, downs, random.Random(options.seed)),
    ]
    threads = [threading.Thread(target=caller) for caller in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    subscriptions, channels = at_rest(warm, store)
    return report(run, downs, elapsed, subscriptions, channels)


async def _gathered(warm: Any, run: Run) -> None:
    await asyncio.gather(*(coroutine_caller(warm, run) for _ in range(COROUTINES)))


def report(run: Run, downs: list[float], elapsed: float, subscriptions: int,
           channels: int) -> int:
    first, last = run.rss[run.first_mark], run.rss[run.total]
    growth = (last - first) / first
    print(f"long-lived caller: {run.done:,} calls in {elapsed:.1f} s "
          f"({run.done / elapsed:,.0f} calls/s); the store down once for {downs[0]:.1f} s "
          f"after call {run.total // 2:,}")
    print()
    print("calls by outcome")
    for outcome, count in run.outcomes.most_common():
        print(f"  {outcome:<30} {count:>8,}  {count / run.done:6.1%}")
    for outcome, example in run.examples.items():
        print(f"    {outcome}, first: {example}")
    wall = WALL * run.total / 100_000
    rows = [
        ("calls not ended as their kind says", f"{sum(run.unexpected.values())}", "= 0",
         not run.unexpected),
        ("listener subscriptions at rest", f"{subscriptions}", "= 0", subscriptions == 0),
        ("Redis channels subscribed at rest", f"{channels}", "= 0", channels == 0),
        (f"RSS at call {run.first_mark:,}", f"{first / 2**20:.1f} MiB", "", None),
        (f"RSS at call {run.total:,}", f"{last / 2**20:.1f} MiB", "", None),
        ("RSS growth between them", f"{growth:+.1%}", f"<= {GROWTH:.0%}", growth <= GROWTH),
        ("wall time", f"{elapsed:.0f} s", f"<= {wall:.0f} s", elapsed <= wall),
    ]
    print()
    print(f"  {'':<36} {'value':>10}  target")
    for label, value, target, met in rows:
        verdict = "" if met is None else ("PASS" if met else "MISS")
        print(f"  {label:<36} {value:>10}  {target:<6} {verdict}")
    for outcome, count in run.unexpected.most_common(5):
        print(f"  not as expected: {outcome} ({count})")
    if len(run.snapshots) == 2:
        print()
        first_size, last_size = (sum(stat.size for stat in snapshot.statistics("filename"))
                                 for snapshot in run.snapshots)
        # RSS counts tracemalloc's own tables too: what Python allocated is this.
        print(f"tracemalloc: Python's allocations {first_size / 2**20:.1f} MiB at call "
              f"{run.first_mark:,}, {last_size / 2**20:.1f} MiB at the last; the most growth:")
        for stat in run.snapshots[1].compare_to(run.snapshots[0], "lineno")[:10]:
            print(f"  {stat}")
    met = all(row[3] is not False for row in rows)
    print()
    print("all targets met" if met else "some targets missed")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
