"""The caller's side under load: bare Celery against warm.call, acall, map and cast, in one
run, with what each call costs the caller, the node and Redis.

    python bench/callers.py            # about two and a half minutes
    python bench/callers.py --quick    # 1.5 s per step, about a minute
    python bench/callers.py --seconds 2 --no-rabbitmq

One threads node (``-c 16``, a pool of 8 agents whose action returns its input) on the
local Redis (databases 10 and 11; ``WARMPOOL_BENCH_REDIS`` and ``WARMPOOL_BENCH_RABBITMQ``
name other servers, see ``bench/measure.py``); every caller lives in this process's
children, one step after another, each for ``--seconds``:

- bare Celery ``apply_async().get()`` (a late-ack task returning its input) from 1, 32 and
  256 threads: the baseline;
- ``warm.call`` from 1, 32 and 256 threads;
- ``warm.acall`` with 1, 32, 256 and 1,024 calls in flight from one event loop;
- ``warm.map(concurrency=256)`` from one thread;
- bursts of 500 bare ``.delay()`` against bursts of 500 ``warm.cast`` (each burst sent,
  then all its results waited for), one of each in turn in one process;
- and ``warm.acall`` with 1,024 in flight on RabbitMQ (a node of its own) with the Redis
  result store.

Each row's callers run in a process of their own (so that its connections and CPU are
its own). Each row: calls per second, p50 and p99 latency, and per call the CPU of the
node (its main process and any children), of the redis-server (found by asking it its
pid: on a shared server, others' commands count too) and of the calling process, all from
``/proc`` over the row's window; the commands Redis ran per call, by name (``INFO
commandstats``); and the most Redis connections the caller held. On the RabbitMQ row,
RabbitMQ's own CPU (its ``beam.smp``, shared by every vhost) too. The targets are ratios
to the bare rows of the same run.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import (  # noqa: E402
    RABBITMQ,
    Check,
    cpu_seconds,
    most_connections,
    print_targets,
    rabbitmq_pid,
    redis_commands,
    redis_server_pid,
    redis_url,
    send_and_wait,
    with_children,
)
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

BROKER, BACKEND = redis_url(10), redis_url(11)
#: The row run on RabbitMQ (with the Redis result store).
RABBITMQ_STEP = "warm.acall, 1,024 in flight (RabbitMQ)"
SIGNAL = {"type": "bench.echo", "data": {"value": 1}}
BURST = 500


@dataclass
class Row:
    name: str
    calls: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    connections: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    #: CPU seconds over the row's window of the watched processes, by name.
    watched: dict[str, float] = field(default_factory=dict)
    #: The commands Redis ran over the row's window, by name (every client's).
    commands: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    def per_call_us(self, seconds: float) -> float:
        return seconds / self.calls * 1e6 if self.calls else 0.0

    @property
    def cpu_per_call_us(self) -> float:
        """The calling process's CPU per call."""
        return self.per_call_us(self.cpu)

    def commands_per_call(self, *names: str) -> float:
        """The Redis commands ``names`` (all by default) per call."""
        counted = sum(count for name, count in self.commands.items()
                      if not names or name in names)
        return counted / self.calls if self.calls else 0.0

    def watched_per_call_us(self, *names: str) -> float:
        """The CPU per call of the watched processes ``names``, together."""
        return self.per_call_us(sum(self.watched.get(name, 0.0) for name in names))


@contextmanager
def accounted(row: Row, watched: dict[str, list[int]]) -> Iterator[None]:
    """Add to ``row`` the time the block took, this process's CPU in it, that of the
    ``watched`` processes (by name) and the commands Redis ran."""
    commands = redis_commands(BACKEND)
    before = os.times()
    watched_before = {what: cpu_seconds(*pids) for what, pids in watched.items()}
    started = time.perf_counter()
    try:
        yield
    finally:
        row.seconds += time.perf_counter() - started
        after = os.times()
        row.cpu += (after.user - before.user) + (after.system - before.system)
        for what, pids in watched.items():
            row.watched[what] = (row.watched.get(what, 0.0) + cpu_seconds(*pids)
                                 - watched_before[what])
        for name, count in redis_commands(BACKEND).items():
            if count > commands.get(name, 0) and name != "info":  # not the bench's own
                row.commands[name] = row.commands.get(name, 0) + count - commands.get(name, 0)


def measured(name: str, run: Callable[[Row, float], None], seconds: float,
             watched: dict[str, list[int]]) -> Row:
    """Run one step for ``seconds``; fill its row, with the CPU of the ``watched``
    processes (by name) over the same window."""
    row = Row(name)
    connections: list[int] = []
    with most_connections(connections, every=0.5), accounted(row, watched):
        run(row, time.perf_counter() + seconds)
    row.connections = max(connections)
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


