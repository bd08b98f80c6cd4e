"""``celery -A proj warmpool status``: the real command against real workers on Redis."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_warmpool.core.status import PoolCounters, PoolStatus
from celery_warmpool.ops.processes import WorkerProcess
from celery_warmpool.ops.tables import render_status_json, render_status_table
from tests.conftest import REDIS_BACKEND, REDIS_BROKER, ROOT

INCREMENT = {"type": "counter.increment", "data": {"by": 1}}
# Queues of their own, so a worker here takes no other test's messages on a shared Redis.
TWO_POOLS = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 2,
     "queue": "warmpool.cli.counter"},
    {"name": "ledger", "agent": "tests.integration_app:CounterAgent", "size": 2,
     "queue": "warmpool.cli.ledger"},
]
CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WARMPOOL_BROKER_URL": REDIS_BROKER,
           "WARMPOOL_RESULT_BACKEND": REDIS_BACKEND,
           "WARMPOOL_TEST_SPECS": json.dumps(TWO_POOLS)}


def celery(*args: str, app: str = "tests.integration_app",
           cwd: Any = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the real ``celery`` command line."""
    command = [sys.executable, "-m", "celery", *(["-A", app] if app else []), *args]
    return subprocess.run(command, capture_output=True, text=True, env=CLI_ENV, cwd=cwd,
                          timeout=60)


def table_rows(output: str) -> dict[str, list[str]]:
    """The rows of a status table by their first cell (node name or ``process N``)."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if not cells or cells[0] in ("pool", "node"):
            continue
        if cells[0] == "process":
            rows[f"process {cells[1]}"] = [" ".join(cells[:4]), *cells[4:]]
        else:
            rows[cells[0]] = cells
    return rows


def calls_counted(warm: Any, node: str, pool: str, calls: int) -> None:
    """Wait until ``node``'s prefork children have published ``calls`` (a few times a second)."""

    def counted() -> int:
        parts = warm.status_reader.collect(pool, destination=[node]).get(pool, [])
        return PoolStatus.combine(pool, parts).counters.calls

    deadline = time.monotonic() + 5
    while counted() != calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == calls


#: ``celery`` with Ctrl-C handled as in a terminal: a test run started in the background
#: by a shell without job control ignores SIGINT, and its children would inherit that.
WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('celery', run_name='__main__', alter_sys=True)")


@contextlib.contextmanager
def watching(*args: str, env: dict[str, str] = CLI_ENV) -> Iterator[Any]:
    """``celery ... warmpool status ARGS`` running (for --watch); killed after if still up."""
    watcher = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-c", WITH_CTRL_C, "-A", "tests.integration_app",
         "warmpool", "status", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=ROOT)
    try:
        yield watcher
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def interrupt(watcher: Any) -> tuple[str, str]:
    """Press Ctrl-C: the watcher's remaining output and its errors once it has exited."""
    watcher.send_signal(signal.SIGINT)
    try:
        rest, errors = watcher.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        watcher.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is
        _, errors = watcher.communicate(timeout=10)
        pytest.fail(f"the watcher did not stop on Ctrl-C within 30s:\n{errors}")
    return rest, errors


def leaf(node: str, pid: int, index: int | None, **numbers: Any) -> PoolStatus:
    values = {"pool": "search", "state": "ready", "size": 1, "max_overflow": 0,
              "available": 1, "overflow": 0, "checked_out": 0, "waiting": 0, "node": node,
              "pid": pid, "process_index": index, **numbers}
    return PoolStatus(**values)


def test_celery_help_lists_the_warmpool_command():
    result = celery("--help", app="")
    assert result.returncode == 0
    assert "warmpool  Warm agent pools: status, resize, drain, dead letters." in result.stdout
    assert celery("warmpool", "status", "--help", app="").returncode == 0


