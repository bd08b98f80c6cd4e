"""Warm pools inside real ``celery worker`` processes against the local Redis."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import pytest

from celery_warmpool import (
    ActionFailed,
    CallTimeout,
    CheckoutTimeout,
    InvalidSignal,
    PoolStartError,
    Signal,
    UnknownPool,
    UnknownSignal,
)
from celery_warmpool.core.status import PoolStatus
from tests.conftest import REDIS_BACKEND, REDIS_BROKER, ROOT, wait_until

pytestmark = pytest.mark.integration

INCREMENT = {"type": "counter.increment", "data": {"by": 1}}


def work(seconds: float) -> dict[str, Any]:
    return {"type": "counter.work", "data": {"seconds": seconds}}


def counter(size: int = 1, **options: Any) -> list[dict[str, Any]]:
    return [{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": size,
             **options}]


def node_status(warm: Any, node: str) -> PoolStatus:
    """The pool's status on ``node``, asked of that node alone (answers at once)."""
    parts = warm.status_reader.collect("counter", timeout=2.0, destination=[node])
    return PoolStatus.combine("counter", parts["counter"])


def wait_for_status(warm: Any, condition: Any, within: float = 3.0,
                    node: str | None = None) -> Any:
    """The pool's status once ``condition`` holds (children publish a few times a second).

    With ``node`` only that node is asked, which answers at once; otherwise every node
    is, which takes the broadcast's whole timeout.
    """
    last: list[Any] = []

    def holds() -> bool:
        last[:] = [node_status(warm, node) if node else warm.status("counter")]
        return bool(condition(last[0]))

    wait_until(holds, within, "the pool's status never matched")
    return last[0]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = highest = 0
    for _, step in events:
        running += step
        highest = max(highest, running)
    return highest


@pytest.mark.parametrize("execution", ["prefork", "threads", "solo"])
def test_state_persists_and_failed_action_leaves_it_unchanged(start_worker, client, execution):
    start_worker(counter(1), pool=execution, concurrency=1)
    _, warm = client(counter(1))
    assert warm.call("counter", INCREMENT).state["count"] == 1
    with pytest.raises(ActionFailed) as failed:
        warm.call("counter", {"type": "counter.fail"})
    assert "asked to fail" in str(failed.value)
    reply = warm.call("counter", INCREMENT)
    assert reply.state["count"] == 2
    assert "connection" not in reply.state
    assert reply.pool == "counter"
    assert reply.action == "increment"


def test_reset_on_checkin_isolates_requests(start_worker, client):
    specs = counter(1, reset_on_checkin=True)
    start_worker(specs, pool="threads", concurrency=2)
    _, warm = client(specs)
    assert [warm.call("counter", INCREMENT).state["count"] for _ in range(3)] == [1, 1, 1]


def test_errors_reach_the_caller_as_named_exceptions(start_worker, client):
    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    with pytest.raises(UnknownSignal, match=r"counter\.nope"):
        warm.call("counter", {"type": "counter.nope"})
    with pytest.raises(InvalidSignal, match="unexpected"):
        warm.call("counter", {"type": "counter.increment", "data": {"unexpected": 1}})
    with pytest.raises(InvalidSignal, match="type"):
        warm.call("counter", {"data": {}})
    with pytest.raises(UnknownPool, match="nowhere"):
        warm.call("nowhere", INCREMENT)
    assert warm.call("counter", INCREMENT).state["count"] == 1


