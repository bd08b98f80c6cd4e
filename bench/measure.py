"""What the benchmarks read off running processes, and how they print their targets.

The servers the benchmarks use are the local ones unless the environment says otherwise,
so that runs beside other work on the machine can use servers of their own:

- ``WARMPOOL_BENCH_REDIS``: the Redis server, without a database
  (``redis://127.0.0.1:6379``); each benchmark keeps its own databases on it;
- ``WARMPOOL_BENCH_RABBITMQ``: the RabbitMQ broker (``amqp://guest:guest@127.0.0.1:5672//``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis

REDIS = os.environ.get("WARMPOOL_BENCH_REDIS", "redis://127.0.0.1:6379").rstrip("/")
RABBITMQ = os.environ.get("WARMPOOL_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_PORT = urlsplit(REDIS).port or 6379
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: One target: what is measured, its value, the target as shown, whether it is met.
Check = tuple[str, float | int, str, bool]


def redis_url(database: int) -> str:
    """The URL of ``database`` on the benchmarks' Redis server."""
    return f"{REDIS}/{database}"


def cpu_seconds(*pids: int) -> float:
    """User and system CPU time so far of processes ``pids`` (their threads included)."""
    ticks = 0
    for pid in pids:
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """User and system CPU time so far of each thread of process ``pid``, by thread id."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        found[int(task.name)] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    return found


def with_children(pid: int) -> list[int]:
    """Process ``pid`` and its live children (a node's main process and its pool's)."""
    from celery_warmpool.ops.processes import child_pids

    return [pid, *child_pids(pid)]


def redis_server_pid(url: str) -> int:
    """The pid of the redis-server answering at ``url`` (the one on its host and port)."""
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def redis_commands(url: str) -> dict[str, int]:
    """The commands the Redis server at ``url`` has run so far, by name (``INFO
    commandstats``), read on a connection closed at once (so that no process's count of
    connections shows it)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
        client.connection_pool.disconnect()
    return {name.removeprefix("cmdstat_"): int(counts["calls"])
            for name, counts in stats.items()}


def rabbitmq_pid() -> int | None:
    """The pid of the local RabbitMQ's Erlang VM (``beam.smp``), if there is one."""
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "beam.smp":
            return int(process.pid)
    return None


def redis_connections(pid: int | None = None) -> int:
    """TCP connections of process ``pid`` (this one by default) to the Redis port."""
    return sum(1 for connection in psutil.Process(pid).net_connections(kind="tcp")
               if connection.raddr and connection.raddr.port == REDIS_PORT)


@contextmanager
def most_connections(found: list[int], pid: int | None = None,
                     every: float = 0.05) -> Iterator[None]:
    """Sample the Redis connections of process ``pid`` (this one by default) into
    ``found`` every ``every`` seconds while the block runs, and once more at its end."""
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            found.append(redis_connections(pid))
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        running.clear()
        sampler.join()
        found.append(redis_connections(pid))


def send_and_wait(app: Any, send: Callable[[], Any], count: int) -> None:
    """A burst: ``count`` messages sent with ``send`` (each returning its
    ``AsyncResult``), then every result waited for."""
    from celery.result import ResultSet

    ResultSet([send() for _ in range(count)], app=app).join_native(timeout=60, propagate=True)


def print_targets(checks: list[Check], *, indent: str = "  ", width: int = 40,
                  digits: int = 2) -> None:
    """One line per target: its value (floats to ``digits`` places), the target, PASS or
    MISS."""
    for name, value, target, met in checks:
        shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        print(f"{indent}{name:{width}}{shown:>8}  {target:8}  {'PASS' if met else 'MISS'}")
