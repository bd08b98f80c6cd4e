"""Broker outages: callers wait out short ones, get BrokerUnavailable for long ones, and
workers survive them with their agents.

Each test runs its broker and result store on a redis-server of its own (the
``private_redis`` fixture), which it stops and restarts; the shared one is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from celery_warmpool import BrokerUnavailable, WarmPool
from celery_warmpool.wire.scoped import scoped
from tests.conftest import ROOT, PrivateRedis, at_once
from tests.flower_page import free_port
from tests.test_worker import INCREMENT, counter, work

pytestmark = pytest.mark.integration


def private_urls(server: PrivateRedis) -> tuple[str, str]:
    return f"{server.url}/0", f"{server.url}/1"


def every_agent(warm: WarmPool, size: int = 2) -> set[str]:
    """The ids of the pool's agents: ``size`` slow calls at once (so each agent takes one),
    three times over."""
    replies = [reply for _ in range(3)
               for reply in at_once(lambda _: warm.call("counter", work(0.3), timeout=15),
                                    list(range(size)))]
    assert not [reply for reply in replies if isinstance(reply, Exception)], replies
    agents = {reply.agent_id for reply in replies}
    assert len(agents) == size, agents
    return agents


def calls_until(stop: threading.Event, warm: WarmPool, callers: int, timeout: float,
                ) -> tuple[list[threading.Thread], list[Any]]:
    """``callers`` threads calling until ``stop`` is set; every outcome kept."""
    outcomes: list[Any] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                outcomes.append(warm.call("counter", INCREMENT, timeout=timeout))
            except Exception as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    return threads, outcomes


@pytest.mark.parametrize("execution", ["threads", "prefork"])
def test_a_broker_restart_is_waited_out_and_the_same_agents_serve(private_redis, start_worker,
                                                                  client, execution):
    broker, backend = private_urls(private_redis)
    specs = counter(2)
    worker = start_worker(specs, pool=execution, concurrency=2, broker=broker,
                          backend=backend)
    _, warm = client(specs, broker=broker, backend=backend)
    agents = every_agent(warm)

    stop = threading.Event()
    threads, outcomes = calls_until(stop, warm, callers=4, timeout=15)
    time.sleep(0.5)
    before_outage = len(outcomes)
    private_redis.restart(down=3.0)
    back = len(outcomes)
    time.sleep(3.0)  # calls flow again
    stop.set()
    for thread in threads:
        thread.join(30)

    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert errors == []
    assert before_outage > 0 and len(outcomes) > back  # calls before and after the outage
    assert not worker.exited(), worker.log_tail()
    assert every_agent(warm) == agents  # no agent was rebuilt
    assert "Unrecoverable error" not in worker.log()


def test_an_outage_longer_than_the_timeout_is_broker_unavailable(private_redis, start_worker,
                                                                client):
    broker, backend = private_urls(private_redis)
    worker = start_worker(counter(1), pool="threads", concurrency=2, broker=broker,
                          backend=backend)
    _, warm = client(counter(1), broker=broker, backend=backend)
    assert warm.call("counter", INCREMENT).state["count"] == 1
    private_redis.stop()

    for attempt in (
            lambda: warm.call("counter", INCREMENT, timeout=2.0, call_timeout=1.0),
            lambda: warm.transaction("counter", [INCREMENT], timeout=2.0, call_timeout=1.0),
            lambda: warm.cast("counter", INCREMENT, timeout=2.0),
            lambda: warm.status("counter", timeout=2.0)):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as caught:
            attempt()
        assert time.monotonic() - started <= 2.0 + 1.0
        assert f"127.0.0.1:{private_redis.port}" in str(caught.value)

    private_redis.start()
    assert warm.call("counter", INCREMENT, timeout=10).state["count"] == 2
    assert not worker.exited()


def test_broker_unavailable_masks_the_password():
    from tests.integration_app import make_app

    port = free_port()  # nothing listens there
    _, warm = make_app(f"redis://:s3cret@127.0.0.1:{port}/0",
                       f"redis://:s3cret@127.0.0.1:{port}/1", counter(1))
    with pytest.raises(BrokerUnavailable) as caught:
        warm.call("counter", INCREMENT, timeout=0.5)
    assert "s3cret" not in str(caught.value)
    assert caught.value.url is not None and "s3cret" not in caught.value.url
    assert f"127.0.0.1:{port}" in caught.value.url


def configured(broker: str, **conf: Any) -> Any:
    """An app with warm pools on ``broker`` (nothing connects)."""
    from celery import Celery

    app = Celery("settings", broker=broker, backend="redis://127.0.0.1:6379/3",
                 set_as_current=False)
    app.conf.update(conf)
    WarmPool(app, pools=[])
    return app


def test_the_packages_publishes_to_rabbitmq_wait_for_the_brokers_confirm_unless_told_otherwise():
    from tests.conftest import RABBITMQ_BROKER

    app = configured(RABBITMQ_BROKER)
    assert scoped(app).producers.confirms
    assert app.conf.broker_transport_options == {}  # the app's own publishes: as configured
    assert not scoped(configured("redis://127.0.0.1:6379/0")).producers.confirms
    assert not scoped(configured(RABBITMQ_BROKER, warmpool_confirm_publish=False),
                      ).producers.confirms
    # The app's own choice applies to every publish of the app, the package's included.
    mine = {"confirm_publish": False, "max_retries": 3}
    app = configured(RABBITMQ_BROKER, broker_transport_options=mine)
    assert not scoped(app).producers.confirms
    assert app.conf.broker_transport_options == mine


def test_the_packages_replies_retry_their_result_store_briefly_and_until_it_is_back():
    app = configured("redis://127.0.0.1:6379/0")
    own = scoped(app).results.backend
    assert own.always_retry is True
    assert own.max_sleep_between_retries_ms == 1000
    assert own.retry_policy["max_retries"] == 2
    # The app's own tasks store with the app's own settings (Celery's defaults here).
    assert not app.conf.result_backend_always_retry
    assert app.backend.always_retry is False
    assert app.backend.max_sleep_between_retries_ms == 10_000
    assert app.backend.retry_policy["max_retries"] == 20
    mine = configured("redis://127.0.0.1:6379/0", result_backend_max_sleep_between_retries_ms=50,
                      result_backend_transport_options={"retry_policy": {"max_retries": 9}})
    assert scoped(mine).results.backend.max_sleep_between_retries_ms == 50
    assert scoped(mine).results.backend.retry_policy["max_retries"] == 9
    assert mine.conf.result_backend_transport_options == {"retry_policy": {"max_retries": 9}}
    off = configured("redis://127.0.0.1:6379/0", warmpool_resilient_results=False)
    # Still the package's own (it publishes replies on their callers' channels), with
    # Celery's own retries.
    own = scoped(off).results.backend
    assert own is not off.backend
    assert (own.always_retry, own.max_sleep_between_retries_ms,
            own.retry_policy["max_retries"]) == (False, 10_000, 20)
    assert off.backend.always_retry is False


def test_status_command_says_in_one_line_that_the_broker_is_unreachable():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "WARMPOOL_BROKER_URL": f"redis://:s3cret@127.0.0.1:{port}/0",
           "WARMPOOL_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1"}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration_app", "warmpool", "status",
         "--timeout", "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        check=False)
    assert done.returncode == 69
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "could not reach the broker" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0] and "s3cret" not in lines[0]
    assert "Traceback" not in done.stderr


def close_rabbitmq_connections() -> None:
    """Drop every client connection of the shared RabbitMQ (it keeps running)."""
    subprocess.run(["rabbitmqctl", "close_all_connections", "test"], check=True,
                   capture_output=True, timeout=60)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("execution", ["threads", "prefork"])
def test_dropped_rabbitmq_connections_are_waited_out_with_the_same_agents(
        start_worker, client, execution):
    from tests.conftest import RABBITMQ_BROKER

    specs = counter(2)
    worker = start_worker(specs, pool=execution, concurrency=2, broker=RABBITMQ_BROKER)
    _, warm = client(specs, broker=RABBITMQ_BROKER)
    agents = every_agent(warm)

    stop = threading.Event()
    threads, outcomes = calls_until(stop, warm, callers=4, timeout=15)
    time.sleep(0.5)
    close_rabbitmq_connections()
    back = len(outcomes)
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(30)

    assert [outcome for outcome in outcomes if isinstance(outcome, Exception)] == []
    assert len(outcomes) > back
    assert not worker.exited(), worker.log_tail()
    assert every_agent(warm) == agents


@pytest.mark.rabbitmq
def test_a_result_store_outage_holds_up_no_control_command_and_loses_no_call(
        private_redis, start_worker, client, tmp_path):
    """A prefork node with a batch pool, on RabbitMQ, its result store stopped for 10 s
    under load: ``ping`` is answered within a second throughout, and once the store is
    back every call ends as its contract says (a reply, or a WarmPoolError)."""
    from celery_warmpool import WarmPoolError
    from tests.conftest import RABBITMQ_BROKER
    from tests.test_serving import embed, matrix_pool, serving_env

    backend = f"{private_redis.url}/1"
    specs = matrix_pool(2)
    worker = start_worker(specs, pool="prefork", concurrency=2, broker=RABBITMQ_BROKER,
                          backend=backend, env=serving_env(tmp_path))
    app, warm = client(specs, broker=RABBITMQ_BROKER, backend=backend)
    assert warm.call("counter", embed("warm")).result["batch"] >= 1

    stop, outcomes, calls = threading.Event(), [], []

    def caller(number: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcome: Any = warm.call("counter", embed(f"text {number}"), timeout=20,
                                         call_timeout=5)
            except Exception as exc:
                outcome = exc
            calls.append(time.monotonic() - started)
            outcomes.append(outcome)

    threads = [threading.Thread(target=caller, args=(number,), daemon=True)
               for number in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    casts = [warm.cast("counter", embed(f"cast {number}"), timeout=30) for number in range(20)]

    private_redis.stop()
    pings: list[float] = []
    outage_ends = time.monotonic() + 10.0
    while time.monotonic() < outage_ends:
        started = time.monotonic()
        answer = app.control.ping([worker.hostname], timeout=1.0)
        pings.append(time.monotonic() - started)
        assert answer and worker.hostname in answer[0], (answer, pings)
        time.sleep(0.2)
    private_redis.start()
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(40)

    assert max(pings) < 1.0, pings
    assert len(pings) >= 20
    assert all(not thread.is_alive() for thread in threads)  # every call ended
    foreign = [outcome for outcome in outcomes
               if isinstance(outcome, Exception) and not isinstance(outcome, WarmPoolError)]
    assert foreign == []
    assert max(calls) <= 20 + 5 + 2 + 2  # none outwaited its window (timeout+call_timeout+grace)
    replies = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
    assert len(replies) > 12
    # The casts ran or were dead-lettered; none is left waiting once the store is back.
    for result in casts:
        assert result.get(timeout=30, propagate=False) is not None or result.failed()
    assert warm.call("counter", embed("after")).result["batch"] >= 1
    assert not worker.exited(), worker.log_tail()
