"""The caller's side under load: bare Celery against warm.call, acall and map, in one run.

    python bench/callers.py            # about 2 minutes
    python bench/callers.py --seconds 2 --no-rabbitmq

One threads node (``-c 16``, a pool of 8 agents whose action returns its input) on the
local Redis (databases 10 and 11); every caller lives in this process, one step after
another, each for ``--seconds``:

- bare Celery ``apply_async().get()`` (a late-ack task returning its input) from 1, 32 and
  256 threads: the baseline;
- ``warm.call`` from 1, 32 and 256 threads;
- ``warm.acall`` with 1, 32, 256 and 1,024 calls in flight from one event loop;
- ``warm.map(concurrency=256)`` from one thread;
- and ``warm.acall`` with 1,024 in flight on RabbitMQ (a node of its own) with the Redis
  result store.

Each row's callers run in a process of their own (so that its connections and CPU are
its own). Each row: calls per second, p50 and p99 latency, this process's CPU per call (the
operating system's accounting of the whole process), and the most Redis connections it
held. The targets are ratios to the bare rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

BROKER = "redis://127.0.0.1:6379/10"
BACKEND = "redis://127.0.0.1:6379/11"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
#: The row run on RabbitMQ (with the Redis result store).
RABBITMQ_STEP = "warm.acall, 1,024 in flight (RabbitMQ)"
SIGNAL = {"type": "bench.echo", "data": {"value": 1}}


@dataclass
class Row:
    name: str
    calls: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    connections: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    @property
    def cpu_per_call_us(self) -> float:
        return self.cpu / self.calls * 1e6 if self.calls else 0.0


class Sampler:
    """Counts this process's Redis connections now and then while a step runs."""

    def __init__(self) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        count = sum(1 for connection in psutil.Process().net_connections("tcp")
                    if connection.raddr and connection.raddr.port == 6379
                    and connection.status == psutil.CONN_ESTABLISHED)
        self.most = max(self.most, count)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()


def measured(name: str, run: Callable[[Row, float], None], seconds: float) -> Row:
    """Run one step for ``seconds``; fill its row."""
    row = Row(name)
    before = os.times()
    started = time.perf_counter()
    with Sampler() as sampler:
        run(row, time.perf_counter() + seconds)
    row.seconds = time.perf_counter() - started
    after = os.times()
    row.cpu = (after.user - before.user) + (after.system - before.system)
    row.connections = sampler.most
    row.calls = len(row.latencies) if row.latencies else row.calls
    return row


