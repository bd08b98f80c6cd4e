"""See warm pools work, in one command, on a machine with no server::

    python -m celery_warmpool.demo

It starts a real ``celery worker`` in the background with two warm pools (see
:mod:`celery_warmpool.demo.app`) on an embedded broker and result store kept in a
temporary folder, shows the agents warming up, sends a burst of call-style and
cast-style signals, compares warm agents with an agent built per request, prints the
pool status as ``celery ... warmpool status`` does, then stops the worker (warm
shutdown) and removes the folder. The same demo on Redis::

    python -m celery_warmpool.demo --broker redis://127.0.0.1:6379/0 \\
        --backend redis://127.0.0.1:6379/1
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from ..core.errors import ConfigurationError
from ..core.reply import AgentReply
from ..core.signal import Signal
from ..core.status import PoolStatus
from ..extension import WarmPool
from ..ops.embedded import is_embedded
from ..ops.processes import WorkerProcess
from ..ops.tables import render_status_table

__all__ = ["main"]

APP = "celery_warmpool.demo.app"
#: Worker processes (prefork children); each holds one agent of each pool.
CONCURRENCY = 2
#: Seconds the worker may take to start and warm up.
START_TIMEOUT = 60.0
#: Seconds a warm shutdown may take before the worker is killed.
STOP_TIMEOUT = 30.0

WARM_LINE = re.compile(r"agent warm: pool=(?P<pool>\S+) agent=(?P<agent>\S+) "
                       r"pid=(?P<pid>\d+) setup=(?P<setup>[\d.]+)s")
T = TypeVar("T")

QUERIES = ("red steel", "oak table", "golden lamp", "wool rug", "black leather bag",
           "glass vase", "copper kettle", "linen jacket")


class Demo:
    """One run of the demo; each step prints what it shows."""

    def __init__(self, app: Celery, warm: WarmPool, worker: WorkerProcess) -> None:
        self.app = app
        self.warm = warm
        self.worker = worker
        #: Set once the worker logs that it is ready (it takes messages from then on).
        self.ready = False
        self.started = time.perf_counter()
        self.warm_timings: dict[str, list[float]] = {}
        self.checkouts: dict[str, int] = dict.fromkeys(warm.specs, 0)

    def say(self, text: str = "") -> None:
        click.echo(text)

    def elapsed(self) -> str:
        return f"[{time.perf_counter() - self.started:5.1f}s]"

    def call(self, pool: str, number: int) -> AgentReply:
        """Send the ``number``-th signal to a warm agent of ``pool``; wait for the reply."""
        return self.warm.call(pool, demo_signal(pool, number))

    def cold_call(self, pool: str, number: int) -> Any:
        """Send the same signal to a fresh agent built for it; wait for the reply."""
        task = self.app.tasks["celery_warmpool.demo.cold_call"]
        return task.apply_async((pool, demo_signal(pool, number).to_wire())).get(
            timeout=60, interval=0.01)

    # -- the steps -------------------------------------------------------------------

    def wait_until_warm(self) -> bool:
        """Follow the worker's log until it is ready, printing each agent as it warms."""
        expected = sum(spec.size for spec in self.warm.specs.values())
        pools = ", ".join(f"{name} ({spec.size} agents)" for name, spec in
                          self.warm.specs.items())
        self.say(f"{self.elapsed()} celery worker {self.worker.hostname} started (pid "
                 f"{self.worker.pid}, prefork, {CONCURRENCY} processes); "
                 f"warming up {pools}")
        warm = 0
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.worker.new_lines():
                found = WARM_LINE.search(line)
                if found:
                    warm += 1
                    self.say(f"{self.elapsed()}   {found['pool']:<8} agent warm "
                             f"({warm} of {expected})  setup {float(found['setup']):.2f} s "
                             f"in process {found['pid']}")
                elif f"{self.worker.hostname} ready." in line:
                    self.ready = True
                    self.say(f"{self.elapsed()} worker ready: {warm} agents warm, "
                             "taking signals")
                    return True
            if self.worker.exited():
                break
            time.sleep(0.05)
        if self.worker.exited():
            assert self.worker.process is not None
            click.echo(f"the worker exited (status {self.worker.process.returncode}) before "
                       "it was ready", err=True)
        else:
            click.echo(f"the worker was not ready within {START_TIMEOUT:.0f}s", err=True)
        return False

    def call_burst(self, per_pool: int) -> None:
        """Call-style: ``warm.call`` waits for each reply before sending the next."""
        self.say()
        self.say(f"Call-style burst: {per_pool} warm.call per pool, each waiting for its "
                 "reply")
        for pool in self.warm.specs:
            timings, replies = one_by_one(per_pool, functools.partial(self.call, pool))
            self.warm_timings[pool] = timings
            self.checkouts[pool] += per_pool
            agents = len({reply.agent_id for reply in replies})
            self.say(f"  {pool:<8} {per_pool} replies  median {ms(statistics.median(timings))}"
                     f"  slowest {ms(max(timings))}  from {plural(agents, 'agent')};"
                     f"  last: {summary(replies[-1])}")

    def cast_burst(self, per_pool: int) -> None:
        """Cast-style: ``warm.cast`` returns at once; the results are collected after."""
        self.say()
        total = per_pool * len(self.warm.specs)
        self.say(f"Cast-style burst: {total} warm.cast sent at once, then the results "
                 "collected")
        started = time.perf_counter()
        results = [self.warm.cast(pool, demo_signal(pool, number))
                   for number in range(per_pool) for pool in self.warm.specs]
        cast_seconds = time.perf_counter() - started
        # A cast's result is the handler's list of replies: one for one signal.
        replies = [AgentReply.model_validate(result.get(timeout=60, interval=0.01)[0])
                   for result in results]
        collected = time.perf_counter() - started
        for pool in self.warm.specs:
            self.checkouts[pool] += per_pool
        agents = len({reply.agent_id for reply in replies})
        processes = len({reply.pid for reply in replies})
        self.say(f"  {total} casts sent in {ms(cast_seconds)}; all {len(replies)} results in "
                 f"{ms(collected)} ({len(replies) / collected:.0f} signals/s), served by "
                 f"{plural(agents, 'agent')} in {plural(processes, 'process', 'processes')}")

    def compare(self, cold_per_pool: int) -> None:
        """Warm agents against building and warming an agent for every request."""
        self.say()
        self.say(f"Warm versus cold: the same signals, {cold_per_pool} per pool through a "
                 "plain task that builds, warms up and tears down an agent per request")
        rows: list[tuple[str, str, list[float]]] = []
        ratios = []
        for pool in self.warm.specs:
            timings, _ = one_by_one(cold_per_pool, functools.partial(self.cold_call, pool))
            warm = self.warm_timings[pool]
            rows.append((pool, "warm pool (warm.call)", warm))
            rows.append((pool, "agent per request", timings))
            ratios.append(f"{pool} {statistics.median(timings) / statistics.median(warm):.0f}x")
        self.say(comparison_table(rows))
        self.say(f"  cold / warm (median round trip): {', '.join(ratios)}")

    def show_status(self) -> None:
        """The pools' status, rendered exactly as the ``warmpool status`` command does."""
        self.say()
        self.say(f"Pool status, as `celery -A {APP} warmpool status` prints it:")
        report = self._own_status()
        self.say(render_status_table(report).rstrip("\n"))

    def _own_status(self) -> dict[str, list[PoolStatus]]:
        # Children publish their numbers as they change; wait until every checkout counts.
        deadline = time.monotonic() + 3.0
        while True:
            report = self.warm.status_reader.collect(timeout=1.0,
                                                     destination=[self.worker.hostname])
            counted = {pool: sum(status.counters.checkouts for status in statuses)
                       for pool, statuses in report.items()}
            if counted == self.checkouts or time.monotonic() > deadline:
                return report
            time.sleep(0.1)