def test_table_has_a_row_per_node_and_per_prefork_process_and_a_total():
    prefork = PoolStatus.combine("search", [
        leaf("a@host", 101, 0, counters=PoolCounters(checkouts=5)),
        leaf("a@host", 102, 1, state="full", available=0, checked_out=1,
             counters=PoolCounters(checkouts=7, timeouts=1)),
    ], node="a@host").model_copy(update={"reservations": {"a@host": (1, 4)}})
    threads = leaf("b@host", 201, None, state="full", size=4, max_overflow=2, available=0,
                   checked_out=5, overflow=1, waiting=2, last_error="ConnectionError: refused",
                   counters=PoolCounters(checkouts=30, replacements=2, failures=1),
                   reservations={"b@host": (7, 12)})
    assert render_status_table({"search": [prefork, threads]}) == (
        "pool search: ready, 1 of 7 agents available, 2 nodes\n"
        "  backlog 0: ? queued, 0 reserved, 0 running; capacity 0, draining 0.0 calls/s\n"
        "  node / process         state  size  available  checked out  overflow  waiting"
        "  held / window  checkouts  timeouts  replacements  failures\n"
        "  a@host                 ready     2          1            1         0        0"
        "            1/4         12         1             0         0\n"
        "    process 0 (pid 101)  ready     1          1            0         0        0"
        "                         5         0             0         0\n"
        "    process 1 (pid 102)  full      1          0            1         0        0"
        "                         7         1             0         0\n"
        "  b@host                 full      4          0            5         1        2"
        "           7/12         30         0             2         1\n"
        "  total                  ready     6          1            6         1        2"
        "           8/16         42         1             2         1\n"
        "  last error (b@host, pid 201): ConnectionError: refused\n")


def test_json_has_totals_then_nodes_with_their_processes():
    prefork = PoolStatus.combine("search", [leaf("a@host", 101, 0), leaf("a@host", 102, 1)],
                                 node="a@host")
    document = render_status_json({"search": [prefork]})
    assert list(document) == ["search"]
    search = document["search"]
    assert (search["size"], search["available"], search["state"]) == (2, 2, "ready")
    assert "processes" not in search and "pid" not in search
    node = search["nodes"]["a@host"]
    assert node["size"] == 2
    assert [(process["pid"], process["process_index"]) for process in node["processes"]] == [
        (101, 0), (102, 1)]


@pytest.mark.integration
def test_status_prints_each_pool_per_node_and_process(start_worker, client):
    worker = start_worker(TWO_POOLS, pool="prefork", concurrency=2)
    _, warm = client(TWO_POOLS)
    for _ in range(3):
        warm.call("counter", INCREMENT)
    calls_counted(warm, worker.hostname, "counter", 3)
    result = celery("warmpool", "status", "-d", worker.hostname)
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "pool counter: ready, 2 of 2 agents available, 1 node" in output
    assert "pool ledger: ready, 2 of 2 agents available, 1 node" in output
    counter, ledger = output.split("\n\n")
    node = table_rows(counter)[worker.hostname]
    #              state    size available checked out overflow waiting held/window
    #              checkouts timeouts replacements failures
    assert node == [worker.hostname, "ready", "2", "2", "0", "0", "0", "0/4", "3", "0", "0",
                    "0"]
    processes = [table_rows(counter)[f"process {index}"] for index in (0, 1)]
    assert {process[0].split("pid ")[1].rstrip(")") for process in processes} == {
        str(pid) for pid in worker.children()}
    assert sum(int(process[7]) for process in processes) == 3
    assert table_rows(ledger)[worker.hostname][8] == "0"
    assert "total" not in table_rows(counter)


@pytest.mark.integration
def test_status_json_reports_exact_numbers_per_node_and_process(start_worker, client):
    worker = start_worker(TWO_POOLS, pool="prefork", concurrency=2)
    _, warm = client(TWO_POOLS)
    warm.call("ledger", INCREMENT)
    calls_counted(warm, worker.hostname, "ledger", 1)
    result = celery("warmpool", "status", "--json", "--destination", worker.hostname)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert sorted(document) == ["counter", "ledger"]
    ledger = document["ledger"]
    assert list(ledger["nodes"]) == [worker.hostname], ledger["nodes"]
    assert (ledger["state"], ledger["size"], ledger["available"], ledger["checked_out"],
            ledger["overflow"], ledger["waiting"]) == ("ready", 2, 2, 0, 0, 0)
    assert ledger["counters"]["checkouts"] == 1
    assert ledger["counters"]["calls"] == 1
    node = ledger["nodes"][worker.hostname]
    assert sorted(process["pid"] for process in node["processes"]) == worker.children()
    assert sorted(process["process_index"] for process in node["processes"]) == [0, 1]
    assert document["counter"]["counters"]["calls"] == 0


