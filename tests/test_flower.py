"""Pool status in a real Flower: its ``/api/workers`` and its worker page in Chromium."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_warmpool import ActionFailed
from celery_warmpool.ops.processes import WorkerProcess
from tests.flower_page import FlowerProcess, browse, chromium, pool_rows_on_page

pytestmark = pytest.mark.integration

INCREMENT = {"type": "counter.increment", "data": {"by": 1}}
FAIL = {"type": "counter.fail"}
SPECS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2},
    {"name": "tally", "agent": "tests.integration_app:CounterAgent", "size": 2,
     "max_overflow": 1},
]


@pytest.fixture
def flower() -> Iterator[Callable[[WorkerProcess], FlowerProcess]]:
    """Start Flower on the broker of a given worker; stop it after the test."""
    started: list[FlowerProcess] = []

    def start(worker: WorkerProcess) -> FlowerProcess:
        process = FlowerProcess("tests.integration_app", worker.env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def make_calls(warm: Any) -> None:
    for _ in range(3):
        warm.call("counter", INCREMENT)
    with pytest.raises(ActionFailed, match="asked to fail"):
        warm.call("tally", FAIL)


def numbers(pool: dict[str, Any]) -> dict[str, Any]:
    """What an operator reads off a pool's stats."""
    return {name: pool[name] for name in (
        "state", "size", "max_overflow", "available", "checked_out", "overflow", "waiting",
        "processes", "execution_pool")}


def called(stats: dict[str, Any]) -> bool:
    return (stats.get("counter", {}).get("counters", {}).get("calls") == 3
            and stats.get("tally", {}).get("counters", {}).get("calls") == 1)


@pytest.mark.parametrize("execution,concurrency,tally_overflow,processes", [
    ("threads", 4, 1, 1),
    ("prefork", 2, 0, 2),  # a prefork child holds one agent per pool and no overflow
])
def test_flower_api_shows_each_pools_numbers(start_worker, client, flower, execution,
                                             concurrency, tally_overflow, processes):
    worker = start_worker(SPECS, pool=execution, concurrency=concurrency)
    _, warm = client(SPECS)
    make_calls(warm)

    stats = flower(worker).warmpool_stats(worker.hostname, until=called)

    assert sorted(stats) == ["counter", "tally"]
    idle = {"state": "ready", "size": 2, "available": 2, "checked_out": 0, "overflow": 0,
            "waiting": 0, "processes": processes, "execution_pool": execution}
    assert numbers(stats["counter"]) == {**idle, "max_overflow": 0}
    assert numbers(stats["tally"]) == {**idle, "max_overflow": tally_overflow}
    counter, tally = stats["counter"]["counters"], stats["tally"]["counters"]
    assert (counter["checkouts"], counter["checkins"], counter["calls"],
            counter["call_failures"]) == (3, 3, 3, 0)
    assert (tally["checkouts"], tally["checkins"], tally["calls"],
            tally["call_failures"]) == (1, 1, 1, 1)


def test_flower_worker_page_shows_a_line_per_pool(start_worker, client, flower):
    assert chromium() is not None, "chromium is missing: ./scripts/test installs it"
    worker = start_worker(SPECS, pool="threads", concurrency=4)
    _, warm = client(SPECS)
    make_calls(warm)
    process = flower(worker)
    api = process.warmpool_stats(worker.hostname, until=called)

    dom = browse(f"{process.url}/worker/{worker.hostname}")

    assert f">{worker.hostname}<" in dom
    rows = pool_rows_on_page(dom)
    assert rows == {
        "counter": "ready: 2 of 2 available, 0 checked out, 0 waiting, 0 overflow | "
                   "3 checkouts, 0 timeouts, 0 replacements, 0 failures | threads, 1 process",
        "tally": "ready: 2 of 2 available, 0 checked out, 0 waiting, 0 overflow | "
                 "1 checkouts, 0 timeouts, 0 replacements, 0 failures | threads, 1 process",
    }
    # The same numbers as the API, which keeps them as data.
    assert api["counter"]["counters"]["checkouts"] == 3
    assert api["tally"]["max_overflow"] == 1
