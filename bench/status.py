"""Status over many nodes: membership against the timeout-bound broadcast, in one run.

    python bench/status.py            # about two minutes
    python bench/status.py --quick

Starts 20 solo worker nodes on the local Redis (databases 12 and 13), each hosting the
pool ``bench`` with one agent, and measures with 5, 10 and then 20 of them running:

- ``warm.status("bench")``: the live nodes are read from their membership records and
  asked by name, and the wait ends when each has answered;
- the broadcast ``warm.status`` made before membership: ask whoever listens and wait out
  the timeout (1 s), which is still what a result backend without records gets;
- at 20 nodes, ``celery warmpool status`` as an operator types it (a new interpreter
  each time).

Every answer must hold every node. Then, from the measured size of one reply as the
Redis transport stores it and the measured cost of each further node, what 50 and 500
nodes would cost, on paper.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BROKER = "redis://127.0.0.1:6379/12"
BACKEND = "redis://127.0.0.1:6379/13"
os.environ["WARMPOOL_BROKER_URL"], os.environ["WARMPOOL_RESULT_BACKEND"] = BROKER, BACKEND

from bench.status_app import app, warm  # noqa: E402
from celery_warmpool.core.status import PoolStatus  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

#: Target: the median status read over 20 nodes, every node answering.
STATUS_P50_TARGET_MS = 100.0
STEPS = (5, 10, 20)
POOL = "bench"


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def start_nodes(count: int) -> list[WorkerProcess]:
    """Launch ``count`` solo nodes at once, then wait until each is ready."""
    nodes = [WorkerProcess("bench.status_app", pool="solo", concurrency=1, broker=BROKER,
                           backend=BACKEND, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
             for _ in range(count)]
    for node in nodes:
        node.launch()
    for node in nodes:
        if not node.wait_until_ready(120):
            raise RuntimeError(f"node {node.hostname} did not start:\n{node.log_tail()}")
    return nodes


def wait_for_members(count: int) -> None:
    deadline = time.monotonic() + 30
    while len(warm.nodes(POOL)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} nodes recorded after 30 s")
        time.sleep(0.1)


def membership_reads(count: int, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        seconds, status = timed(lambda: warm.status(POOL, timeout=2.0))
        if len(status.nodes) != count or status.not_answering:
            raise RuntimeError(f"status held {len(status.nodes)} of {count} nodes "
                               f"(not answering: {status.not_answering})")
        samples.append(seconds)
    return samples


def broadcast_reads(count: int, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        seconds, replies = timed(lambda: app.control.broadcast(
            "warmpool_status", arguments={"pool": POOL}, reply=True, timeout=1.0))
        if len(replies) != count:
            raise RuntimeError(f"the broadcast heard {len(replies)} of {count} nodes")
        samples.append(seconds)
    return samples


def cli_reads(rounds: int) -> list[float]:
    command = [sys.executable, "-m", "celery", "-A", "bench.status_app", "warmpool",
               "status", "--pool", POOL]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    samples = []
    for _ in range(rounds):
        seconds, done = timed(lambda: subprocess.run(
            command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=60))
        if done.returncode != 0:
            raise RuntimeError(f"celery warmpool status failed:\n{done.stdout}{done.stderr}")
        samples.append(seconds)
    return samples


def reply_bytes() -> tuple[int, bytes]:
    """One node's status reply: its JSON size, and the message the Redis transport stores."""
    replies = app.control.broadcast("warmpool_status", arguments={"pool": POOL}, reply=True,
                                    timeout=1.0, limit=1)
    answer = (replies or [{}])[0]
    body = len(json.dumps(answer).encode())
    queue = f"bench-status-size-{os.getpid()}"
    with app.connection_for_write() as connection:
        producer = connection.Producer(serializer="json")
        producer.publish(answer, routing_key=queue, declare=[connection.SimpleQueue(
            queue).queue], exchange="")
    client = redis.Redis.from_url(BROKER)
    raw = client.lindex(queue, 0) or b""
    stored = raw.encode() if isinstance(raw, str) else raw
    client.delete(queue)
    return body, stored