def alternated_bursts(app: Any, sends: dict[str, Callable[[], Any]], seconds: float,
                      watched: dict[str, list[int]]) -> list[Row]:
    """Bursts of ``BURST`` sends, each waited for whole, with each of ``sends`` (by row)
    in turn, which goes first alternating, for ``seconds`` each: a drift in the
    machine's load hits them alike. Each row counts its own bursts' time and CPU."""
    rows = {name: Row(name) for name in sends}
    names = list(sends)
    connections: list[int] = []
    until = time.perf_counter() + seconds * len(sends)
    with most_connections(connections, every=0.5):
        while time.perf_counter() < until:
            for name in names:
                with accounted(rows[name], watched):
                    try:
                        send_and_wait(app, sends[name], BURST)
                        rows[name].calls += BURST
                    except Exception:
                        rows[name].errors += 1
            names.reverse()
    for row in rows.values():
        row.connections = max(connections)
    return list(rows.values())


def start_node(broker: str, backend: str) -> WorkerProcess:
    env = {"PYTHONPATH": str(ROOT), "WARMPOOL_BROKER_URL": broker,
           "WARMPOOL_RESULT_BACKEND": backend}
    # At Celery's own default log level: INFO would write two lines a task, whose cost
    # would count as the node's.
    worker = WorkerProcess("bench.callers_app", pool="threads", concurrency=16,
                           broker=broker, backend=backend, env=env, cwd=ROOT,
                           loglevel="WARNING")
    return worker.start(timeout=60)


STEPS: dict[str, tuple[str, int]] = {
    **{f"bare apply_async().get(), {n} thread{'s' * (n > 1)}": ("bare", n) for n in (1, 32, 256)},
    **{f"warm.call, {n} thread{'s' * (n > 1)}": ("call", n) for n in (1, 32, 256)},
    **{f"warm.acall, {n:,} in flight": ("acall", n) for n in (1, 32, 256, 1024)},
    "warm.map(concurrency=256), 1 thread": ("map", 256),
    f"bare .delay(), bursts of {BURST}": ("delay", BURST),
    f"warm.cast, bursts of {BURST}": ("cast", BURST),
}
#: The bursts run as one step, alternated.
BURSTS_STEP = f"bursts of {BURST}, alternated"
REDIS_STEPS = [*(name for name, (kind, _) in STEPS.items() if kind not in ("delay", "cast")),
               BURSTS_STEP]
STEPS[RABBITMQ_STEP] = ("acall", 1024)
BARE = {count: name for name, (kind, count) in STEPS.items() if kind == "bare"}


def baseline(name: str) -> str:
    """The bare row a row is compared with: bare's with as many callers (or the most
    bare has), the bursts of ``.delay()`` for bursts of casts."""
    kind, count = STEPS[name]
    if kind in ("delay", "cast"):
        return f"bare .delay(), bursts of {BURST}"
    return BARE[max(threads for threads in BARE if threads <= count)]


def step(name: str, seconds: float, watched: dict[str, list[int]]) -> list[Row]:
    """Run the step ``name`` in this process (a fresh one: its connections are its own);
    its rows (the bursts' step has two)."""
    from bench.callers_app import app, bare_echo, warm

    # One call first, outside the measure: the first connections are made then (only
    # the ones the step uses: the rows count them).
    kind = "bursts" if name == BURSTS_STEP else STEPS[name][0]
    if kind in ("bare", "bursts"):
        bare_echo.apply_async((1,)).get(timeout=10)
    if kind != "bare":
        warm.call("echo", SIGNAL, timeout=10)
    if kind == "bursts":
        return alternated_bursts(app, {
            f"bare .delay(), bursts of {BURST}": lambda: bare_echo.delay(1),
            f"warm.cast, bursts of {BURST}": lambda: warm.cast("echo", SIGNAL)},
            seconds, watched)
    count = STEPS[name][1]
    runs: dict[str, Callable[[], Callable[[Row, float], None]]] = {
        "bare": lambda: from_threads(count, lambda: bare_echo.apply_async((1,)).get(
            timeout=30)),
        "call": lambda: from_threads(count, lambda: warm.call("echo", SIGNAL, timeout=30)),
        "acall": lambda: in_flight(warm, count),
        "map": lambda: mapped(warm, count),
    }
    return [measured(name, runs[kind](), seconds, watched)]