@pytest.mark.parametrize("execution", ["prefork", "threads"])
def test_first_call_after_ready_is_warm(start_worker, client, execution):
    _, warm = client(counter(2))
    app = warm.app
    # The caller's own one-time costs, not the worker's: its connections, its app's
    # result backend and tasks, its reply listener.
    app.control.ping(timeout=0.2)
    app.finalize()
    warm.client.listener()
    start_worker(counter(2), pool=execution, concurrency=2,
                 env={"WARMPOOL_TEST_SETUP_SECONDS": "1.5"})
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        warm.call("counter", INCREMENT)
        timings.append(time.perf_counter() - started)
    steady = statistics.median(timings[5:])
    # The caller's first round trip pays for its own result subscription; allow that
    # fixed cost, but a cold agent (1.5 s warm-up) would blow far past it.
    assert timings[0] <= 2 * steady + 0.05, (timings[0], steady)
    assert timings[0] < 0.5


def test_six_second_warm_up_is_not_killed(start_worker, client):
    started = time.monotonic()
    worker = start_worker(counter(2), pool="prefork", concurrency=2,
                          env={"WARMPOOL_TEST_SETUP_SECONDS": "6"})
    assert time.monotonic() - started >= 6
    _, warm = client(counter(2))
    reply = warm.call("counter", INCREMENT, timeout=2)
    assert reply.state["setups"] == 1
    log = worker.log()
    assert "Timed out waiting for UP message" not in log
    assert "Process 'ForkPoolWorker" not in log
    assert len(worker.children()) == 2


def test_killed_child_is_replaced_by_a_warm_one(start_worker, client):
    worker = start_worker(counter(2), pool="prefork", concurrency=2,
                          env={"WARMPOOL_TEST_SETUP_SECONDS": "1"})
    _, warm = client(counter(2))
    before = set(worker.children())
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(set(worker.children()) - before) == 1, 20,
               "the killed child was replaced")
    [replacement] = set(worker.children()) - before
    assert victim not in worker.children()
    # Two calls at once occupy both children, so the replacement serves one of them.
    wait_for_status(warm, lambda status: status.available == 2, within=10,
                    node=worker.hostname)
    # Celery may hand the first pairs to the old child while the new one's start is
    # still being noted in the main process: pairs until the replacement has served.
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while replacement not in {reply["pid"] for reply in replies}:
        assert time.monotonic() < deadline, f"the replacement never served: {replies}"
        calls = [warm.cast("counter", work(0.5)) for _ in range(2)]
        replies += [result.get(timeout=10)[0] for result in calls]
    assert {reply["pid"] for reply in replies} == {replacement, *(before - {victim})}
    for reply in replies:
        assert reply["state"]["setups"] == 1  # warmed once, before its first call
    status = warm.status("counter")
    assert status.size == 2
    assert {process.pid for process in status.processes} == set(worker.children())


@pytest.mark.parametrize("execution,concurrency,size", [("prefork", 2, 2), ("threads", 6, 2)])
def test_concurrency_is_bounded_by_capacity(start_worker, client, execution, concurrency, size):
    specs = counter(size)
    worker = start_worker(specs, pool=execution, concurrency=concurrency)
    app, warm = client(specs)
    results = [warm.cast("counter", work(0.6)) for _ in range(10)]
    wait_for_status(warm, lambda status: status.checked_out == size, node=worker.hostname)
    inspect = app.control.inspect(timeout=1.0)
    active = sum(len(tasks) for tasks in (inspect.active() or {}).values())
    reserved = sum(len(tasks) for tasks in (inspect.reserved() or {}).values())
    assert active + reserved <= 2 * size, (active, reserved)
    replies = [result.get(timeout=30)[0] for result in results]
    overlap = max_overlap([(reply["result"]["last_start"], reply["result"]["last_end"])
                           for reply in replies])
    assert overlap == size


def test_checkout_timeout_and_the_call_never_runs_late(start_worker, client):
    specs = counter(1)
    worker = start_worker(specs, pool="threads", concurrency=4)
    _, warm = client(specs)
    busy = warm.cast("counter", work(2.0))
    wait_for_status(warm, lambda status: status.checked_out == 1, node=worker.hostname)
    started = time.monotonic()
    with pytest.raises(CheckoutTimeout) as timed_out:
        warm.call("counter", INCREMENT, timeout=0.5)
    waited = time.monotonic() - started
    assert 0.4 <= waited < 1.5
    assert timed_out.value.pool == "counter"
    busy.get(timeout=10)
    # Only the busy work ran: the timed-out increment never did.
    assert warm.call("counter", INCREMENT).state["count"] == 2


