"""Prometheus metrics: each worker node serves its pools' numbers on ``/metrics``.

Install the extra (``pip install "celery-warmpool[prometheus]"``) and give an address::

    app.conf.warmpool_metrics_address = "127.0.0.1:9808"    # or ":9808", all interfaces
    # or in the worker's environment: WARMPOOL_METRICS_ADDRESS=127.0.0.1:9808

Metrics are off unless an address is given (the environment variable wins over the
setting). The worker's main process serves them; under prefork it adds up what every
child publishes on the status board, so one scrape per node covers all its processes.
Every metric has the labels ``pool`` and ``node``:

- gauges: ``warmpool_agents{state="idle"|"checked_out"}`` (agents alive),
  ``warmpool_size`` and ``warmpool_max_overflow`` (configured on the node),
  ``warmpool_overflow_agents``, ``warmpool_waiting_checkouts``,
  ``warmpool_replacing_agents`` (base agents being rebuilt), ``warmpool_processes``;
- counters: ``warmpool_checkouts_total``, ``warmpool_checkins_total``,
  ``warmpool_checkout_timeouts_total``, ``warmpool_exhausted_total`` (checkouts that found
  no agent and no overflow room), ``warmpool_overflow_agents_created_total``,
  ``warmpool_overflow_agents_dismissed_total``, ``warmpool_agent_replacements_total``,
  ``warmpool_agent_setup_failures_total``, ``warmpool_calls_total``,
  ``warmpool_call_failures_total``;
- histograms: ``warmpool_checkout_wait_seconds`` (time waited for an agent) and
  ``warmpool_call_duration_seconds`` (time an agent took to handle a signal), in the
  buckets of :data:`celery_warmpool.timings.BUCKETS`.

Counters are sums over the node's live processes: when a prefork child is replaced, its
share restarts from zero, which Prometheus's ``rate()`` reads as a counter reset.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import timings
from .errors import ConfigurationError
from .status import PoolStatus

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .extension import WarmPool

__all__ = ["MetricsExporter", "PoolCollector", "exporter_for", "metrics_address"]

logger = logging.getLogger(__name__)

ADDRESS_SETTING = "warmpool_metrics_address"
ADDRESS_VARIABLE = "WARMPOOL_METRICS_ADDRESS"

#: Gauges read off a pool's status: metric name, status attribute, help.
GAUGES = (
    ("warmpool_size", "size", "Base agents configured for the pool on this node."),
    ("warmpool_max_overflow", "max_overflow",
     "Overflow agents the pool may build on this node."),
    ("warmpool_overflow_agents", "overflow", "Overflow agents alive."),
    ("warmpool_waiting_checkouts", "waiting", "Checkouts waiting for an agent."),
    ("warmpool_replacing_agents", "replacing", "Base agents being rebuilt."),
)
#: Counters read off a pool's counters: metric name (``_total`` added), counter, help.
COUNTERS = (
    ("warmpool_checkouts", "checkouts", "Agents handed out."),
    ("warmpool_checkins", "checkins", "Agents given back."),
    ("warmpool_checkout_timeouts", "timeouts", "Checkouts that gave up waiting for an agent."),
    ("warmpool_exhausted", "exhausted",
     "Checkouts that found no idle agent and no overflow room."),
    ("warmpool_overflow_agents_created", "overflow_created", "Overflow agents built."),
    ("warmpool_overflow_agents_dismissed", "dismissed", "Overflow agents closed."),
    ("warmpool_agent_replacements", "replacements", "Broken or worn-out agents replaced."),
    ("warmpool_agent_setup_failures", "failures", "Agent setup() calls that failed."),
    ("warmpool_calls", "calls", "Signals handled by the pool's agents."),
    ("warmpool_call_failures", "call_failures", "Signals whose handling failed."),
)
#: Histograms: metric name, timing recorded, help.
HISTOGRAMS = (
    ("warmpool_checkout_wait_seconds", timings.CHECKOUT_WAIT,
     "Seconds a checkout waited for an agent."),
    ("warmpool_call_duration_seconds", timings.CALL_DURATION,
     "Seconds an agent took to handle a signal."),
)
LABELS = ("pool", "node")


def metrics_address(app: Any, environ: dict[str, str] | None = None,
                    ) -> tuple[str, int] | None:
    """Where ``/metrics`` is served: ``(host, port)``, or ``None`` when metrics are off.

    Read from ``WARMPOOL_METRICS_ADDRESS``, else ``app.conf.warmpool_metrics_address``:
    ``"host:port"``, ``":port"`` or ``"port"`` (all interfaces), ``"[::1]:port"``.

    Raises:
        ConfigurationError: the address cannot be read.
    """
    source = os.environ if environ is None else environ
    given = source.get(ADDRESS_VARIABLE) or app.conf.get(ADDRESS_SETTING)
    if not given:
        return None
    text = str(given).strip()
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ConfigurationError(
            f"metrics address {text!r} is not 'host:port' (from {ADDRESS_VARIABLE} or "
            f"{ADDRESS_SETTING})", field=ADDRESS_SETTING)
    return host, number


class PoolCollector:
    """A Prometheus collector reading a node's pools when scraped."""

    def __init__(self, warm: WarmPool) -> None:
        self.warm = warm

    def collect(self) -> Iterator[Any]:
        """Every pool's gauges, counters and histograms on this node, summed over processes."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        node = self.warm.node or ""
        by_pool: dict[str, list[PoolStatus]] = {}
        for status in self.warm.process_statuses():
            by_pool.setdefault(status.pool, []).append(status)
        pools = {name: PoolStatus.combine(name, parts, node=node)
                 for name, parts in sorted(by_pool.items())}
        histograms = timings.merged(self._process_timings())

        agents = GaugeMetricFamily("warmpool_agents", "Agents alive, by state.",
                                   labels=(*LABELS, "state"))
        processes = GaugeMetricFamily("warmpool_processes", "Processes hosting the pool.",
                                      labels=LABELS)
        for name, status in pools.items():
            agents.add_metric((name, node, "idle"), status.available)
            agents.add_metric((name, node, "checked_out"), status.checked_out)
            processes.add_metric((name, node), len(status.processes))
        yield agents
        yield processes
        for metric, attribute, text in GAUGES:
            gauge = GaugeMetricFamily(metric, text, labels=LABELS)
            for name, status in pools.items():
                gauge.add_metric((name, node), getattr(status, attribute))
            yield gauge
        for metric, counter_name, text in COUNTERS:
            counter = CounterMetricFamily(metric, text, labels=LABELS)
            for name, status in pools.items():
                counter.add_metric((name, node), getattr(status.counters, counter_name))
            yield counter
        for metric, timing, text in HISTOGRAMS:
            family = HistogramMetricFamily(metric, text, labels=LABELS)
            for name in sorted(set(pools) | set(histograms)):
                histogram = histograms.get(name, {}).get(timing, timings.Histogram())
                buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
                family.add_metric((name, node), buckets, histogram.sum)
            yield family

    def _process_timings(self) -> list[dict[str, Any]]:
        board = self.warm.board
        if board is not None:
            from .extension import STALE_AFTER

            return [report.get("timings", {}) for report in board.read_all(max_age=STALE_AFTER)]
        return [timings.recorder.snapshot()] if self.warm.host is not None else []


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class MetricsExporter:
    """Serves one node's ``/metrics`` over HTTP from the worker's main process."""

    def __init__(self, warm: WarmPool, address: tuple[str, int]) -> None:
        self.warm = warm
        self.address = address
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        """The address being served, once started (the real port if 0 was asked)."""
        if self._server is None:
            return None
        host = self.address[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._server.server_port}/metrics"

    def start(self) -> None:
        """Serve ``/metrics`` in a daemon thread. A busy address is logged, not fatal."""
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(PoolCollector(self.warm))
        host, port = self.address
        try:
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            logger.error("warm pools: cannot serve metrics on %s:%d: %s", host, port, exc)
            return
        logger.info("warm pools: metrics on %s", self.url)

    def stop(self) -> None:
        """Stop serving. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)


def exporter_for(warm: WarmPool) -> MetricsExporter | None:
    """The metrics exporter a worker of ``warm``'s app should run, or ``None`` if off.

    Call it in the worker's main process before children fork: it starts recording
    timings, which the children then do too.

    Raises:
        ConfigurationError: an address is given but ``prometheus-client`` is missing,
            or the address cannot be read.
    """
    address = metrics_address(warm.app)
    if address is None:
        return None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'celery-warmpool[prometheus]' "
            f"(or unset {ADDRESS_VARIABLE} / {ADDRESS_SETTING})",
            field=ADDRESS_SETTING) from None
    timings.recorder.enable()
    return MetricsExporter(warm, address)
