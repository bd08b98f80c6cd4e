"""Prometheus metrics scraped over HTTP from real prefork and threads workers."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from celery_warmpool import CallTimeout, CheckoutTimeout, ConfigurationError
from celery_warmpool.ops.metrics import exporter_for, metrics_address
from tests.flower_page import free_port

INCREMENT = {"type": "counter.increment", "data": {"by": 1}}

Samples = dict[str, float]


def work(seconds: float) -> dict[str, Any]:
    return {"type": "counter.work", "data": {"seconds": seconds}}


def counter(size: int = 1, agent: str = "tests.integration_app:CounterAgent",
            **options: Any) -> list[dict[str, Any]]:
    return [{"name": "counter", "agent": agent, "size": size, **options}]


def scrape(url: str, pool: str = "counter") -> Samples:
    """``pool``'s samples, keyed ``name`` or ``name{label=value}`` for the extra label."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("pool", None) != pool:
                continue
            labels.pop("node")
            key = sample.name + "".join(f"{{{name}={value}}}" for name, value in labels.items())
            found[key] = sample.value
    return found


def scrape_until(url: str, condition: Callable[[Samples], bool], within: float = 10.0,
                 ) -> Samples:
    """Scrape until ``condition`` holds (children publish a few times a second)."""
    deadline = time.monotonic() + within
    samples = scrape(url)
    while not condition(samples) and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(url)
    return samples


def metrics_worker(start_worker: Any, specs: list[dict[str, Any]], execution: str,
                   concurrency: int, **env: str) -> str:
    port = free_port()
    start_worker(specs, pool=execution, concurrency=concurrency,
                 env={"WARMPOOL_METRICS_ADDRESS": f"127.0.0.1:{port}", **env})
    return f"http://127.0.0.1:{port}/metrics"


