"""Many nodes on one broker: membership, fast status, capacity that adds up, resize, drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from celery_warmpool.wire.membership import EXPIRES_AFTER, HEARTBEAT
from tests.conftest import REDIS_BACKEND, REDIS_BROKER, ROOT, wait_until
from tests.test_worker import INCREMENT, counter, max_overlap, node_status, work

pytestmark = pytest.mark.integration


def warmpool_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WARMPOOL_BROKER_URL": REDIS_BROKER,
           "WARMPOOL_RESULT_BACKEND": REDIS_BACKEND}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration_app", "warmpool", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)


def node_names(warm: Any) -> set[str]:
    return {record.node for record in warm.nodes("counter")}


def test_a_new_node_appears_at_once_and_a_killed_one_drops_out_within_its_expiry(
        start_worker, client):
    first = start_worker(counter(1), pool="solo", concurrency=1)
    _, warm = client(counter(1))
    assert node_names(warm) == {first.hostname}
    second = start_worker(counter(1), pool="threads", concurrency=2)
    wait_until(lambda: node_names(warm) == {first.hostname, second.hostname}, HEARTBEAT,
               "the new node was recorded within one heartbeat")
    [record] = [record for record in warm.nodes("counter") if record.node == second.hostname]
    assert (record.execution_pool, record.pools, record.capacity) == (
        "threads", ["counter"], {"counter": 1})

    os.killpg(second.pid, signal.SIGKILL)
    killed = time.monotonic()
    status = warm.status("counter", timeout=1.0)
    assert status.not_answering == [second.hostname]  # recorded, silent: shown as such
    assert set(status.nodes) == {first.hostname}
    table = warmpool_cli("status")
    assert f"not answering: {second.hostname}" in table.stdout
    wait_until(lambda: node_names(warm) == {first.hostname},
               EXPIRES_AFTER * HEARTBEAT + 2, "the killed node dropped out")
    assert time.monotonic() - killed <= EXPIRES_AFTER * HEARTBEAT + 2
    membership = warm.status_reader.membership
    records = f"{membership.key}:records"
    wait_until(lambda: not membership.store().hexists(records, second.hostname),
               HEARTBEAT + 1, "the live node's heartbeat forgot the dead node's record")


def test_status_stops_waiting_once_every_live_node_has_answered(start_worker, client):
    nodes = [start_worker(counter(1), pool="solo", concurrency=1) for _ in range(3)]
    _, warm = client(counter(1))
    started = time.monotonic()
    status = warm.status("counter", timeout=5.0)
    assert time.monotonic() - started < 1.0  # not the 5 s timeout
    assert set(status.nodes) == {node.hostname for node in nodes}
    assert status.not_answering == []


def test_a_warm_shutdown_withdraws_the_node(start_worker, client):
    worker = start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    assert node_names(warm) == {worker.hostname}
    assert worker.stop() == 0
    assert node_names(warm) == set()


def test_capacity_adds_up_over_four_nodes(start_worker, client):
    nodes = [start_worker(counter(2), pool="threads", concurrency=4) for _ in range(4)]
    _, warm = client(counter(2))
    replies: list[Any] = []
    start = threading.Barrier(16)

    def call() -> None:
        start.wait()
        replies.append(warm.call("counter", work(1.0), timeout=20, call_timeout=20))

    callers = [threading.Thread(target=call) for _ in range(16)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)

    intervals = [(reply.result["last_start"], reply.result["last_end"]) for reply in replies]
    assert len(replies) == 16
    assert max_overlap(intervals) == 8
    by_node: dict[str, list[tuple[float, float]]] = {}
    for reply, interval in zip(replies, intervals, strict=True):
        by_node.setdefault(reply.node, []).append(interval)
    assert set(by_node) == {node.hostname for node in nodes}
    assert all(max_overlap(spans) <= 2 for spans in by_node.values())


def test_a_node_stopped_hands_its_waiting_calls_back_to_the_others(start_worker, client):
    leaving = start_worker(counter(1), pool="threads", concurrency=4)
    staying = start_worker(counter(1), pool="threads", concurrency=4)
    _, warm = client(counter(1))
    casts = [warm.cast("counter", work(2.0)) for _ in range(4)]
    wait_until(lambda: node_status(warm, leaving.hostname).waiting == 1, 10,
               "the leaving node has a call waiting for its agent")

    assert leaving.stop() == 0
    replies = [cast.get(timeout=30)[0] for cast in casts]
    served = [reply["node"] for reply in replies]
    assert served.count(leaving.hostname) == 1  # only the one it was running
    assert served.count(staying.hostname) == 3


def test_resize_under_threads_builds_warm_agents_before_they_count(start_worker, client):
    worker = start_worker(counter(2), pool="threads", concurrency=8,
                          env={"WARMPOOL_TEST_SETUP_SECONDS": "1"})
    _, warm = client(counter(2))
    done = warmpool_cli("resize", "counter", "--size", "4")
    assert done.returncode == 0, done.stderr
    assert f"{worker.hostname}: pool 'counter' resized to 4 agents" in done.stdout
    status = node_status(warm, worker.hostname)
    assert status.size == 4 and status.alive == 2  # the new ones are still warming up
    wait_until(lambda: node_status(warm, worker.hostname).alive == 4, 5,
               "the new agents were warm")
    assert node_status(warm, worker.hostname).reservations[worker.hostname][1] == 8

    assert warmpool_cli("resize", "counter", "--size", "1").returncode == 0
    wait_until(lambda: node_status(warm, worker.hostname).alive == 1, 2, "it shrank")
    status = node_status(warm, worker.hostname)
    assert (status.size, status.reservations[worker.hostname][1]) == (1, 2)
    assert warm.call("counter", INCREMENT).state["setups"] == 1


def test_resize_under_prefork_changes_the_children(start_worker, client):
    worker = start_worker(counter(2), pool="prefork", concurrency=2)
    _, warm = client(counter(2))
    assert warmpool_cli("resize", "counter", "--size", "3").returncode == 0
    wait_until(lambda: node_status(warm, worker.hostname).alive == 3, 15,
               "a third child was warm")
    assert len(worker.children()) == 3
    assert warmpool_cli("resize", "counter", "--size", "1").returncode == 0
    wait_until(lambda: len(worker.children()) == 1, 10, "two children stopped")
    wait_until(lambda: node_status(warm, worker.hostname).size == 1, 5, "status followed")
    assert warm.call("counter", INCREMENT).state["count"] >= 1


def test_invalid_resizes_are_refused_with_the_reason(start_worker, client):
    worker = start_worker(counter(2), pool="prefork", concurrency=2)
    _, warm = client(counter(2))
    zero = warmpool_cli("resize", "counter", "--size", "0")
    assert zero.returncode == 2 and "--size" in zero.stderr
    overflow = warmpool_cli("resize", "counter", "--size", "2", "--max-overflow", "2")
    assert overflow.returncode == 1
    assert f"{worker.hostname}: refused: under prefork" in overflow.stdout
    assert len(worker.children()) == 2
    assert node_status(warm, worker.hostname).size == 2


def test_drain_lets_running_work_finish_and_loses_no_call(start_worker, client):
    drained = start_worker(counter(1), pool="threads", concurrency=4)
    other = start_worker(counter(1), pool="threads", concurrency=4)
    _, warm = client(counter(1))
    casts = [warm.cast("counter", work(1.0)) for _ in range(6)]
    wait_until(lambda: node_status(warm, drained.hostname).checked_out == 1, 10,
               "the node to drain is busy")

    done = warmpool_cli("drain", "counter", "-d", drained.hostname)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{drained.hostname}: pool 'counter' is idle: the node can be stopped" in done.stdout
    replies = [cast.get(timeout=30)[0] for cast in casts]
    assert len(replies) == 6  # none lost
    late = warm.cast("counter", work(0.1)).get(timeout=10)[0]
    assert late["node"] == other.hostname  # the drained node takes nothing new
    assert warmpool_cli("drain", "counter", "-d", drained.hostname, "--resume").returncode == 0


def test_without_membership_records_status_waits_out_the_timeout_and_says_so_once(
        start_worker, client, caplog):
    worker = start_worker(counter(1), pool="solo", concurrency=1, backend="rpc://")
    _, warm = client(counter(1), backend="rpc://")
    with caplog.at_level("INFO", logger="celery_warmpool.wire.membership"):
        started = time.monotonic()
        first = warm.status("counter", timeout=0.6)
        waited = time.monotonic() - started
        warm.status("counter", timeout=0.6)
    assert set(first.nodes) == {worker.hostname}
    assert waited >= 0.6  # nobody to expect: the whole timeout is waited out
    assert warm.nodes("counter")[0].node == worker.hostname
    said = [record.message for record in caplog.records if "membership" in record.message]
    assert len(said) == 1 and "waits out its timeout" in said[0]


def test_with_the_result_store_down_status_asks_every_node_and_the_node_keeps_its_agents(
        private_redis, start_worker, client):
    backend = f"{private_redis.url}/1"
    worker = start_worker(counter(1), pool="threads", concurrency=2, backend=backend)
    _, warm = client(counter(1), backend=backend)
    agents = {warm.call("counter", INCREMENT).agent_id for _ in range(4)}
    assert node_names(warm) == {worker.hostname}
    private_redis.stop()  # the broker (the shared Redis) stays up
    down = time.monotonic()
    status = warm.status("counter", timeout=1.0)
    assert set(status.nodes) == {worker.hostname}
    assert [node.node for node in warm.nodes("counter")] == [worker.hostname]
    # Stay down until the node's last record has expired (the store keeps it on disk), so
    # that the node is listed again only if its heartbeat outlived the outage.
    time.sleep(max(0.0, EXPIRES_AFTER * HEARTBEAT + 0.5 - (time.monotonic() - down)))
    private_redis.start()
    back = time.time()
    assert warm.call("counter", INCREMENT, timeout=10).agent_id in agents
    wait_until(lambda: [node.seen_at >= back for node in warm.nodes("counter")] == [True],
               HEARTBEAT + 2, "the node recorded itself again once the store was back")