def in_a_fresh_process(name: str, seconds: float, broker: str,
                       watched: dict[str, int]) -> list[Row]:
    """Run the step ``name`` in a process of its own; its rows."""
    env = {**os.environ, "WARMPOOL_BROKER_URL": broker, "WARMPOOL_RESULT_BACKEND": BACKEND}
    done = subprocess.run([sys.executable, __file__, "--step", name, "--seconds", str(seconds),
                           "--watch", json.dumps(watched)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        sys.exit(f"step {name!r} failed:\n{done.stderr[-5000:]}")
    return [Row(**data) for data in json.loads(done.stdout.strip().splitlines()[-1])]


def run_steps(seconds: float, rabbitmq: bool) -> dict[str, Row]:
    """Every step, on a node of its broker's; the rows by name."""
    rows: dict[str, Row] = {}
    plan = [(BROKER, REDIS_STEPS), *([(RABBITMQ, [RABBITMQ_STEP])] if rabbitmq else [])]
    for broker, names in plan:
        for url in (BROKER, BACKEND):
            redis.Redis.from_url(url).flushdb()
        node = start_node(broker, BACKEND)
        watched = {"node": node.pid, "Redis": redis_server_pid(BACKEND)}
        if broker == RABBITMQ and (beam := rabbitmq_pid()) is not None:
            watched["RabbitMQ"] = beam
        try:
            for name in names:
                for row in in_a_fresh_process(name, seconds, broker, watched):
                    rows[row.name] = row
                    print(f"  {row.name}: {row.rate:,.0f} calls/s", file=sys.stderr)
        finally:
            node.stop()
            node.remove_log()
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'':68}{'CPU per call, us':^27}")
    print(f"{'callers':<40} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'node':>8} {'Redis':>8} {'caller':>8} {'Redis conns':>12} {'errors':>7}")
    for row in rows:
        p50, p99 = row.percentile(0.5), row.percentile(0.99)
        print(f"{row.name:<40} {row.rate:>8,.0f} "
              f"{'-' if p50 is None else f'{p50:.1f}':>8} "
              f"{'-' if p99 is None else f'{p99:.1f}':>8} "
              f"{row.watched_per_call_us('node'):>8,.0f} "
              f"{row.watched_per_call_us('Redis'):>8,.0f} "
              f"{row.cpu_per_call_us:>8,.0f} {row.connections:>12} {row.errors:>7}")
    for row in rows:
        if "RabbitMQ" in row.watched:
            print(f"{row.name}: RabbitMQ's own CPU (beam.smp, every vhost's work) "
                  f"{row.watched_per_call_us('RabbitMQ'):,.0f} us per call")


def print_ratios(rows: dict[str, Row]) -> None:
    print(f"\n{'ratios to the bare row named':<40} {'bare row':<22} {'calls/s':>8} "
          f"{'node':>8} {'node+Redis':>11} {'caller':>8}")
    for name, row in rows.items():
        if STEPS[name][0] in ("bare", "delay"):
            continue
        bare = rows[baseline(name)]
        print(f"{name:<40} {short(bare.name):<22} {row.rate / bare.rate:>8.2f} "
              f"{ratio(row, bare, 'node'):>8.2f} {ratio(row, bare, 'node', 'Redis'):>11.2f} "
              f"{row.cpu_per_call_us / bare.cpu_per_call_us:>8.2f}")
    print("(CPU per call; the RabbitMQ row's Redis is its result store only)")


def print_commands(rows: dict[str, Row]) -> None:
    print("\nRedis commands per call (every client's, over the row's window), the most "
          "frequent")
    for name, row in rows.items():
        ranked = sorted(row.commands, key=lambda command: -row.commands[command])
        print(f"{name:<40} {row.commands_per_call():>5.1f}  " + ", ".join(
            f"{command} {row.commands_per_call(command):.2f}" for command in ranked[:12]))


def short(name: str) -> str:
    return name.replace("apply_async().get()", "get()").replace(f", bursts of {BURST}",
                                                                 " bursts")


def ratio(row: Row, bare: Row, *names: str) -> float:
    """``row``'s CPU per call of the watched processes ``names`` over ``bare``'s."""
    return row.watched_per_call_us(*names) / (bare.watched_per_call_us(*names) or 1)


def issue_targets(rows: dict[str, Row]) -> list[Check]:
    """The targets of a pool call costing no more than a bare task."""
    bare1 = rows["bare apply_async().get(), 1 thread"]
    best_bare = max(row.rate for name, row in rows.items() if STEPS[name][0] == "bare")
    pool_rows = [name for name in rows
                 if STEPS[name][0] in ("call", "acall", "map") and name != RABBITMQ_STEP]
    worst = max(pool_rows, key=lambda name: ratio(rows[name], rows[baseline(name)], "node",
                                                  "Redis"))
    checks: list[tuple[str, float, str, float]] = [
        *((f"node+Redis CPU/call / bare's: {short(name)}",
           ratio(rows[name], rows[baseline(name)], "node", "Redis"), "<= 1.0", -1.0)
          for name in ("warm.call, 1 thread", "warm.call, 32 threads",
                       "warm.acall, 1,024 in flight")),
        (f"  the worst pool row: {short(worst)}",
         ratio(rows[worst], rows[baseline(worst)], "node", "Redis"), "<= 1.0", -1.0),
        ("acall 1,024 / bare's best row, calls/s",
         rows["warm.acall, 1,024 in flight"].rate / best_bare, ">= 1.0", 1.0),
        ("caller CPU/call, call 1 thread / bare 1 thread",
         rows["warm.call, 1 thread"].cpu_per_call_us / bare1.cpu_per_call_us, "<= 0.5", -0.5),
        ("caller CPU/call, acall 1 / bare 1 thread",
         rows["warm.acall, 1 in flight"].cpu_per_call_us / bare1.cpu_per_call_us, "<= 0.5",
         -0.5),
        ("call 1 thread p50 / bare 1 thread p50",
         (rows["warm.call, 1 thread"].percentile(0.5) or 0) / (bare1.percentile(0.5) or 1),
         "<= 0.9", -0.9),
        ("cast bursts / bare .delay() bursts, calls/s",
         rows[f"warm.cast, bursts of {BURST}"].rate
         / rows[f"bare .delay(), bursts of {BURST}"].rate, ">= 1.0", 1.0),
    ]
    return [(name, value, target, value >= bound if bound > 0 else value <= -bound)
            for name, value, target, bound in checks]


def earlier_targets(rows: dict[str, Row]) -> list[Check]:
    """The targets the callers' side was first built to: scaling and connections."""
    bare1, bare256 = rows["bare apply_async().get(), 1 thread"], rows[
        "bare apply_async().get(), 256 threads"]
    acall1024, acall256 = rows["warm.acall, 1,024 in flight"], rows["warm.acall, 256 in flight"]
    call256 = rows["warm.call, 256 threads"]
    map256 = rows["warm.map(concurrency=256), 1 thread"]
    checks: list[tuple[str, float, str, float]] = [
        ("acall 1,024 / bare 256 threads, calls/s", acall1024.rate / bare256.rate, ">= 3", 3),
        ("acall 1,024 CPU per call / bare 1 thread",
         acall1024.cpu_per_call_us / bare1.cpu_per_call_us, "<= 0.3", -0.3),
        ("acall 1,024 Redis connections", acall1024.connections, "<= 8", -8),
        ("acall 256 p99 / bare 256 threads p99",
         (acall256.percentile(0.99) or 0) / (bare256.percentile(0.99) or 1), "<= 0.25", -0.25),
        ("call 256 threads / bare 256 threads, calls/s", call256.rate / bare256.rate, ">= 2", 2),
        ("call 256 threads Redis connections", call256.connections, "<= 16", -16),
        ("map 256 / bare 256 threads, calls/s", map256.rate / bare256.rate, ">= 3", 3),
    ]
    return [(name, value, target, value >= bound if bound > 0 else value <= -bound)
            for name, value, target, bound in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per step")
    parser.add_argument("--quick", action="store_true", help="1.5 s per step")
    parser.add_argument("--no-rabbitmq", action="store_true", help="skip the RabbitMQ row")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # one step, in this process
    parser.add_argument("--watch", help=argparse.SUPPRESS)  # its watched pids, as JSON
    options = parser.parse_args()
    seconds = 1.5 if options.quick else options.seconds
    if options.step:
        watched = {what: with_children(pid) if what == "node" else [pid]
                   for what, pid in json.loads(options.watch).items()}
        print(json.dumps([vars(row) for row in step(options.step, seconds, watched)]))
        return
    rows = run_steps(seconds, not options.no_rabbitmq)
    print(f"\none threads node (-c 16, a pool of 8 agents), each row's callers in a process "
          f"of their own, {seconds:g} s per step; Redis unless said\n")
    print_table(list(rows.values()))
    print_ratios(rows)
    print_commands(rows)
    print("\ntargets: a pool call costs no more than a bare task")
    print_targets(issue_targets(rows), width=58)
    print("\nearlier targets: the callers scale, their connections stay few")
    print_targets(earlier_targets(rows), width=58)
    if options.json:
        options.json.write_text(json.dumps({name: {
            "rate": row.rate, "p50_ms": row.percentile(0.5), "p99_ms": row.percentile(0.99),
            "cpu_per_call_us": row.cpu_per_call_us,
            **{f"{what.lower()}_cpu_per_call_us": row.watched_per_call_us(what)
               for what in row.watched},
            "redis_commands_per_call": {command: row.commands_per_call(command)
                                        for command in row.commands},
            "connections": row.connections, "errors": row.errors}
            for name, row in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