def one_by_one(requests: int, send: Callable[[int], T]) -> tuple[list[float], list[T]]:
    """Make ``requests`` requests in turn; return each one's round trip and its result."""
    timings: list[float] = []
    results: list[T] = []
    for number in range(requests):
        started = time.perf_counter()
        results.append(send(number))
        timings.append(time.perf_counter() - started)
    return timings, results


def demo_signal(pool: str, number: int) -> Signal:
    """The ``number``-th signal the demo sends to ``pool``."""
    if pool == "catalog":
        return Signal.new("catalog.search", {"query": QUERIES[number % len(QUERIES)]},
                          source="/celery_warmpool/demo")
    return Signal.new("doc.sign", {"document": f"invoice {number}"},
                      source="/celery_warmpool/demo")


def summary(reply: AgentReply) -> str:
    """A reply's result in a few words."""
    if "matches" in reply.result:
        return f"{reply.result['matches']} matches"
    return f"signature {reply.result['signature'][:12]}..."


def plural(count: int, one: str, many: str | None = None) -> str:
    """``count`` and the noun, singular or plural."""
    return f"{count} {one if count == 1 else many or one + 's'}"


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for people."""
    return f"{seconds * 1000:.1f} ms"


def comparison_table(rows: Sequence[tuple[str, str, list[float]]]) -> str:
    """Round-trip timings as a table: pool, path, requests, median, fastest, slowest."""
    headers = ("pool", "path", "requests", "median", "fastest", "slowest")
    cells = [(pool, path, str(len(timings)), ms(statistics.median(timings)),
              ms(min(timings)), ms(max(timings))) for pool, path, timings in rows]
    widths = [max(len(line[column]) for line in [headers, *cells])
              for column in range(len(headers))]
    lines = []
    for values in [headers, *cells]:
        lines.append("  " + "  ".join(
            value.ljust(width) if column < 2 else value.rjust(width)
            for column, (value, width) in enumerate(zip(values, widths, strict=True))))
    return "\n".join(lines)


def worker_env(broker: str | None, backend: str | None, directory: Path) -> dict[str, str]:
    """What the worker's environment adds: where its broker and results are, this package."""
    if broker is None:
        # Empty, not unset: a WARMPOOL_BROKER_URL of the caller's must not leak through.
        env = {"WARMPOOL_EMBEDDED_DIR": str(directory / "store"), "WARMPOOL_BROKER_URL": "",
               "WARMPOOL_RESULT_BACKEND": ""}
    else:
        env = {"WARMPOOL_BROKER_URL": broker, "WARMPOOL_RESULT_BACKEND": backend or broker}
    # The worker imports this package even when it is run from a source tree.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                      os.environ.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def scratch_directory() -> Iterator[Path]:
    """A temporary folder for the embedded store and the worker's log, removed after."""
    directory = Path(tempfile.mkdtemp(prefix="warmpool-demo-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        click.echo(f"Removed {directory}")


def broker_reachable(app: Celery) -> str | None:
    """``None`` if the broker answers, else why not."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # kombu raises several unrelated types for "cannot connect"
        return f"{type(exc).__name__}: {exc}"
    return None


def run(broker: str | None, backend: str | None, calls: int, casts: int, cold: int) -> int:
    """Run the demo; return the exit status."""
    from .app import make_app

    begun = time.perf_counter()
    with scratch_directory() as directory:
        app, warm = make_app(broker, backend, str(directory / "store"))
        if broker is None:
            click.echo(f"Broker and result store: embedded, in {directory / 'store'} "
                       "(Kombu filesystem transport, Celery file result backend)")
        else:
            click.echo(f"Broker: {maybe_sanitize_url(broker)}  "
                       f"result backend: {maybe_sanitize_url(backend or broker)}")
            problem = broker_reachable(app)
            if problem:
                click.echo(f"cannot reach the broker {broker}: {problem}", err=True)
                return 2
        worker = WorkerProcess(
            APP, pool="prefork", concurrency=CONCURRENCY, broker=None, backend=None,
            nodename=f"demo-{os.getpid()}@{socket.gethostname()}",
            env=worker_env(broker, backend, directory), log_path=directory / "worker.log")
        demo = Demo(app, warm, worker)
        worker.launch()
        completed = False
        try:
            if demo.wait_until_warm():
                demo.call_burst(calls)
                demo.cast_burst(casts)
                demo.compare(cold)
                demo.show_status()
                completed = True
        except Exception as exc:  # a step failed (the worker's log says why): stop, clean up
            click.echo(f"the demo stopped: {type(exc).__name__}: {exc}", err=True)
        finally:
            click.echo()
            click.echo(f"{demo.elapsed()} stopping the worker (warm shutdown)...")
            # A ready worker acts on the shutdown command at once; one still warming up
            # gets SIGTERM.
            status = (worker.shutdown(app, STOP_TIMEOUT) if demo.ready
                      else worker.stop(STOP_TIMEOUT))
            app.close()
            if status is None:
                click.echo(f"the worker did not stop within {STOP_TIMEOUT:.0f}s and was "
                           "killed", err=True)
            else:
                click.echo(f"{demo.elapsed()} worker stopped, exit status {status}")
        if not completed or status != 0:
            click.echo(f"the worker's log ends with:\n{worker.log_tail()}", err=True)
            return 1
    click.echo(f"Done in {time.perf_counter() - begun:.1f} s.")
    return 0


@click.command(name="celery_warmpool.demo")
@click.option("--broker", default=None, metavar="URL",
              help="Run on this broker (e.g. redis://127.0.0.1:6379/0) instead of the "
                   "embedded one.")
@click.option("--backend", default=None, metavar="URL",
              help="Result backend for --broker (default: the broker's URL).")
@click.option("--calls", default=20, show_default=True, type=click.IntRange(min=1),
              help="Call-style signals per pool.")
@click.option("--casts", default=20, show_default=True, type=click.IntRange(min=1),
              help="Cast-style signals per pool.")
@click.option("--cold", default=3, show_default=True, type=click.IntRange(min=1),
              help="Cold requests (an agent built per request) per pool.")
def main(broker: str | None, backend: str | None, calls: int, casts: int,
         cold: int) -> None:
    """Start a worker with two warm pools, use them, show their status, stop it."""
    if broker is not None and is_embedded(broker):
        broker = None
    if backend is not None and broker is None:
        raise click.UsageError("--backend needs --broker")
    try:
        code = run(broker, backend, calls, casts, cold)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        code = 130
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)