def test_checkout_timeout_is_prompt_when_a_prefork_worker_holds_the_call(start_worker,
                                                                          client):
    specs = counter(1)
    worker = start_worker(specs, pool="prefork", concurrency=1)
    _, warm = client(specs)
    busy = warm.cast("counter", work(3.0))
    wait_for_status(warm, lambda status: status.checked_out == 1, node=worker.hostname)
    started = time.monotonic()
    with pytest.raises(CheckoutTimeout):
        warm.call("counter", INCREMENT, timeout=0.5)
    assert time.monotonic() - started < 1.5
    busy.get(timeout=10)
    assert warm.call("counter", INCREMENT).state["count"] == 2


def test_call_timeout_replaces_the_agent_that_overran(start_worker, client):
    specs = counter(1)
    start_worker(specs, pool="threads", concurrency=2)
    _, warm = client(specs)
    first = warm.call("counter", INCREMENT)
    started = time.monotonic()
    with pytest.raises(CallTimeout) as overran:
        warm.call("counter", work(3.0), call_timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert overran.value.timeout == 0.5
    after = warm.call("counter", INCREMENT, timeout=5)
    assert after.agent_id != first.agent_id
    assert after.state["count"] == 1
    assert warm.status("counter").counters.replacements == 1


def test_transaction_is_all_or_nothing(start_worker, client):
    start_worker(counter(1), pool="threads", concurrency=2)
    _, warm = client(counter(1))
    replies = warm.transaction("counter", [INCREMENT, INCREMENT, INCREMENT])
    assert [reply.state["count"] for reply in replies] == [1, 2, 3]
    assert len({reply.agent_id for reply in replies}) == 1
    with pytest.raises(ActionFailed):
        warm.transaction("counter", [INCREMENT, {"type": "counter.fail"}])
    assert warm.call("counter", INCREMENT).state["count"] == 4


@pytest.mark.parametrize("execution", ["prefork", "threads"])
def test_pool_aware_tasks_always_check_the_agent_in(start_worker, client, execution):
    start_worker(counter(1), pool=execution, concurrency=1)
    app, warm = client(counter(1))
    assert app.tasks["tests.peek"].delay(add=5).get(timeout=10)["count"] == 5
    assert app.tasks["tests.peek"].apply_async(kwargs={"add": 1}).get(timeout=10)["count"] == 1
    with pytest.raises(KeyError):
        app.tasks["tests.explode"].delay().get(timeout=10)
    assert app.tasks["tests.flaky"].delay().get(timeout=10) == 2
    if execution == "prefork":
        assert app.tasks["tests.nap"].delay(2.0).get(timeout=10) == "soft limit"
    status = wait_for_status(warm, lambda status: status.checked_out == 0)
    assert status.checked_out == 0
    assert status.available == 1
    assert status.counters.checkouts == status.counters.checkins


def test_pool_aware_task_rejects_wrong_arguments_at_call_time(client):
    app, _ = client(counter(1))
    with pytest.raises(TypeError):
        app.tasks["tests.peek"].delay(1, 2, 3)


@pytest.mark.parametrize("execution,concurrency", [("prefork", 2), ("threads", 4)])
def test_status_is_accurate_within_a_second(start_worker, client, execution, concurrency):
    specs = counter(2)
    worker = start_worker(specs, pool=execution, concurrency=concurrency)
    _, warm = client(specs)
    idle = warm.status("counter")
    assert (idle.size, idle.available, idle.checked_out, idle.state) == (2, 2, 0, "ready")
    busy = warm.cast("counter", work(3.0))
    # The work starts at once; the numbers follow within a second.
    status = wait_for_status(warm, lambda status: status.checked_out == 1, within=1.0,
                             node=worker.hostname)
    assert (status.available, status.checked_out) == (1, 1)
    assert status.nodes[worker.hostname].checked_out == 1
    if execution == "prefork":
        assert len(status.processes) == 2
        assert {process.size for process in status.processes} == {1}
    busy.get(timeout=10)


def test_status_aggregates_two_nodes(start_worker, client):
    specs = counter(2)
    first = start_worker(specs, pool="threads", concurrency=2)
    second = start_worker(specs, pool="prefork", concurrency=2)
    _, warm = client(specs)
    for _ in range(4):
        warm.call("counter", INCREMENT)
    status = wait_for_status(warm, lambda status: status.counters.calls == 4)
    assert set(status.nodes) == {first.hostname, second.hostname}
    assert status.size == 4
    assert status.available == 4
    assert status.counters.calls == 4


def test_inspect_cli_and_stats_show_the_pools(start_worker, client):
    worker = start_worker(counter(2), pool="threads", concurrency=2)
    app, warm = client(counter(2))
    warm.call("counter", INCREMENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WARMPOOL_BROKER_URL": REDIS_BROKER,
           "WARMPOOL_RESULT_BACKEND": REDIS_BACKEND}
    output = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration_app", "inspect",
         "warmpool_status", "--json", "--timeout", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=True).stdout
    report = json.loads(output.strip().splitlines()[-1])
    pool = report[worker.hostname]["counter"]
    assert (pool["size"], pool["available"], pool["state"]) == (2, 2, "ready")
    assert pool["counters"]["calls"] == 1
    stats = app.control.inspect(timeout=1.0).stats()[worker.hostname]
    assert stats["warmpool"]["counter"]["size"] == 2
    assert stats["warmpool"]["counter"]["execution_pool"] == "threads"