def in_background(function: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
def test_prefork_node_sums_every_childs_numbers(start_worker, client):
    url = metrics_worker(start_worker, counter(2), "prefork", 2)
    _, warm = client(counter(2))
    pids: set[int] = set()

    def two_calls() -> None:
        for _ in range(2):
            pids.add(warm.call("counter", work(0.3)).pid)

    callers = [in_background(two_calls) for _ in range(2)]
    for caller in callers:
        caller.join(30)

    assert len(pids) == 2  # both children served, so the numbers below are sums
    # Children publish after each change: wait for the last checkin too, not only for the
    # last call's duration.
    samples = scrape_until(url, lambda s: (
        s.get("warmpool_call_duration_seconds_count") == 4
        and s.get("warmpool_agents{state=idle}") == 2))
    assert samples["warmpool_processes"] == 2
    assert samples["warmpool_size"] == 2
    assert samples["warmpool_max_overflow"] == 0
    assert samples["warmpool_agents{state=idle}"] == 2
    assert samples["warmpool_agents{state=checked_out}"] == 0
    assert samples["warmpool_checkouts_total"] == 4
    assert samples["warmpool_checkins_total"] == 4
    assert samples["warmpool_calls_total"] == 4
    assert samples["warmpool_call_failures_total"] == 0
    # A prefork child runs one task at a time: its agent is always free at once.
    assert samples["warmpool_checkout_wait_seconds_count"] == 4
    assert samples["warmpool_checkout_wait_seconds_bucket{le=0.001}"] == 4
    assert samples["warmpool_call_duration_seconds_bucket{le=0.25}"] == 0
    assert samples["warmpool_call_duration_seconds_bucket{le=0.5}"] == 4
    assert samples["warmpool_call_duration_seconds_bucket{le=+Inf}"] == 4
    assert 1.2 <= samples["warmpool_call_duration_seconds_sum"] < 2.0


@pytest.mark.integration
def test_threads_node_counts_waits_exhaustion_and_timeouts(start_worker, client):
    url = metrics_worker(start_worker, counter(1), "threads", 3)
    _, warm = client(counter(1))

    long_call = in_background(lambda: warm.call("counter", work(1.5), call_timeout=None))
    busy = scrape_until(url, lambda s: s["warmpool_agents{state=checked_out}"] == 1)
    assert busy["warmpool_agents{state=idle}"] == 0
    with pytest.raises(CheckoutTimeout):
        warm.call("counter", INCREMENT, timeout=0.5)
    waited = warm.call("counter", INCREMENT, timeout=5)  # waits for the long call's agent
    long_call.join(10)

    assert waited.state["count"] == 2
    samples = scrape_until(url, lambda s: s["warmpool_checkout_timeouts_total"] == 1)
    assert samples["warmpool_checkout_timeouts_total"] == 1
    assert samples["warmpool_exhausted_total"] == 2
    assert samples["warmpool_checkouts_total"] == 2
    assert samples["warmpool_calls_total"] == 2
    assert samples["warmpool_waiting_checkouts"] == 0
    assert samples["warmpool_processes"] == 1
    # The first checkout found the agent free; the second waited for the long call.
    assert samples["warmpool_checkout_wait_seconds_count"] == 2
    assert samples["warmpool_checkout_wait_seconds_bucket{le=0.001}"] == 1
    assert samples["warmpool_checkout_wait_seconds_bucket{le=0.1}"] == 1
    assert samples["warmpool_checkout_wait_seconds_bucket{le=2.5}"] == 2
    assert samples["warmpool_call_duration_seconds_bucket{le=0.1}"] == 1
    assert samples["warmpool_call_duration_seconds_bucket{le=1.0}"] == 1
    assert samples["warmpool_call_duration_seconds_bucket{le=2.5}"] == 2


@pytest.mark.integration
@pytest.mark.parametrize("execution,concurrency", [("prefork", 2), ("threads", 2)])
def test_warm_up_signals_are_not_counted_as_calls(start_worker, client, execution,
                                                   concurrency):
    specs = counter(2, warmup=[INCREMENT, INCREMENT])
    url = metrics_worker(start_worker, specs, execution, concurrency)
    _, warm = client(specs)

    reply = warm.call("counter", INCREMENT)

    assert reply.state["count"] == 3  # the agent ran the two warm-up signals before it
    samples = scrape_until(url, lambda s: s["warmpool_calls_total"] == 1)
    assert samples["warmpool_calls_total"] == 1
    assert samples["warmpool_call_duration_seconds_count"] == 1


@pytest.mark.integration
def test_setup_failures_and_replacements_are_counted(start_worker, client):
    specs = counter(1, agent="tests.flaky_agents:FlakySetupAgent")
    url = metrics_worker(start_worker, specs, "threads", 2,
                         WARMPOOL_TEST_SETUP_FAILURES="2")
    _, warm = client(specs)

    with pytest.raises(CallTimeout):
        warm.call("counter", work(1.0), call_timeout=0.3)

    samples = scrape_until(url, lambda s: (s["warmpool_agents{state=idle}"] == 1
                                           and s["warmpool_calls_total"] == 1))
    assert samples["warmpool_agent_setup_failures_total"] == 2
    assert samples["warmpool_agent_replacements_total"] == 1
    assert samples["warmpool_replacing_agents"] == 0
    assert samples["warmpool_call_duration_seconds_bucket{le=0.5}"] == 0
    assert samples["warmpool_call_duration_seconds_count"] == 1
    assert warm.call("counter", INCREMENT).state["setups"] == 1  # a fresh, warm agent


@pytest.mark.integration
def test_worker_without_an_address_serves_no_metrics(start_worker):
    worker = start_worker(counter(1), pool="threads", concurrency=1)
    assert "metrics on" not in worker.log()


@pytest.mark.parametrize("given,address", [
    ("127.0.0.1:9808", ("127.0.0.1", 9808)),
    (":9808", ("0.0.0.0", 9808)),
    ("9808", ("0.0.0.0", 9808)),
    ("[::1]:9808", ("::1", 9808)),
])
def test_metrics_address_forms(given, address):
    app = Celery(set_as_current=False)
    app.conf.warmpool_metrics_address = given
    assert metrics_address(app, environ={}) == address


def test_metrics_are_off_without_an_address():
    app = Celery(set_as_current=False)
    assert metrics_address(app, environ={}) is None


def test_environment_address_wins_over_the_setting():
    app = Celery(set_as_current=False)
    app.conf.warmpool_metrics_address = "127.0.0.1:1"
    environ = {"WARMPOOL_METRICS_ADDRESS": "127.0.0.2:2"}
    assert metrics_address(app, environ=environ) == ("127.0.0.2", 2)


@pytest.mark.parametrize("given", ["localhost", "host:port", "127.0.0.1:70000"])
def test_unreadable_address_is_a_configuration_error(given):
    app = Celery(set_as_current=False)
    app.conf.warmpool_metrics_address = given
    with pytest.raises(ConfigurationError, match="warmpool_metrics_address"):
        metrics_address(app, environ={})


def test_exporter_is_none_when_metrics_are_off(monkeypatch):
    from celery_warmpool import WarmPool

    monkeypatch.delenv("WARMPOOL_METRICS_ADDRESS", raising=False)
    app = Celery(set_as_current=False)
    assert exporter_for(WarmPool(app, pools=[]).runtime) is None


@pytest.mark.integration
def test_counters_of_a_killed_child_survive_its_replacement(start_worker, client):
    # prometheus_client's multiprocess mode keeps a dead process's files: no counter reset.
    port = free_port()
    worker = start_worker(counter(2), pool="prefork", concurrency=2,
                          env={"WARMPOOL_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    url = f"http://127.0.0.1:{port}/metrics"
    _, warm = client(counter(2))
    for _ in range(4):
        warm.call("counter", INCREMENT)
    assert scrape_until(url, lambda s: s["warmpool_calls_total"] == 4)[
        "warmpool_calls_total"] == 4

    victim = worker.children()[0]
    os.kill(victim, signal.SIGKILL)
    replaced = scrape_until(url, lambda s: s["warmpool_processes"] == 2 and (
        victim not in worker.children() and len(worker.children()) == 2), within=20)
    assert victim not in worker.children()
    # The killed child's calls are still counted; the new child has made none.
    assert replaced["warmpool_calls_total"] == 4
    warm.call("counter", INCREMENT)
    assert scrape_until(url, lambda s: s["warmpool_calls_total"] == 5)[
        "warmpool_calls_total"] == 5


def test_stream_counters_are_exported_by_outcome_and_chunks():
    from celery_warmpool import PoolCounters, PoolStatus, telemetry
    from celery_warmpool.ops.metrics import ProcessMetrics

    metrics = ProcessMetrics("node-a")
    try:
        status = PoolStatus(
            pool="writers", state="ready", size=1, max_overflow=0, available=1, overflow=0,
            checked_out=0, waiting=0, counters=PoolCounters(
                streams_started=4, streams_finished=2, streams_cancelled=1, chunks=9))
        metrics.sync([status])
        metrics.sync([status.model_copy(update={"counters": PoolCounters(
            streams_started=5, streams_finished=3, streams_cancelled=1, chunks=12)})])
        families = {metrics.counters[name][0] for name in
                    ("streams_started", "streams_finished", "streams_cancelled", "chunks")}
        samples = {(sample.name, sample.labels.get("outcome")): sample.value
                   for family in families for metric in family.collect()
                   for sample in metric.samples if sample.name.endswith("_total")}
    finally:
        for signal_, receiver in ((telemetry.agent_checkout, metrics._on_checkout),
                                  (telemetry.call_stop, metrics._on_call),
                                  (telemetry.call_exception, metrics._on_call),
                                  (telemetry.batch_run, metrics._on_batch)):
            signal_.disconnect(receiver)

    assert samples == {
        ("warmpool_streams_total", "started"): 5.0,
        ("warmpool_streams_total", "finished"): 3.0,
        ("warmpool_streams_total", "cancelled"): 1.0,
        ("warmpool_stream_chunks_total", None): 12.0,
    }


def test_a_file_being_created_does_not_fail_the_scrape(tmp_path):
    # A process creates its file empty and sizes it a moment later: a scrape between the
    # two must still answer, with every other process's numbers.
    import json

    from prometheus_client.mmap_dict import MmapedDict

    from celery_warmpool.ops.metrics import ProcessFiles

    written = MmapedDict(str(tmp_path / "counter_101.db"))
    key = json.dumps(["warmpool_calls", "warmpool_calls_total",
                      {"pool": "counter", "node": "n"}, "Signals handled."])
    written.write_value(key, 4.0, 0.0)
    written.close()
    (tmp_path / "counter_102.db").touch()

    families = list(ProcessFiles(str(tmp_path)).collect())

    samples = [(sample.name, sample.value) for family in families
               for sample in family.samples]
    assert samples == [("warmpool_calls_total", 4.0)]