@pytest.mark.integration
def test_pool_option_shows_only_that_pool(start_worker):
    worker = start_worker(TWO_POOLS, pool="threads", concurrency=4)
    table = celery("warmpool", "status", "--pool", "ledger", "-d", worker.hostname)
    assert table.returncode == 0, table.stderr
    assert "pool ledger: ready, 2 of 2 agents available, 1 node" in table.stdout
    assert "counter" not in table.stdout
    # Under threads one process holds the node's agents: no per-process rows.
    assert "process" not in table.stdout.replace("node / process", "")
    assert table_rows(table.stdout)[worker.hostname][1:4] == ["ready", "2", "2"]
    document = json.loads(celery("warmpool", "status", "--pool", "ledger", "--json",
                                 "-d", worker.hostname).stdout)
    assert list(document) == ["ledger"]


@pytest.mark.integration
def test_unknown_pool_is_a_usage_error_naming_the_pools(start_worker):
    start_worker(TWO_POOLS, pool="threads", concurrency=2)
    result = celery("warmpool", "status", "--pool", "nowhere")
    assert result.returncode == 2
    assert "no pool named 'nowhere' is configured (pools: counter, ledger)" in result.stderr
    assert result.stdout == ""


def test_no_worker_answering_exits_non_zero(tmp_path):
    # An embedded store of its own: no worker anywhere can answer.
    (tmp_path / "lonely_app.py").write_text(
        "from celery import Celery\n"
        "from celery_warmpool import PoolSpec, WarmPool\n"
        "from celery_warmpool.ops.embedded import embedded_config\n"
        "app = Celery('lonely')\n"
        f"app.conf.update(embedded_config({str(tmp_path / 'store')!r}))\n"
        "WarmPool(app, pools=[PoolSpec('ledger', 'tests.integration_app:CounterAgent')])\n")
    result = celery("warmpool", "status", "--timeout", "0.5", app="lonely_app", cwd=tmp_path)
    assert result.returncode == 69  # EX_UNAVAILABLE, as `celery status` exits
    assert "no worker with warm pools answered within 0.5s" in result.stderr
    assert result.stdout == ""
    single = celery("warmpool", "status", "--pool", "ledger", "--timeout", "0.5",
                    app="lonely_app", cwd=tmp_path)
    assert single.returncode == 69
    assert "no worker hosting pool 'ledger' answered within 0.5s" in single.stderr


@pytest.mark.parametrize("command, value, message", [
    (("status",), "inf", "timeout must be a number of seconds from 0.001 to 86400, got inf"),
    (("status",), "0", "timeout must be a number of seconds from 0.001 to 86400, got 0.0"),
    (("status",), "soon", "timeout must be a number of seconds, got 'soon'"),
    (("resize", "counter", "--size", "2"), "nan",
     "timeout must be a number of seconds from 0.001 to 86400, got nan"),
    (("drain", "counter"), "1e300",
     "timeout must be a number of seconds from 0.001 to 86400, got 1e+300"),
])
def test_a_timeout_out_of_range_is_a_usage_error_not_a_traceback(command, value, message):
    # Nothing is asked of any node: the option is refused as it is read.
    result = celery("warmpool", *command, "--timeout", value)
    assert result.returncode == 2
    assert f"Invalid value for '-t' / '--timeout': {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_a_destination_that_does_not_answer_exits_non_zero(start_worker):
    start_worker(TWO_POOLS, pool="threads", concurrency=2)
    result = celery("warmpool", "status", "-d", "nobody@nowhere", "--timeout", "0.5")
    assert result.returncode == 69
    assert ("no worker with warm pools answered within 0.5s (asked: nobody@nowhere)"
            in result.stderr)


