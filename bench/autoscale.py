"""Autoscaling on the backlog against scaling on the broker's list length, on real nodes.

    python bench/autoscale.py                 # about four minutes
    python bench/autoscale.py --redis redis://127.0.0.1:6391 --seconds 40

A local stand-in for KEDA: worker processes are the replicas, a controller the
autoscaler. Each node is a threads worker hosting one pool of 2 agents whose calls take
0.1 s (20 calls a second a node, once warm: its agents take 1 s to warm up), bounded at
``max_queued=400``; it serves its metrics. At t=0 the load steps from nothing to 200
casts a second (ten times one node's capacity, open loop) for ``--seconds``.

Every 2 s the controller reads its metric and asks for desired = ceil(metric / (2 calls
per agent x 2 agents a node)) nodes, within 1 and 12 (KEDA's formula for a Prometheus or
a Redis trigger with a threshold of 4). It starts nodes at once (at most 4 at a time), and
stops one only after the desired count stayed lower for 10 s, and only once that node
drained (``warmpool_drain``, then its calls end: as a ``preStop`` hook would). The run is
made twice, each with a fresh set of nodes:

- **backlog**: the metric is ``warmpool_pool_backlog`` scraped from a node's ``/metrics``
  (queued + reserved + running, every node);
- **list length**: the metric is the queue's list length in Redis (what KEDA's Redis
  trigger, ``listLength``, reads): it does not see what the nodes took.

Each run tells: when the backlog first got back under its target (2 calls per warm agent,
within the HPA's 10% tolerance, since KEDA's formula settles on the target itself), and
when it got under it for good (it stayed there for the rest of the load, at least 5 s);
the nodes it used; the backlog over its target in the last 20 s; the casts refused
(``PoolBusy``), lost (admitted, never run: must be 0), and the nodes stopped while they
still had calls (must be 0). Target (issue 23): the backlog run under its target for good
at least 1.5 times sooner than the list-length run (one that never gets there counts as
the whole load, so the ratio is then a lower bound).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import Check, print_targets  # noqa: E402
from celery_warmpool import PoolBusy  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402
from celery_warmpool.wire.backlog import BacklogBoard, totals  # noqa: E402

POOL = "bounded"
AGENTS = 2
CALL_SECONDS = 0.1
NODE_SERVES = AGENTS / CALL_SECONDS
LOAD = 10 * NODE_SERVES
TARGET_PER_AGENT = 2
THRESHOLD = TARGET_PER_AGENT * AGENTS
MIN_NODES, MAX_NODES = 1, 12
POLL = 2.0
STABILIZE = 10.0
MOST_AT_ONCE = 4
BOUND = 400
WARM_UP = 1.0
SOONER_TARGET = 1.5
TOLERANCE = 1.1
WORK = {"type": "bench.work", "data": {"seconds": CALL_SECONDS}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    process: WorkerProcess
    metrics: str
    started_at: float
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False


@dataclass
class Run:
    mode: str
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    refused: int = 0
    lost: int = 0
    busy_stopped: int = 0
    most_nodes: int = 0
    settled: float | None = None
    first: float | None = None


class Fleet:
    """The nodes of one run: started and drained by the controller."""

    def __init__(self, env: dict[str, str], broker: str, backend: str, warm: Any) -> None:
        self.env, self.broker, self.backend, self.warm = env, broker, backend, warm
        self.nodes: list[Node] = []
        self.lock = threading.Lock()
        self.busy_stopped = 0

    def live(self) -> list[Node]:
        with self.lock:
            return [node for node in self.nodes if not node.stopping]

    def start(self) -> Node:
        port = free_port()
        process = WorkerProcess(
            "bench.overload_app", pool="threads", concurrency=AGENTS * 2, broker=self.broker,
            backend=self.backend, cwd=ROOT, loglevel="WARNING",
            args=("--warmpool-pools", POOL),
            env={**self.env, "WARMPOOL_METRICS_ADDRESS": f"127.0.0.1:{port}"})
        node = Node(process, f"http://127.0.0.1:{port}/metrics", time.monotonic())
        with self.lock:
            self.nodes.append(node)
        process.launch()

        def wait() -> None:
            if process.wait_until_ready(90):
                node.ready.set()

        threading.Thread(target=wait, daemon=True).start()
        return node

    def drain_and_stop(self, node: Node) -> None:
        """As a preStop hook: drain the pool on the node, wait until it holds nothing,
        then stop it."""
        node.stopping = True
        name = node.process.hostname
        reader = self.warm.status_reader
        reader.command("warmpool_drain", {"pool": POOL, "resume": False}, 5.0, [name])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = reader.collect(POOL, timeout=2.0, destination=[name]).get(POOL, [])
            held = sum(status.reservations.get(name, (0, 0))[0] + status.checked_out
                       for status in statuses)
            if statuses and held == 0:
                break
            time.sleep(0.2)
        else:
            self.busy_stopped += 1
        node.process.stop()

    def stop_all(self) -> None:
        for node in list(self.nodes):
            if node.process.process is not None and not node.process.exited():
                node.process.stop()


def scraped_backlog(fleet: Fleet) -> int | None:
    """``warmpool_pool_backlog`` of the pool, from the first ready node's ``/metrics``."""
    for node in fleet.live():
        if not node.ready.is_set():
            continue
        try:
            with urllib.request.urlopen(node.metrics, timeout=2) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith("warmpool_pool_backlog{") and f'pool="{POOL}"' in line:
                        return int(float(line.rsplit(" ", 1)[1]))
        except OSError:
            continue
    return None


