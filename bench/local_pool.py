"""What one checkout+checkin cycle of AgentPool costs, against SQLAlchemy's QueuePool and a
bare list guarded by a lock, measured in the same run.

    python bench/local_pool.py           # about a minute
    python bench/local_pool.py --quick   # a few seconds, rougher

Every pool holds 4 items and hands them out most recently used first (lifo). Each figure
is the best of several repeats (this is a shared, noisy machine: the best run is the one
least disturbed), with the garbage collector off while timing, and no telemetry receiver
connected. With 8 threads, the figure is wall time divided by the cycles all threads ran.

With 8 threads on 4 items, AgentPool serves waiters first come, first served (a design
requirement): the thread that returns an agent hands it to the oldest waiter and, when it
asks again, queues behind the others, so nearly every cycle costs a thread switch.
QueuePool and the bare condition let the running thread take back what it just returned
(barging), which is faster and unfair. The output says so next to the threaded verdicts.

The exit status is 0 when every target is met, 1 otherwise.

The QueuePool cycle that counts for the targets is ``pool.connect()`` then ``.close()``:
its raw, pool-level checkout and checkin (what ``engine.raw_connection()`` uses), which,
like ``AgentPool.checkout``/``checkin``, hands out an owned handle and refuses a double
return. Reset on return is off (``reset_on_return=None``) because AgentPool resets nothing
by default. The internal ``_do_get()``/``_do_return_conn()`` pair, which skips that
bookkeeping, is shown for reference only.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.pool import QueuePool

from celery_warmpool import Agent, AgentPool

POOL_SIZE = 4
THREADS = 8
#: AgentPool's cycle at most this fraction of QueuePool's, and this multiple of the bare lock's.
TARGET_VS_QUEUEPOOL = 1 / 3
TARGET_VS_BARE_LOCK = 4.0

Cycle = Callable[[int], None]


class BenchAgent(Agent[Any]):
    """An agent with nothing to warm up: only the pool's own cost is measured."""


class TrivialConnection:
    """What QueuePool's creator returns: a DBAPI connection that does nothing."""

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def agent_pool_cycles() -> tuple[Cycle, Callable[[], None]]:
    pool = AgentPool(BenchAgent, name="bench", size=POOL_SIZE, strategy="lifo",
                     start_timeout=30).start()

    def cycles(count: int) -> None:
        checkout, checkin = pool.checkout, pool.checkin
        for _ in range(count):
            checkin(checkout())

    return cycles, pool.close


def queue_pool(**options: Any) -> QueuePool:
    return QueuePool(TrivialConnection, pool_size=POOL_SIZE, max_overflow=0, use_lifo=True,
                     reset_on_return=None, timeout=60, **options)


def queue_pool_connect_cycles() -> tuple[Cycle, Callable[[], None]]:
    pool = queue_pool()

    def cycles(count: int) -> None:
        connect = pool.connect
        for _ in range(count):
            connect().close()

    return cycles, pool.dispose


def queue_pool_raw_cycles() -> tuple[Cycle, Callable[[], None]]:
    pool = queue_pool()

    def cycles(count: int) -> None:
        get, put = pool._do_get, pool._do_return_conn
        for _ in range(count):
            put(get())

    return cycles, pool.dispose


def bare_lock_cycles() -> tuple[Cycle, Callable[[], None]]:
    items = list(range(POOL_SIZE))
    lock = threading.Lock()

    def cycles(count: int) -> None:
        for _ in range(count):
            with lock:
                item = items.pop()
            with lock:
                items.append(item)

    return cycles, lambda: None


def bare_condition_cycles() -> tuple[Cycle, Callable[[], None]]:
    # With more threads than items a bare lock cannot wait: the least a blocking pool
    # needs is a condition over the lock.
    items = list(range(POOL_SIZE))
    ready = threading.Condition(threading.Lock())

    def cycles(count: int) -> None:
        for _ in range(count):
            with ready:
                while not items:
                    ready.wait()
                item = items.pop()
            with ready:
                items.append(item)
                ready.notify()

    return cycles, lambda: None


@dataclass
class Contender:
    key: str
    label: str
    make: Callable[[], tuple[Cycle, Callable[[], None]]]


SINGLE = [
    Contender("agent", "AgentPool checkout()/checkin()", agent_pool_cycles),
    Contender("queue", "QueuePool connect()/close()", queue_pool_connect_cycles),
    Contender("raw", "QueuePool _do_get()/_do_return_conn() [ref]", queue_pool_raw_cycles),
    Contender("bare", "list + Lock", bare_lock_cycles),
]
THREADED = [
    Contender("agent", "AgentPool checkout()/checkin()", agent_pool_cycles),
    Contender("queue", "QueuePool connect()/close()", queue_pool_connect_cycles),
    Contender("raw", "QueuePool _do_get()/_do_return_conn() [ref]", queue_pool_raw_cycles),
    Contender("bare", "list + Condition(Lock)", bare_condition_cycles),
]


