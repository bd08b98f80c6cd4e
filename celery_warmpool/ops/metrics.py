"""Prometheus metrics: each worker node serves its pools' numbers on ``/metrics``.

Install the extra (``pip install "celery-warmpool[prometheus]"``) and give an address::

    app.conf.warmpool_metrics_address = "127.0.0.1:9808"    # or ":9808", all interfaces
    # or in the worker's environment: WARMPOOL_METRICS_ADDRESS=127.0.0.1:9808

Metrics are off unless an address is given (the environment variable wins over the
setting). The worker's main process serves them, for all its processes, with
``prometheus_client``'s multiprocess mode: every process that hosts agents (each prefork
child, or the main process under threads) writes its counters and histograms to its own
files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless that variable is
set), and a scrape sums the files. A dead child's files stay, so a counter never goes
back when a child is replaced. Gauges describe the live processes only and are read from
their current status at scrape time. Every metric has the labels ``pool`` and ``node``:

- gauges: ``warmpool_agents{state="idle"|"checked_out"}`` (agents alive),
  ``warmpool_size`` and ``warmpool_max_overflow`` (configured on the node),
  ``warmpool_overflow_agents``, ``warmpool_waiting_checkouts``,
  ``warmpool_replacing_agents`` (base agents being rebuilt), ``warmpool_processes``;
- counters: ``warmpool_checkouts_total``, ``warmpool_checkins_total``,
  ``warmpool_checkout_timeouts_total``, ``warmpool_exhausted_total`` (checkouts that found
  no agent and no overflow room), ``warmpool_overflow_agents_created_total``,
  ``warmpool_overflow_agents_dismissed_total``, ``warmpool_agent_replacements_total``,
  ``warmpool_agent_setup_failures_total``, ``warmpool_calls_total``,
  ``warmpool_call_failures_total``, ``warmpool_dead_lettered_total``,
  ``warmpool_batches_total``, ``warmpool_streams_total{outcome="started"|"finished"|
  "cancelled"}``, ``warmpool_stream_chunks_total``;
- histograms: ``warmpool_checkout_wait_seconds`` (time waited for an agent) and
  ``warmpool_call_duration_seconds`` (time an agent took to handle a signal), in the
  buckets of :data:`BUCKETS`; ``warmpool_batch_size`` (signals per batch, for pools with
  a :class:`BatchAction`), in :data:`BATCH_BUCKETS`.

Two gauges describe a pool as a whole, whichever node is scraped (``node`` is the node
that read them): ``warmpool_pool_backlog`` (the calls the pool has to serve: queued in the
broker, every list of a priority queue counted, plus reserved and running on every
live node) and ``warmpool_pool_capacity`` (the calls the live nodes run at once, once
their agents are warm). The queued part is read from the broker by the main process at
scrape time, the nodes' parts from the backlog board (see
:mod:`celery_warmpool.wire.backlog`; without one, this node's own). Every node says the
same: aggregate them with ``max by (pool)``, never a sum. They are what an autoscaler
reads (``deploy/keda/``).

Counters follow each process's own pool counters (the numbers ``warmpool status`` shows):
a prefork child brings them up to date each time it publishes its status (on every
change, at most 50 times a second), the main process before it answers a scrape.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..core import telemetry
from ..core.errors import ConfigurationError
from ..core.status import PoolCounters, PoolLoad, PoolStatus
from ..wire.backlog import BacklogBoard, totals
from ..wire.queues import queue_length
from ..wire.scoped import own_connection

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Counter

    from ..worker.runtime import WorkerRuntime

__all__ = ["BUCKETS", "MetricsExporter", "exporter_for", "metrics_address"]

logger = logging.getLogger(__name__)

ADDRESS_SETTING = "warmpool_metrics_address"
ADDRESS_VARIABLE = "WARMPOOL_METRICS_ADDRESS"
DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: Upper bounds (seconds) of the histogram buckets.
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Gauges read off a pool's status: metric name, status attribute, help.
GAUGES = (
    ("warmpool_size", "size", "Base agents configured for the pool on this node."),
    ("warmpool_max_overflow", "max_overflow",
     "Overflow agents the pool may build on this node."),
    ("warmpool_overflow_agents", "overflow", "Overflow agents alive."),
    ("warmpool_waiting_checkouts", "waiting", "Checkouts waiting for an agent."),
    ("warmpool_replacing_agents", "replacing", "Base agents being rebuilt."),
)
#: Counters following a pool's counters: metric name (``_total`` added), counter, help.
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
    ("warmpool_dead_lettered", "dead_lettered", "Casts sent to the dead-letter queue."),
    ("warmpool_batches", "batches", "Batches run by the pool's agents."),
    ("warmpool_stream_chunks", "chunks", "Chunks produced by the pool's streams."),
)
#: Counters with an ``outcome`` label: metric name (``_total`` added), help, and each
#: outcome with the pool counter it follows.
OUTCOME_COUNTERS = (
    ("warmpool_streams",
     "Streaming calls: started, finished with their final reply, or cancelled because "
     "their reader went away (failures count in warmpool_call_failures_total).",
     (("started", "streams_started"), ("finished", "streams_finished"),
      ("cancelled", "streams_cancelled"))),
)
#: Upper bounds of the batch size histogram (signals per batch).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
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


class ProcessMetrics:
    """The counters and histograms one process writes to its multiprocess files."""

    def __init__(self, node: str) -> None:
        from prometheus_client import Counter, Histogram

        self.node = node
        #: Per pool counter: the metric following it, and its labels besides pool and node.
        self.counters: dict[str, tuple[Counter, tuple[str, ...]]] = {
            counter: (Counter(name, text, LABELS, registry=None), ())
            for name, counter, text in COUNTERS}
        for name, text, outcomes in OUTCOME_COUNTERS:
            metric = Counter(name, text, (*LABELS, "outcome"), registry=None)
            for outcome, counter in outcomes:
                self.counters[counter] = (metric, (outcome,))
        self.checkout_wait = Histogram(
            "warmpool_checkout_wait_seconds", "Seconds a checkout waited for an agent.",
            LABELS, buckets=BUCKETS, registry=None)
        self.call_duration = Histogram(
            "warmpool_call_duration_seconds", "Seconds an agent took to handle a signal.",
            LABELS, buckets=BUCKETS, registry=None)
        self.batch_size = Histogram(
            "warmpool_batch_size", "Signals per batch run by an agent.", LABELS,
            buckets=BATCH_BUCKETS, registry=None)
        self._synced: dict[str, PoolCounters] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)
        telemetry.agent_checkout.connect(self._on_checkout, weak=False)
        telemetry.call_stop.connect(self._on_call, weak=False)
        telemetry.call_exception.connect(self._on_call, weak=False)
        telemetry.batch_run.connect(self._on_batch, weak=False)

    def sync(self, statuses: Iterable[PoolStatus], scope: str = "pools") -> None:
        """Bring the counters up to these pool counters of this process.

        ``scope`` keeps apart counts kept in different places of one process (its pools,
        and a prefork main process's own dead letters).
        """
        with self._lock:
            for status in statuses:
                labels = (status.pool, self.node)
                key = f"{scope}:{status.pool}"
                before = self._synced.get(key)
                if before is None:
                    # Every series exists from the start, at zero, not from its first event.
                    before = PoolCounters()
                    self.checkout_wait.labels(*labels)
                    self.call_duration.labels(*labels)
                for counter, (metric, extra) in self.counters.items():
                    series = metric.labels(*labels, *extra)
                    grown = getattr(status.counters, counter) - getattr(before, counter)
                    if grown > 0:
                        series.inc(grown)
                self._synced[key] = status.counters

    def _forget(self) -> None:
        # A new child starts from zero in files of its own.
        self._lock = threading.Lock()
        self._synced = {}

    def _on_checkout(self, sender: Any = None, wait: float = 0.0, **kwargs: Any) -> None:
        pool = getattr(sender, "name", None)
        if pool is not None:
            self.checkout_wait.labels(pool, self.node).observe(wait)

    def _on_batch(self, sender: Any = None, size: int = 0, **kwargs: Any) -> None:
        pool = getattr(sender, "pool_name", None)
        if pool is not None:
            self.batch_size.labels(pool, self.node).observe(size)

    def _on_call(self, sender: Any = None, duration: float = 0.0, **kwargs: Any) -> None:
        # Call events are sent by the agent, which knows its pool once a pool built it; a
        # warm-up's calls are not the pool's (see celery_warmpool.core.warmup).
        pool = getattr(sender, "pool_name", None)
        if pool is not None and not getattr(sender, "warming", False):
            self.call_duration.labels(pool, self.node).observe(duration)


class PoolGauges:
    """A Prometheus collector of the live processes' gauges, read when scraped."""

    def __init__(self, runtime: WorkerRuntime, metrics: ProcessMetrics) -> None:
        self.runtime = runtime
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        """Every pool's gauges on this node, summed over its live processes."""
        from prometheus_client.core import GaugeMetricFamily

        if self.runtime.pools is not None:  # the agents live in this process
            self.metrics.sync(self.runtime.pools.statuses().values())
        self.metrics.sync(self.runtime.main_process_counts(), scope="main")
        node = self.runtime.node or ""
        pools = sorted(self.runtime.node_statuses().items())
        agents = GaugeMetricFamily("warmpool_agents", "Agents alive, by state.",
                                   labels=(*LABELS, "state"))
        processes = GaugeMetricFamily("warmpool_processes", "Processes hosting the pool.",
                                      labels=LABELS)
        for name, status in pools:
            agents.add_metric((name, node, "idle"), status.available)
            agents.add_metric((name, node, "checked_out"), status.checked_out)
            processes.add_metric((name, node), len(status.processes))
        yield agents
        yield processes
        for metric, attribute, text in GAUGES:
            gauge = GaugeMetricFamily(metric, text, labels=LABELS)
            for name, status in pools:
                gauge.add_metric((name, node), getattr(status, attribute))
            yield gauge


class BacklogGauges:
    """A Prometheus collector of each hosted pool's whole backlog and capacity (see the
    module), read when scraped, from the main process only."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self._board: BacklogBoard | None = None
        self._board_read = False
        self._connection: Any = None

    def collect(self) -> Iterator[Any]:
        """``warmpool_pool_backlog`` and ``warmpool_pool_capacity`` of every hosted pool;
        a pool whose broker or board cannot be read now is left out of this scrape."""
        from prometheus_client.core import GaugeMetricFamily

        backlog = GaugeMetricFamily(
            "warmpool_pool_backlog", "Calls the pool has to serve: queued in the broker, "
            "reserved and running on every live node.", labels=LABELS)
        capacity = GaugeMetricFamily(
            "warmpool_pool_capacity", "Calls the pool's live nodes run at once, counting "
            "only nodes whose agents are warm.", labels=LABELS)
        node = self.runtime.node or ""
        for name, spec in sorted(self.runtime.process_specs.items()):
            try:
                queued, load = self._read(name, spec.queue)
            except Exception as exc:
                logger.warning("warm pools: the backlog of %s cannot be read now: %r", name,
                               exc)
                self._forget_connection()
                continue
            backlog.add_metric((name, node), queued + load.reserved + load.running)
            capacity.add_metric((name, node), load.capacity)
        yield backlog
        yield capacity

    def _read(self, pool: str, queue: str) -> tuple[int, PoolLoad]:
        if not self._board_read:
            self._board, self._board_read = BacklogBoard.of(self.runtime.app), True
        if self._board is not None:
            load = totals(self._board.read(queue))
        else:
            load = self.runtime.backlog.loads.get(pool, PoolLoad())
        if self._connection is None:
            self._connection = own_connection(self.runtime.app)
        return queue_length(self._connection, queue), load

    def _forget_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def close(self) -> None:
        """Release the connections it keeps."""
        self._forget_connection()
        board, self._board, self._board_read = self._board, None, False
        if board is not None:
            board.close()


class ProcessFiles:
    """A Prometheus collector of the counters and histograms every process wrote.

    ``prometheus_client``'s multiprocess files, summed when scraped. A file a process has
    only just created (empty until it is sized) holds nothing yet and is passed over:
    reading it would fail the whole scrape.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Any]:
        """Every metric in the folder's files, summed over the processes."""
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [path for path in glob.glob(os.path.join(self.directory, "*.db"))
                 if _sized(path)]
        merge: Any = MultiProcessCollector.merge  # untyped in prometheus_client
        merged: Iterable[Any] = merge(files, accumulate=True)
        return merged