def from_threads(count: int, call: Callable[[], Any]) -> Callable[[Row, float], None]:
    def run(row: Row, until: float) -> None:
        lock = threading.Lock()
        start = threading.Barrier(count)

        def loop() -> None:
            mine: list[float] = []
            errors = 0
            start.wait()
            while time.perf_counter() < until:
                began = time.perf_counter()
                try:
                    call()
                except Exception:
                    errors += 1
                    continue
                mine.append(time.perf_counter() - began)
            with lock:
                row.latencies.extend(mine)
                row.errors += errors

        threads = [threading.Thread(target=loop) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return run


def in_flight(warm: Any, count: int) -> Callable[[Row, float], None]:
    def run(row: Row, until: float) -> None:
        async def loop() -> None:
            while time.perf_counter() < until:
                began = time.perf_counter()
                try:
                    await warm.acall("echo", SIGNAL, timeout=30)
                except Exception:
                    row.errors += 1
                    continue
                row.latencies.append(time.perf_counter() - began)

        async def main() -> None:
            await asyncio.gather(*(loop() for _ in range(count)))

        asyncio.run(main())

    return run


def mapped(warm: Any, concurrency: int) -> Callable[[Row, float], None]:
    def run(row: Row, until: float) -> None:
        def signals() -> Any:
            while time.perf_counter() < until:
                yield SIGNAL

        for outcome in warm.map("echo", signals(), concurrency=concurrency, timeout=30,
                                return_exceptions=True):
            if isinstance(outcome, Exception):
                row.errors += 1
            else:
                row.calls += 1

    return run


def start_node(broker: str, backend: str) -> WorkerProcess:
    env = {"PYTHONPATH": str(ROOT), "WARMPOOL_BROKER_URL": broker,
           "WARMPOOL_RESULT_BACKEND": backend}
    worker = WorkerProcess("bench.callers_app", pool="threads", concurrency=16,
                           broker=broker, backend=backend, env=env, cwd=ROOT)
    return worker.start(timeout=60)


def print_table(rows: list[Row]) -> None:
    print(f"{'callers':<40} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU/call us':>12} {'Redis conns':>12} {'errors':>7}")
    for row in rows:
        p50, p99 = row.percentile(0.5), row.percentile(0.99)
        print(f"{row.name:<40} {row.rate:>8,.0f} "
              f"{'-' if p50 is None else f'{p50:.1f}':>8} "
              f"{'-' if p99 is None else f'{p99:.1f}':>8} "
              f"{row.cpu_per_call_us:>12,.0f} {row.connections:>12} {row.errors:>7}")


def targets(rows: dict[str, Row]) -> list[tuple[str, float, str, bool]]:
    bare1, bare256 = rows["bare apply_async().get(), 1 thread"], rows[
        "bare apply_async().get(), 256 threads"]
    best_bare = max(row.rate for name, row in rows.items() if name.startswith("bare"))
    acall1024, acall256 = rows["warm.acall, 1,024 in flight"], rows["warm.acall, 256 in flight"]
    call256 = rows["warm.call, 256 threads"]
    map256 = rows["warm.map(concurrency=256), 1 thread"]
    call1 = rows["warm.call, 1 thread"]
    checks = [
        ("acall 1,024 / bare 256 threads, calls/s", acall1024.rate / bare256.rate, ">= 3", 3),
        ("acall 1,024 / bare's best row, calls/s", acall1024.rate / best_bare, ">= 1", 1),
        ("acall 1,024 CPU per call / bare 1 thread",
         acall1024.cpu_per_call_us / bare1.cpu_per_call_us, "<= 0.3", -0.3),
        ("acall 1,024 Redis connections", acall1024.connections, "<= 8", -8),
        ("acall 256 p99 / bare 256 threads p99",
         (acall256.percentile(0.99) or 0) / (bare256.percentile(0.99) or 1), "<= 0.25", -0.25),
        ("call 256 threads / bare 256 threads, calls/s", call256.rate / bare256.rate, ">= 2", 2),
        ("call 256 threads Redis connections", call256.connections, "<= 16", -16),
        ("map 256 / bare 256 threads, calls/s", map256.rate / bare256.rate, ">= 3", 3),
        ("call 1 thread p50 / bare 1 thread p50",
         (call1.percentile(0.5) or 0) / (bare1.percentile(0.5) or 1), "<= 1.0", -1.0),
    ]
    return [(name, value, target, value >= bound if bound > 0 else value <= -bound)
            for name, value, target, bound in checks]


STEPS: dict[str, tuple[str, int]] = {
    **{f"bare apply_async().get(), {n} thread{'s' * (n > 1)}": ("bare", n) for n in (1, 32, 256)},
    **{f"warm.call, {n} thread{'s' * (n > 1)}": ("call", n) for n in (1, 32, 256)},
    **{f"warm.acall, {n:,} in flight": ("acall", n) for n in (1, 32, 256, 1024)},
    "warm.map(concurrency=256), 1 thread": ("map", 256),
}
REDIS_STEPS = list(STEPS)
STEPS[RABBITMQ_STEP] = ("acall", 1024)


def step(name: str, seconds: float) -> Row:
    """Run the step ``name`` in this process (a fresh one: its connections are its own)."""
    from bench.callers_app import bare_echo, warm

    kind, count = STEPS[name]
    runs: dict[str, Callable[[], Callable[[Row, float], None]]] = {
        "bare": lambda: from_threads(count, lambda: bare_echo.apply_async((1,)).get(
            timeout=30)),
        "call": lambda: from_threads(count, lambda: warm.call("echo", SIGNAL, timeout=30)),
        "acall": lambda: in_flight(warm, count),
        "map": lambda: mapped(warm, count),
    }
    # One call first, outside the measure: the first connections are made then.
    if kind == "bare":
        bare_echo.apply_async((1,)).get(timeout=10)
    else:
        warm.call("echo", SIGNAL, timeout=10)
    return measured(name, runs[kind](), seconds)


def in_a_fresh_process(name: str, seconds: float, broker: str) -> Row:
    env = {**os.environ, "WARMPOOL_BROKER_URL": broker, "WARMPOOL_RESULT_BACKEND": BACKEND}
    done = subprocess.run([sys.executable, __file__, "--step", name, "--seconds", str(seconds)],
                          env=env, capture_output=True, text=True, timeout=600, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Row(name, calls=data["calls"], seconds=data["seconds"], cpu=data["cpu"],
               connections=data["connections"], latencies=data["latencies"],
               errors=data["errors"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per step")
    parser.add_argument("--no-rabbitmq", action="store_true", help="skip the RabbitMQ row")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # one step, in this process
    options = parser.parse_args()
    if options.step:
        print(json.dumps(vars(step(options.step, options.seconds))))
        return
    seconds = options.seconds
    rows: dict[str, Row] = {}
    for broker, names in ((BROKER, REDIS_STEPS), (RABBITMQ, [RABBITMQ_STEP])):
        if broker == RABBITMQ and options.no_rabbitmq:
            continue
        for url in (BROKER, BACKEND):
            redis.Redis.from_url(url).flushdb()
        node = start_node(broker, BACKEND)
        try:
            for name in names:
                rows[name] = in_a_fresh_process(name, seconds, broker)
                print(f"  {name}: {rows[name].rate:,.0f} calls/s", file=sys.stderr)
        finally:
            node.stop()
    print(f"\none threads node (-c 16, a pool of 8 agents), each row's callers in a process "
          f"of their own, {seconds:g} s per step; Redis unless said\n")
    print_table(list(rows.values()))
    print("\ntargets")
    for name, value, target, met in targets(rows):
        print(f"  {name:<48} {value:>8.2f} {target:<8} {'PASS' if met else 'MISS'}")
    if options.json:
        options.json.write_text(json.dumps({name: {
            "rate": row.rate, "p50_ms": row.percentile(0.5), "p99_ms": row.percentile(0.99),
            "cpu_per_call_us": row.cpu_per_call_us, "connections": row.connections,
            "errors": row.errors} for name, row in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
