"""Processes that die mid-work: every call ends in a reply or a named error, no cast is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from celery_warmpool import ActionFailed, AgentLost, CheckoutTimeout, InvalidSignal, UnknownSignal
from tests.conftest import REDIS_BACKEND, REDIS_BROKER, ROOT, wait_until
from tests.test_worker import INCREMENT, counter, node_status, wait_for_status, work

pytestmark = pytest.mark.integration


def outcome_of(function: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``function`` in a thread; its return value or exception lands in the dict."""
    found: dict[str, Any] = {}

    def run() -> None:
        try:
            found["value"] = function()
        except BaseException as exc:
            found["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, found


def busy_child(warm: Any, node: str, but: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """The pid of the one prefork child (other than ``but``) holding the pool's agent."""
    busy: list[int] = []

    def one_busy() -> bool:
        busy[:] = [process.pid for process in node_status(warm, node).processes
                   if process.checked_out and process.pid not in but]
        return len(busy) == 1

    wait_until(one_busy, 10, "one child took the work")
    return busy[0]


def test_a_child_killed_mid_call_reaches_the_caller_as_agent_lost(start_worker, client):
    worker = start_worker(counter(2), pool="prefork", concurrency=2)
    _, warm = client(counter(2))
    thread, outcome = outcome_of(
        lambda: warm.call("counter", work(5.0), timeout=5, call_timeout=10))
    victim = busy_child(warm, worker.hostname)

    os.kill(victim, signal.SIGKILL)
    thread.join(15)

    error = outcome["error"]
    assert isinstance(error, AgentLost)
    assert (error.pool, error.node, error.pid, error.signal_type, error.may_have_run) == (
        "counter", worker.hostname, victim, "counter.work", True)
    assert f"pid {victim}" in str(error)
    # The pool is whole again, and serves.
    wait_for_status(warm, lambda status: status.available == 2, within=15,
                    node=worker.hostname)
    assert warm.call("counter", INCREMENT).state["count"] == 1


def test_a_transaction_and_a_pool_aware_task_killed_mid_work_are_agent_lost(start_worker,
                                                                           client):
    worker = start_worker(counter(2), pool="prefork", concurrency=2)
    app, warm = client(counter(2))

    thread, outcome = outcome_of(lambda: warm.transaction(
        "counter", [INCREMENT, work(5.0)], timeout=5, call_timeout=10))
    os.kill(busy_child(warm, worker.hostname), signal.SIGKILL)
    thread.join(15)
    assert isinstance(outcome["error"], AgentLost)
    assert outcome["error"].signal_type == "counter.increment,counter.work"

    wait_for_status(warm, lambda status: status.available == 2, within=15,
                    node=worker.hostname)
    task = app.tasks["tests.slow"].delay(5.0)
    victim = busy_child(warm, worker.hostname)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(AgentLost) as lost:
        task.get(timeout=15)
    assert (lost.value.pool, lost.value.pid, lost.value.signal_type) == (
        "counter", victim, "tests.slow")


def test_a_cast_killed_mid_work_is_delivered_again(start_worker, client):
    worker = start_worker(counter(2), pool="prefork", concurrency=2)
    _, warm = client(counter(2))
    cast = warm.cast("counter", work(1.0))
    victim = busy_child(warm, worker.hostname)

    os.kill(victim, signal.SIGKILL)

    [reply] = cast.get(timeout=20)
    assert reply["pid"] != victim
    assert reply["action"] == "work"
    assert "delivered again (1 of 3)" in worker.log()


def test_a_cast_killed_past_its_redelivery_limit_is_dead_lettered(start_worker, client):
    specs = counter(2, max_redeliveries=1)
    worker = start_worker(specs, pool="prefork", concurrency=2)
    _, warm = client(specs)
    cast = warm.cast("counter", work(5.0))
    first = busy_child(warm, worker.hostname)
    os.kill(first, signal.SIGKILL)
    # Delivered once more, to the other child or the first one's replacement.
    second = busy_child(warm, worker.hostname, but={first})
    os.kill(second, signal.SIGKILL)

    with pytest.raises(AgentLost) as lost:
        cast.get(timeout=20)
    assert lost.value.pid == second
    # Sent by the node's main process as an errand, off its event loop: a moment later.
    wait_until(lambda: warm.dead_letters.depth(warm.spec("counter")) == 1, 10,
               "the dead letter arrived")
    [letter] = warm.dead_letters.read(warm.spec("counter"))
    assert (letter.error_type, letter.attempts, letter.may_have_run, letter.task_id) == (
        "AgentLost", 2, True, cast.id)
    assert letter.signal["type"] == "counter.work"
    assert letter.node == worker.hostname


def dead_letters_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WARMPOOL_BROKER_URL": REDIS_BROKER,
           "WARMPOOL_RESULT_BACKEND": REDIS_BACKEND}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration_app", "warmpool",
         "dead-letters", *args], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=60, check=False)


def test_failing_casts_land_in_the_dead_letter_queue_and_replay_from_the_cli(start_worker,
                                                                           client):
    worker = start_worker(counter(1), pool="threads", concurrency=4)
    _, warm = client(counter(1))
    failing = [warm.cast("counter", {"type": "counter.fail"}),
               warm.cast("counter", {"type": "counter.nope"}),
               warm.cast("counter", {"type": "counter.increment", "data": {"by": "x"}})]
    for result, error in zip(failing, (ActionFailed, UnknownSignal, InvalidSignal),
                             strict=True):
        with pytest.raises(error):
            result.get(timeout=10)
    # A cast that could not start in time: its agent was busy.
    busy = warm.cast("counter", work(1.5))
    wait_for_status(warm, lambda status: status.checked_out == 1, node=worker.hostname)
    late = warm.cast("counter", INCREMENT, timeout=0.3)
    with pytest.raises(CheckoutTimeout):
        late.get(timeout=10)
    busy.get(timeout=10)

    listed = dead_letters_cli("counter", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout.strip().splitlines()[-1])
    # The first three ran side by side (four threads): in the queue in any order.
    by_task = {letter["task_id"]: letter for letter in letters}
    assert [by_task[result.id]["error_type"] for result in [*failing, late]] == [
        "ActionFailed", "UnknownSignal", "InvalidSignal", "CheckoutTimeout"]
    assert len(letters) == 4 and letters[-1]["task_id"] == late.id
    assert {letter["node"] for letter in letters} == {worker.hostname}
    assert "asked to fail" in by_task[failing[0].id]["error"]
    assert wait_for_status(warm, lambda status: status.counters.dead_lettered == 4,
                           node=worker.hostname).counters.dead_lettered == 4
    table = dead_letters_cli("counter")
    assert "UnknownSignal" in table.stdout and "counter.nope" in table.stdout

    replayed = dead_letters_cli("counter", "--replay")
    assert "replayed 4 dead letters" in replayed.stdout
    # The late increment succeeds now; the three that cannot succeed are back.
    wait_for_status(warm, lambda status: status.counters.dead_lettered == 7,
                    node=worker.hostname)
    after = warm.dead_letters.read(warm.spec("counter"))
    assert sorted(letter.error_type for letter in after) == [
        "ActionFailed", "InvalidSignal", "UnknownSignal"]
    assert warm.call("counter", INCREMENT).state["count"] == 3  # work, replayed increment, this

    purged = dead_letters_cli("counter", "--purge")
    assert "purged 3 dead letters" in purged.stdout
    assert "no dead letters" in dead_letters_cli("counter").stdout