def test_an_app_without_warm_pools_exits_non_zero(tmp_path):
    (tmp_path / "plain_app.py").write_text(
        "from celery import Celery\n"
        f"app = Celery('plain', broker={REDIS_BROKER!r})\n")
    result = celery("warmpool", "status", app="plain_app", cwd=tmp_path)
    assert result.returncode == 69
    assert "the app 'plain' has no warm pools: create WarmPool(app)" in result.stderr


@pytest.mark.integration
def test_watch_refreshes_the_numbers_until_interrupted(start_worker, client):
    specs = [{**TWO_POOLS[0], "size": 1}]
    worker = start_worker(specs, pool="threads", concurrency=2)
    _, warm = client(specs)
    env = {**CLI_ENV, "WARMPOOL_TEST_SPECS": json.dumps(specs)}
    with watching("--json", "--watch", "0.2", "--timeout", "2", "-d", worker.hostname,
                  env=env) as watcher:
        first = json.loads(watcher.stdout.readline())
        assert first["counter"]["checked_out"] == 0
        busy = warm.cast("counter", {"type": "counter.work", "data": {"seconds": 3.0}})
        seen = [json.loads(watcher.stdout.readline())["counter"] for _ in range(8)]
        assert any(status["checked_out"] == 1 and status["state"] == "full"
                   for status in seen), seen
        busy.get(timeout=10)
        _, errors = interrupt(watcher)
    assert watcher.returncode == 0, errors
    assert "Aborted" not in errors


@pytest.mark.integration
def test_status_works_on_the_embedded_broker(tmp_path):
    # Kombu's filesystem transport carries the broadcast: no server at all.
    env = {"WARMPOOL_EMBEDDED_DIR": str(tmp_path / "store"), "PYTHONPATH": str(ROOT)}
    with WorkerProcess("celery_warmpool.demo.app", pool="threads", concurrency=2,
                       broker="filesystem://", backend="", env=env) as worker:
        result = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "celery_warmpool.demo.app", "warmpool",
             "status", "-d", worker.hostname],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, **env, "WARMPOOL_BROKER_URL": "filesystem://"})
    assert result.returncode == 0, result.stderr
    assert "pool catalog: ready, 2 of 2 agents available, 1 node" in result.stdout
    assert "pool signer: ready, 2 of 2 agents available, 1 node" in result.stdout
    assert table_rows(result.stdout)[worker.hostname] == [
        worker.hostname, "ready", "2", "2", "0", "0", "0", "0/4", "0", "0", "0", "0"]


@pytest.mark.integration
def test_watch_prints_a_fresh_table_each_time(start_worker):
    worker = start_worker(TWO_POOLS, pool="threads", concurrency=2)
    with watching("--watch", "0.2", "--pool", "ledger", "-d", worker.hostname) as watcher:
        lines = [watcher.stdout.readline() for _ in range(12)]
        rest, errors = interrupt(watcher)
    assert watcher.returncode == 0, errors
    # Each refresh: a time stamp line, a blank line, the pool's heading and backlog, the
    # table (2 lines), a blank line.
    assert re.fullmatch(r"\d\d:\d\d:\d\d  every 0.2s \(Ctrl-C to stop\)\n", lines[0])
    assert lines[1:3] == ["\n", "pool ledger: ready, 2 of 2 agents available, 1 node\n"]
    assert lines[3] == ("  backlog 0: 0 queued, 0 reserved, 0 running; capacity 2, draining "
                        "0.0 calls/s\n")
    assert lines[5].split() == [worker.hostname, "ready", "2", "2", "0", "0", "0", "0/4", "0",
                                "0", "0", "0"]
    assert lines[6] == "\n"
    assert re.fullmatch(r"\d\d:\d\d:\d\d  every 0.2s \(Ctrl-C to stop\)\n", lines[7])
    assert "counter" not in "".join(lines) + rest