def caller_cost(stored: bytes, rounds: int = 2000) -> float:
    """Seconds of the caller's CPU to decode and validate one stored reply."""
    started = time.process_time()
    for _ in range(rounds):
        envelope = json.loads(stored)
        answer = json.loads(base64.b64decode(envelope["body"]))
        for data in next(iter(answer.values())).values():
            PoolStatus.model_validate(data)
    return (time.process_time() - started) / rounds


def record_bytes() -> int:
    key = warm.status_reader.membership.key
    client = redis.Redis.from_url(BACKEND)
    records = client.hvals(f"{key}:records")
    return max((len(record) for record in records), default=0)


def print_table(results: dict[int, dict[str, list[float]]]) -> None:
    print(f"{'nodes':>5}  {'read':<34}{'p50 ms':>9}{'max ms':>9}{'p50 / broadcast':>17}")
    for count, rows in results.items():
        base = statistics.median(rows["broadcast, waits out 1 s timeout"])
        for name, samples in rows.items():
            p50 = statistics.median(samples)
            print(f"{count:>5}  {name:<34}{p50 * 1e3:>9.1f}{max(samples) * 1e3:>9.1f}"
                  f"{p50 / base:>17.3f}")


def print_paper(results: dict[int, dict[str, list[float]]], body: int, stored: bytes,
                record: int, heartbeat: float) -> None:
    first, last = STEPS[0], STEPS[-1]
    name = "warm.status (membership)"
    per_node = (statistics.median(results[last][name])
                - statistics.median(results[first][name])) / (last - first)
    base = statistics.median(results[last][name]) - per_node * last
    decode = caller_cost(stored)
    few = statistics.median(results[first][name])
    print(f"\none reply: {body} bytes of JSON, {len(stored)} bytes as the Redis transport "
          f"stores it; one membership record: {record} bytes")
    print(f"each further node adds {per_node * 1e3:.2f} ms to a read here (fit over "
          f"{first} to {last} nodes, all on this machine's cores); the caller's own CPU "
          f"per reply is {decode * 1e6:.0f} us")
    print(f"read ms: 'here' extrapolates the fit; 'apart' is for nodes on machines of "
          f"their own: the {first}-node read plus the caller's work per further reply\n")
    print(f"{'nodes':>5}{'read ms here':>14}{'read ms apart':>15}{'KiB/read':>10}"
          f"{'replies/s at 1 read/s':>23}{'heartbeat writes/s':>20}")
    for count in (20, 50, 500):
        print(f"{count:>5}{(base + per_node * count) * 1e3:>14.0f}"
              f"{(few + decode * (count - first)) * 1e3:>15.0f}{count * len(stored) / 1024:>10.1f}"
              f"{count:>23}{count / heartbeat:>20.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    options = parser.parse_args()
    rounds, slow_rounds, cli_rounds = (9, 2, 2) if options.quick else (31, 5, 5)

    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    nodes: list[WorkerProcess] = []
    results: dict[int, dict[str, list[float]]] = {}
    try:
        for count in STEPS:
            nodes += start_nodes(count - len(nodes))
            wait_for_members(count)
            membership_reads(count, 3)  # connections and the reply queue, once
            results[count] = {
                "warm.status (membership)": membership_reads(count, rounds),
                "broadcast, waits out 1 s timeout": broadcast_reads(count, slow_rounds),
            }
        results[STEPS[-1]]["celery warmpool status (CLI)"] = cli_reads(cli_rounds)
        body, stored = reply_bytes()
        record = record_bytes()
    finally:
        for node in nodes:
            node.stop()

    print(f"solo nodes on local Redis, one pool each; {rounds} membership reads, "
          f"{slow_rounds} broadcasts per step\n")
    print_table(results)
    print_paper(results, body, stored, record, warm.status_reader.membership.heartbeat)
    p50 = statistics.median(results[STEPS[-1]]["warm.status (membership)"]) * 1e3
    print(f"\ntarget warm.status p50 <= {STATUS_P50_TARGET_MS:.0f} ms at {STEPS[-1]} nodes, "
          f"every node answering: {p50:.1f} ms "
          f"{'PASS' if p50 <= STATUS_P50_TARGET_MS else 'MISS'}")


if __name__ == "__main__":
    main()