def time_single(cycles: Cycle, count: int) -> float:
    """Nanoseconds per cycle, one thread."""
    gc.disable()
    try:
        started = time.perf_counter_ns()
        cycles(count)
        return (time.perf_counter_ns() - started) / count
    finally:
        gc.enable()


def time_threaded(cycles: Cycle, count: int) -> float:
    """Nanoseconds of wall time per cycle, ``THREADS`` threads sharing the pool."""
    each = count // THREADS
    start = threading.Barrier(THREADS + 1)

    def run() -> None:
        start.wait()
        cycles(each)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    gc.disable()
    try:
        start.wait()
        started = time.perf_counter_ns()
        for thread in threads:
            thread.join()
        return (time.perf_counter_ns() - started) / (each * THREADS)
    finally:
        gc.enable()


def measure(contenders: list[Contender], timer: Callable[[Cycle, int], float], count: int,
            repeats: int) -> dict[str, float]:
    """Best ns per cycle of each contender; repeats interleaved so drift hits all alike."""
    made = {contender.key: contender.make() for contender in contenders}
    best = dict.fromkeys(made, float("inf"))
    try:
        for cycles, _ in made.values():
            cycles(min(count, 2000))  # warm up
        for _ in range(repeats):
            for key, (cycles, _) in made.items():
                best[key] = min(best[key], timer(cycles, count))
    finally:
        for _, close in made.values():
            close()
    return best


def report(title: str, contenders: list[Contender], best: dict[str, float]) -> list[str]:
    rows = [f"{title}", f"  {'pool':<46}{'ns/cycle':>10}{'AgentPool/this':>16}"]
    for contender in contenders:
        ratio = best["agent"] / best[contender.key]
        rows.append(f"  {contender.label:<46}{best[contender.key]:>10,.0f}{ratio:>16.2f}")
    return rows


def verdicts(mode: str, best: dict[str, float], baseline: str) -> tuple[list[str], bool]:
    checks = [
        ("AgentPool/QueuePool connect+close", best["agent"] / best["queue"], "<=",
         TARGET_VS_QUEUEPOOL),
        (f"AgentPool/{baseline}", best["agent"] / best["bare"], "<=", TARGET_VS_BARE_LOCK),
    ]
    rows, passed = [], True
    for name, value, op, target in checks:
        ok = value <= target
        passed &= ok
        rows.append(f"  {mode:<22}{name:<36}{value:>6.2f} {op} {target:<5.2f} "
                    f"{'PASS' if ok else 'MISS'}")
    return rows, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer cycles and repeats")
    parser.add_argument("--repeats", type=int, help="repeats per figure (best is kept)")
    args = parser.parse_args(argv)
    single_count, threaded_count, repeats = (
        (20_000, 16_000, 3) if args.quick else (200_000, 80_000, 7))
    repeats = args.repeats or repeats

    print(f"checkout+checkin cycle, pools of {POOL_SIZE} (lifo), best of {repeats} repeats; "
          f"Python {sys.version.split()[0]}")
    print("QueuePool cycle for the targets: pool.connect()/.close() (raw pool-level, "
          "reset_on_return=None); [ref] rows are not targets\n")
    single = measure(SINGLE, time_single, single_count, repeats)
    threaded = measure(THREADED, time_threaded, threaded_count, repeats)
    lines = report(f"single thread ({single_count:,} cycles)", SINGLE, single)
    lines += ["", *report(
        f"{THREADS} threads on a pool of {POOL_SIZE} ({threaded_count:,} cycles in all)",
        THREADED, threaded)]
    single_rows, single_ok = verdicts("single thread", single, "bare lock")
    threaded_rows, threaded_ok = verdicts(f"{THREADS} threads", threaded, "bare condition")
    lines += ["", "targets (AgentPool at most 1/3 of QueuePool, at most 4x the bare lock)"]
    lines += single_rows + threaded_rows
    if not threaded_ok:
        lines += [
            f"  note: with {THREADS} threads on {POOL_SIZE} agents AgentPool hands each returned "
            "agent to the oldest waiter",
            "  (first come, first served), so most cycles wait for a thread switch; QueuePool "
            "and the bare",
            "  condition let the running thread take back what it just returned (unfair, "
            "fewer switches)."]
    print("\n".join(lines))
    return 0 if single_ok and threaded_ok else 1


if __name__ == "__main__":
    sys.exit(main())