def _sized(path: str) -> bool:
    # A new file is created empty, then sized at once to its first block; the block's
    # header (how much of it is used) starts at zero, which reads as holding nothing.
    try:
        return os.path.getsize(path) >= 8
    except OSError:
        return False


class MetricsExporter:
    """Serves one node's ``/metrics`` over HTTP from the worker's main process."""

    def __init__(self, runtime: WorkerRuntime, address: tuple[str, int], directory: str,
                 owns_directory: bool) -> None:
        self.runtime = runtime
        self.address = address
        self.directory = directory
        self._owns_directory = owns_directory
        self.metrics = ProcessMetrics(runtime.node or "")
        self.backlog = BacklogGauges(runtime)
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
        # First: it brings this process's counters up to date before the files are read.
        registry.register(PoolGauges(self.runtime, self.metrics))
        registry.register(self.backlog)
        registry.register(ProcessFiles(self.directory))
        host, port = self.address
        try:
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            logger.error("warm pools: cannot serve metrics on %s:%d: %s", host, port, exc)
            return
        logger.info("warm pools: metrics on %s", self.url)

    def stop(self) -> None:
        """Stop serving; remove the metrics folder if this exporter made it."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join(5)
        self.backlog.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def exporter_for(runtime: WorkerRuntime) -> MetricsExporter | None:
    """The metrics exporter a worker should run, or ``None`` if metrics are off.

    Call it in the worker's main process before children fork: it switches
    ``prometheus_client`` to multiprocess mode and connects what records the timings,
    which the children then do too.

    Raises:
        ConfigurationError: an address is given but ``prometheus-client`` is missing,
            or the address cannot be read.
    """
    address = metrics_address(runtime.app)
    if address is None:
        return None
    try:
        from prometheus_client import values
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'celery-warmpool[prometheus]' "
            f"(or unset {ADDRESS_VARIABLE} / {ADDRESS_SETTING})",
            field=ADDRESS_SETTING) from None
    directory, owns = _multiprocess_directory()
    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client picks its value class when first imported: switch it now,
        # before any of our metrics exists, so that every process writes files.
        file_backed: Any = values.MultiProcessValue  # untyped in prometheus_client
        values.ValueClass = file_backed()
    exporter = MetricsExporter(runtime, address, directory, owns)
    metrics = exporter.metrics
    runtime.after_publish = lambda: _sync_this_process(runtime, metrics)
    return exporter


def _sync_this_process(runtime: WorkerRuntime, metrics: ProcessMetrics) -> None:
    pools = runtime.pools
    if pools is not None:
        metrics.sync(pools.statuses().values())


def _multiprocess_directory() -> tuple[str, bool]:
    """The folder of the per-process metric files, and whether it was made here."""
    given = os.environ.get(DIRECTORY_VARIABLE)
    if given:
        os.makedirs(given, exist_ok=True)
        return given, False
    made = tempfile.mkdtemp(prefix="warmpool-metrics-")
    os.environ[DIRECTORY_VARIABLE] = made  # children inherit it, and read it
    return made, True