def control(fleet: Fleet, metric: Callable[[], int | None], stop: threading.Event) -> None:
    """Scale the fleet every POLL seconds by KEDA's formula on ``metric``."""
    lower_since: float | None = None
    while not stop.wait(POLL):
        value = metric()
        if value is None:
            continue
        desired = min(MAX_NODES, max(MIN_NODES, math.ceil(value / THRESHOLD)))
        live = fleet.live()
        if desired > len(live):
            lower_since = None
            for _ in range(min(desired - len(live), MOST_AT_ONCE)):
                fleet.start()
        elif desired < len(live):
            now = time.monotonic()
            lower_since = lower_since or now
            if now - lower_since >= STABILIZE:
                lower_since = now  # one node per stabilization window
                threading.Thread(target=fleet.drain_and_stop, args=(live[-1],),
                                 daemon=True).start()
        else:
            lower_since = None


def load(warm: Any, run: Run, seconds: float, stop: threading.Event) -> None:
    """Casts at LOAD a second, open loop, for ``seconds``."""
    begun = time.perf_counter()
    for index in range(int(LOAD * seconds)):
        delay = begun + index / LOAD - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            run.admitted.append(warm.cast(POOL, WORK).id)
        except PoolBusy:
            run.refused += 1
    stop.set()


def one_run(mode: str, seconds: float, env: dict[str, str], app: Any, warm: Any) -> Run:
    broker, backend = env["WARMPOOL_BROKER_URL"], env["WARMPOOL_RESULT_BACKEND"]
    for url in (broker, backend):
        redis.Redis.from_url(url).flushdb()  # each run from an empty broker and store
    queue = warm.spec(POOL).queue
    fleet = Fleet(env, broker, backend, warm)
    run = Run(mode)
    first = fleet.start()
    first.ready.wait(90)
    board = BacklogBoard.of(app)
    assert board is not None
    lists = redis.Redis.from_url(broker)

    def list_length() -> int:
        return int(lists.llen(queue))

    metric = (lambda: scraped_backlog(fleet)) if mode == "backlog" else list_length
    stop, finished = threading.Event(), threading.Event()
    controller = threading.Thread(target=control, args=(fleet, metric, finished),
                                  daemon=True)
    loader = threading.Thread(target=load, args=(warm, run, seconds, stop), daemon=True)
    started = time.monotonic()
    controller.start()
    loader.start()
    while not stop.is_set():
        loads = totals(board.read(queue))
        backlog = list_length() + loads.reserved + loads.running
        run.samples.append((time.monotonic() - started, backlog, loads.capacity,
                            len(fleet.live())))
        run.most_nodes = max(run.most_nodes, len(fleet.live()))
        time.sleep(0.5)
    finished.set()
    controller.join(10)
    run.settled = settled_at(run.samples, seconds)
    run.first = first_under(run.samples)
    run.lost = lost(app, run.admitted)
    run.busy_stopped = fleet.busy_stopped
    fleet.stop_all()
    board.close()
    return run


def under_target(backlog: int, capacity: int) -> bool:
    """Whether the backlog is at most its target (2 calls per warm agent), within the
    HPA's own tolerance (10%: the formula's equilibrium sits on the target itself)."""
    return capacity > 0 and backlog <= TOLERANCE * TARGET_PER_AGENT * capacity


def first_under(samples: list[tuple[float, int, int, int]]) -> float | None:
    """When the backlog first got back under its target after the step."""
    peaked = False
    for at, backlog, capacity, _ in samples:
        peaked = peaked or not under_target(backlog, capacity)
        if peaked and under_target(backlog, capacity):
            return at
    return None