def test_a_child_that_cannot_warm_up_is_reported(start_worker, client):
    specs = [{"name": "counter", "agent": "tests.integration_app:BrokenAgent", "size": 1,
              "start_timeout": 5}]
    worker = start_worker(specs, pool="prefork", concurrency=1)
    _, warm = client(specs)
    assert "model server unreachable" in worker.log()
    status = warm.status("counter")
    assert status.available == 0
    assert "model server unreachable" in (status.last_error or "")
    with pytest.raises(PoolStartError, match="could not start"):
        warm.call("counter", INCREMENT, timeout=2)


@pytest.mark.parametrize("specs,message", [
    ([{"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 0}],
     "pool 'counter': invalid size"),
    ([{"name": "counter", "agent": "tests.integration_app:CounterAgent", "sise": 2}],
     "pool 'counter': invalid sise"),
    ([{"name": "counter", "agent": "tests.integration_app:CounterAgent",
       "strategy": "random"}], "pool 'counter': invalid strategy"),
    ([{"name": "counter", "agent": "tests.integration_app:NoSuchAgent"}],
     "pool 'counter': invalid agent"),
])
def test_bad_configuration_stops_the_worker_naming_pool_and_field(start_worker, specs,
                                                                  message):
    worker = start_worker(specs, pool="threads", concurrency=1, wait=False)
    worker.launch()
    assert worker.process.wait(60) != 0
    assert message in worker.log()


def test_environment_overrides_pool_size(start_worker, client):
    start_worker(counter(1), pool="threads", concurrency=4,
                 env={"WARMPOOL_COUNTER_SIZE": "3"})
    _, warm = client(counter(1))
    assert warm.status("counter").size == 3


def test_signal_objects_travel_as_cloudevents(start_worker, client):
    start_worker(counter(1), pool="solo", concurrency=1)
    _, warm = client(counter(1))
    signal_ = Signal.new("counter.increment", {"by": 5}, source="/tests", subject="s-1")
    reply = warm.call("counter", signal_)
    assert reply.signal_id == signal_.id
    assert reply.result == {"count": 5}


@pytest.mark.rabbitmq
def test_calls_and_status_over_rabbitmq(start_worker, client):
    from tests.conftest import RABBITMQ_BROKER

    start_worker(counter(1), pool="prefork", concurrency=1, broker=RABBITMQ_BROKER)
    _, warm = client(counter(1), broker=RABBITMQ_BROKER)
    assert warm.call("counter", INCREMENT).state["count"] == 1
    assert warm.call("counter", INCREMENT).state["count"] == 2
    assert wait_for_status(warm, lambda status: status.counters.calls == 2).counters.calls == 2


def test_gevent_worker_shares_agents_between_greenlets(start_worker, client):
    specs = counter(2)
    start_worker(specs, pool="gevent", concurrency=8)
    _, warm = client(specs)
    assert warm.call("counter", INCREMENT).state["count"] == 1
    results = [warm.cast("counter", work(0.4)) for _ in range(6)]
    replies = [result.get(timeout=30)[0] for result in results]
    overlap = max_overlap([(reply["result"]["last_start"], reply["result"]["last_end"])
                           for reply in replies])
    assert overlap == 2
    with pytest.raises(CallTimeout):
        warm.call("counter", work(3.0), call_timeout=0.5)
    status = wait_for_status(warm, lambda status: status.counters.replacements == 1)
    assert (status.size, status.counters.replacements) == (2, 1)


def test_a_pool_aware_task_keeps_a_queue_it_was_given(client):
    app, warm = client(counter(1))

    @warm.task(pool="counter", name="tests.elsewhere", queue="special")
    def elsewhere(agent: Any) -> None:
        return None

    assert app.tasks["tests.elsewhere"].warmpool_queue == "special"
    assert app.tasks["tests.peek"].warmpool_queue == "warmpool.counter"


def _torn_down(folder: Any) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_warm_shutdown_lets_running_work_finish_and_hands_waiting_calls_back(
        start_worker, client, tmp_path):
    worker = start_worker(counter(1), pool="threads", concurrency=4,
                          env={"WARMPOOL_TEST_TEARDOWN_DIR": str(tmp_path)})
    _, warm = client(counter(1))
    running = warm.cast("counter", work(1.5))
    wait_for_status(warm, lambda status: status.checked_out == 1, node=worker.hostname)
    waiting = warm.cast("counter", work(0.2))
    wait_for_status(warm, lambda status: status.waiting == 1, node=worker.hostname)
    assert worker.stop() == 0
    assert running.get(timeout=5)[0]["state"]["count"] == 1  # finished on its agent
    assert len(_torn_down(tmp_path)) == 1
    assert not waiting.ready()  # back in the queue, not run, not failed
    successor = start_worker(counter(1), pool="threads", concurrency=4)
    [reply] = waiting.get(timeout=15)
    assert (reply["node"], reply["state"]["count"]) == (successor.hostname, 1)


@pytest.mark.parametrize("execution,agents", [("threads", 2), ("prefork", 2)])
def test_cold_shutdown_tears_every_agent_down(start_worker, tmp_path, execution, agents):
    worker = start_worker(counter(2), pool=execution, concurrency=2,
                          env={"WARMPOOL_TEST_TEARDOWN_DIR": str(tmp_path)})
    os.kill(worker.pid, signal.SIGQUIT)  # Celery's cold shutdown
    worker.process.wait(30)
    assert len(_torn_down(tmp_path)) == agents


def test_autoscaled_prefork_worker_warms_its_first_children_quickly(start_worker, client):
    started = time.monotonic()
    start_worker(counter(1), pool="prefork", concurrency=1, args=("--autoscale=3,1",))
    assert time.monotonic() - started < 30
    _, warm = client(counter(1))
    assert warm.call("counter", INCREMENT).state["count"] == 1