def settled_at(samples: list[tuple[float, int, int, int]], seconds: float) -> float | None:
    """When the backlog got back under its target and stayed there until the load ended
    (and at least 5 s), or ``None``."""
    under = [(at, under_target(backlog, capacity)) for at, backlog, capacity, _ in samples]
    for index, (at, ok) in enumerate(under):
        if ok and all(later for _, later in under[index:]) and seconds - at >= 5:
            return at
    return None


def lost(app: Any, admitted: list[str], within: float = 120.0) -> int:
    """Admitted casts with no stored result once the queue has had ``within`` s to drain."""
    client = app.backend.client
    keys = [app.backend.get_key_for_task(task_id) for task_id in admitted]
    deadline = time.monotonic() + within
    missing = len(keys)
    while time.monotonic() < deadline:
        missing = sum(1 for start in range(0, len(keys), 1000)
                      for found in client.mget(keys[start:start + 1000]) if found is None)
        if missing == 0:
            break
        time.sleep(1.0)
    return missing


def report(runs: dict[str, Run], seconds: float) -> list[Check]:
    print(f"nodes of {AGENTS} agents at {CALL_SECONDS:g} s a call ({NODE_SERVES:.0f} calls/s "
          f"each, {WARM_UP:g} s to warm); a step to {LOAD:.0f} casts/s for {seconds:g} s; "
          f"KEDA's formula, threshold {THRESHOLD}, nodes {MIN_NODES} to {MAX_NODES}; "
          f"max_queued={BOUND}\n")
    print(f"{'scaled on':<13}{'first under':>12}{'under for good':>15}{'nodes':>7}"
          f"{'admitted':>10}{'refused':>9}{'lost':>6}{'busy stopped':>14}"
          f"{'backlog / target, last 20 s':>29}")
    for run in runs.values():
        tail = [backlog / (TARGET_PER_AGENT * capacity)
                for at, backlog, capacity, _ in run.samples if at >= seconds - 20 and capacity]
        print(f"{run.mode:<13}{_when(run.first):>12}{_when(run.settled):>15}"
              f"{run.most_nodes:>7}{len(run.admitted):>10}{run.refused:>9}{run.lost:>6}"
              f"{run.busy_stopped:>14}{statistics.median(tail) if tail else 0:>29.2f}")
    print("\nthe backlog and nodes every 5 s (backlog / nodes):")
    for run in runs.values():
        points = [f"{backlog}/{nodes}" for at, backlog, _, nodes in run.samples
                  if int(at * 2) % 10 == 0]
        print(f"  {run.mode:<12} {' '.join(points)}")
    backlog, listed = runs["backlog"], runs["list length"]
    if backlog.first and listed.first:
        print(f"\nfirst under target, list length / backlog: "
              f"{listed.first / backlog.first:.2f}")
    # Under target for good: a run that never got there counts as never (infinitely
    # later), shown as such rather than as a ratio to the load's length.
    if backlog.settled is None:
        ratio, shown = 0.0, "backlog: never"
    elif listed.settled is None:
        ratio, shown = math.inf, "list: never"
    else:
        ratio, shown = listed.settled / backlog.settled, ""
    print()
    return [
        ("under target for good, list / backlog", ratio,
         f">= {SOONER_TARGET}" + (f" ({shown})" if shown else ""), ratio >= SOONER_TARGET),
        ("casts lost, both runs", backlog.lost + listed.lost, "0",
         backlog.lost + listed.lost == 0),
        ("busy nodes stopped, both runs", backlog.busy_stopped + listed.busy_stopped, "0",
         backlog.busy_stopped + listed.busy_stopped == 0),
    ]


def _when(at: float | None) -> str:
    return "never" if at is None else f"{at:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="the Redis server of the broker and result store "
                             "(databases 14 and 15)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    options = parser.parse_args()
    env = {"WARMPOOL_BROKER_URL": f"{options.redis}/14",
           "WARMPOOL_RESULT_BACKEND": f"{options.redis}/15",
           "OVERLOAD_RUN": uuid.uuid4().hex[:8], "OVERLOAD_MAX_QUEUED": str(BOUND),
           "OVERLOAD_SIZE": str(AGENTS), "OVERLOAD_SETUP": str(WARM_UP),
           "PYTHONPATH": str(ROOT)}
    os.environ.update(env)
    from bench.overload_app import app, warm

    runs = {mode: one_run(mode, options.seconds, env, app, warm)
            for mode in ("backlog", "list length")}
    checks = report(runs, options.seconds)
    print_targets(checks, width=40)


if __name__ == "__main__":
    main()
