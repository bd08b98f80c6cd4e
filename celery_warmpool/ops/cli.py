"""``celery -A proj warmpool ...``: warm pools from the command line.

Installed as a Celery subcommand through the ``celery.commands`` entry point, so it
appears in ``celery --help``::

    celery -A proj warmpool status                  # a table per pool, every node
    celery -A proj warmpool status --pool search    # one pool
    celery -A proj warmpool status --json           # for machines
    celery -A proj warmpool status --watch 2        # refresh every 2 s until Ctrl-C
    celery -A proj warmpool status -d w1@host       # only these nodes (comma separated)
    celery -A proj warmpool dead-letters search     # casts that could not succeed
    celery -A proj warmpool dead-letters search --replay   # cast them again
    celery -A proj warmpool dead-letters search --purge    # drop them

The status comes from the ``warmpool_status`` broadcast every worker with warm pools
answers. No answer is an error (exit status 69, ``EX_UNAVAILABLE``), as it is for
``celery status``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click
from celery import Celery
from celery.bin.base import (
    COMMA_SEPARATED_LIST,
    CeleryCommand,
    CeleryOption,
    CLIContext,
    handle_preload_options,
)
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

from ..client.dead_letters import DeadLetter
from ..core.errors import BrokerUnavailable, UnknownPool
from ..core.status import PoolStatus

__all__ = ["render_status_json", "render_status_table", "status_report", "warmpool"]

#: The table's columns after the node / process one: header and how to read the value.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("state", "state"),
    ("size", "size"),
    ("available", "available"),
    ("checked out", "checked_out"),
    ("overflow", "overflow"),
    ("waiting", "waiting"),
    ("checkouts", "counters.checkouts"),
    ("timeouts", "counters.timeouts"),
    ("replacements", "counters.replacements"),
    ("failures", "counters.failures"),
)


#: Fields that describe one process, empty on a node's or a pool's total.
PROCESS_FIELDS = {"pid", "process_index", "updated_at"}


def _value(status: PoolStatus, path: str) -> str:
    found: Any = status
    for name in path.split("."):
        found = getattr(found, name)
    return str(found)


def _rows(status: PoolStatus) -> list[tuple[str, PoolStatus]]:
    """The table's rows for one pool: each node, its processes under prefork, a total."""
    nodes = status.nodes
    rows: list[tuple[str, PoolStatus]] = []
    for name in sorted(nodes):
        node = nodes[name]
        rows.append((name or "(this process)", node))
        # Prefork children report their slot; threads and solo hold one process per node.
        for process in sorted(node.processes, key=lambda leaf: leaf.process_index or 0):
            if process.process_index is not None:
                rows.append((f"  process {process.process_index} (pid {process.pid})",
                             process))
    if len(nodes) > 1:
        rows.append(("total", status))
    return rows


def _table(rows: Sequence[tuple[str, PoolStatus]]) -> list[str]:
    headers = ["node / process", *(header for header, _ in COLUMNS)]
    cells = [[label, *(_value(status, path) for _, path in COLUMNS)]
             for label, status in rows]
    widths = [max(len(line[column]) for line in [headers, *cells])
              for column in range(len(headers))]
    text_columns = {0, 1}  # labels and states read left to right; numbers align right

    def line(values: Sequence[str]) -> str:
        return "  ".join(value.ljust(width) if column in text_columns else value.rjust(width)
                         for column, (value, width) in enumerate(zip(values, widths,
                                                                     strict=True))).rstrip()

    return [line(headers), *(line(values) for values in cells)]


def render_status_table(report: Mapping[str, Iterable[PoolStatus]]) -> str:
    """The status of each pool as text tables, one per pool, sorted by pool name.

    ``report`` maps a pool's name to its statuses as nodes report them (what
    :meth:`StatusReader.collect` returns). Each table has a row per node, a row per
    process under prefork, and a total row when more than one node hosts the pool.
    """
    blocks: list[str] = []
    for name in sorted(report):
        status = PoolStatus.combine(name, report[name])
        nodes = len(status.nodes)
        heading = (f"pool {name}: {status.state}, {status.available} of {status.alive} "
                   f"agents available, {nodes} {'node' if nodes == 1 else 'nodes'}")
        lines = [heading, *(f"  {line}" for line in _table(_rows(status)))]
        failing = [leaf for leaf in status.processes or [status] if leaf.last_error]
        if failing:
            # The most recent report last, with where it came from, so it can be acted on.
            leaf = failing[-1]
            where = ", ".join(part for part in (leaf.node, leaf.pid and f"pid {leaf.pid}")
                              if part)
            lines.append(f"  last error{f' ({where})' if where else ''}: {leaf.last_error}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else ""


def render_status_json(report: Mapping[str, Iterable[PoolStatus]]) -> dict[str, Any]:
    """The status of each pool as JSON data: totals, then each node with its processes."""
    document: dict[str, Any] = {}
    for name in sorted(report):
        status = PoolStatus.combine(name, report[name])
        nodes = status.nodes
        document[name] = {
            **status.model_dump(mode="json", exclude={"processes", "node", *PROCESS_FIELDS}),
            "nodes": {node: nodes[node].model_dump(mode="json", exclude=PROCESS_FIELDS)
                      for node in sorted(nodes)},
        }
    return document


def status_report(app: Celery, pool: str | None = None, timeout: float = 1.0,
                  destination: Sequence[str] | None = None) -> dict[str, list[PoolStatus]]:
    """Every answering node's status of ``pool`` (or of every pool), by pool name.

    With ``destination`` only the named nodes are asked.

    Raises:
        click.BadParameter: ``pool`` is not one of the app's pools.
        CeleryCommandException: the app has no warm pools, the broker cannot be
            reached, or no worker answered.
    """
    warm = _warm_pool_of(app)
    if pool is not None:
        try:
            warm.spec(pool)
        except UnknownPool as exc:
            raise click.BadParameter(str(exc), param_hint="'--pool'") from None
    try:
        report: dict[str, list[PoolStatus]] = warm.status_reader.collect(
            pool, timeout=timeout, destination=destination)
    except BrokerUnavailable as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from None
    if not report:
        hosting = f"hosting pool {pool!r} " if pool else "with warm pools "
        among = f" (asked: {', '.join(destination)})" if destination else ""
        raise CeleryCommandException(
            message=f"no worker {hosting}answered within {timeout}s{among}",
            exit_code=EX_UNAVAILABLE)
    return report


@click.group(name="warmpool")
def warmpool(**kwargs: Any) -> None:
    """Warm agent pools: status and dead letters."""


@warmpool.command(cls=CeleryCommand)
@click.option("-p", "--pool", cls=CeleryOption, default=None, metavar="NAME",
              help_group="Status Options", help="Only this pool (default: every pool).")
@click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Status Options", help="Print JSON instead of tables.")
@click.option("-w", "--watch", cls=CeleryOption, type=click.FloatRange(min=0.1),
              default=None, metavar="SECONDS", help_group="Status Options",
              help="Refresh every SECONDS until Ctrl-C (with --json: one line each).")
@click.option("-t", "--timeout", cls=CeleryOption, type=click.FloatRange(min=0.0),
              default=1.0, help_group="Status Options",
              help="Seconds to wait for workers to answer.")
@click.option("-d", "--destination", cls=CeleryOption, type=COMMA_SEPARATED_LIST,
              default=None, help_group="Status Options",
              help="Comma separated list of node names to ask (default: every node).")
@click.pass_context
@handle_preload_options
def status(ctx: click.Context, pool: str | None, as_json: bool, watch: float | None,
           timeout: float, destination: list[str] | None, **kwargs: Any) -> None:
    """Show each warm pool: per node and process, its numbers and counters."""
    cli: CLIContext = ctx.obj
    if watch is None:
        _print_status(cli, status_report(cli.app, pool, timeout, destination), as_json)
        return
    try:
        while True:
            try:
                report = status_report(cli.app, pool, timeout, destination)
            except CeleryCommandException as exc:
                # A watcher outlives a worker restart: say so and keep watching.
                cli.error(f"{time.strftime('%H:%M:%S')} {exc.message}")
            else:
                if not as_json:
                    # A terminal shows the latest table in place; a pipe gets them in turn.
                    if sys.stdout.isatty():
                        click.clear()
                    cli.echo(f"{time.strftime('%H:%M:%S')}  every {watch:g}s "
                             "(Ctrl-C to stop)\n")
                _print_status(cli, report, as_json)
                if not as_json and not sys.stdout.isatty():
                    cli.echo()
            time.sleep(watch)
    except KeyboardInterrupt:
        return


def _print_status(cli: CLIContext, report: Mapping[str, Iterable[PoolStatus]],
                  as_json: bool) -> None:
    if as_json:
        cli.echo(json.dumps(render_status_json(report), sort_keys=True))
    else:
        cli.echo(render_status_table(report), nl=False)


def _warm_pool_of(app: Celery) -> Any:
    warm = getattr(app, "warmpool", None)
    if warm is None:
        raise CeleryCommandException(
            message=f"the app {app.main!r} has no warm pools: create WarmPool(app) in the "
                    "module given to -A", exit_code=EX_UNAVAILABLE)
    return warm


def render_dead_letters(letters: Sequence[DeadLetter]) -> str:
    """Dead letters as a table, oldest first: when, task, signal, attempts, error."""
    headers = ("dead at", "task", "signal", "attempts", "node", "error")
    rows = [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.dead_at)),
             letter.task_id or "-", str(letter.signal.get("type")), str(letter.attempts),
             letter.node or "-", f"{letter.error_type}: {letter.error}")
            for letter in letters]
    widths = [max(len(line[column]) for line in [headers, *rows])
              for column in range(len(headers) - 1)]
    lines = ["  ".join([*(value.ljust(width) for value, width in zip(line, widths,
                                                                    strict=False)),
                        line[-1]]).rstrip() for line in [headers, *rows]]
    return "\n".join(lines) + "\n"


@warmpool.command(name="dead-letters", cls=CeleryCommand)
@click.argument("pool")
@click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Dead Letter Options", help="Print JSON instead of a table.")
@click.option("--replay", cls=CeleryOption, is_flag=True, help_group="Dead Letter Options",
              help="Cast every letter's signal to the pool again, and remove it.")
@click.option("--purge", cls=CeleryOption, is_flag=True, help_group="Dead Letter Options",
              help="Remove every letter without running it.")
@click.pass_context
@handle_preload_options
def dead_letters(ctx: click.Context, pool: str, as_json: bool, replay: bool, purge: bool,
                 **kwargs: Any) -> None:
    """List a pool's dead letters (casts that could not succeed); replay or purge them."""
    cli: CLIContext = ctx.obj
    if replay and purge:
        raise click.UsageError("give --replay or --purge, not both")
    warm = _warm_pool_of(cli.app)
    try:
        spec = warm.spec(pool)
    except UnknownPool as exc:
        raise click.BadParameter(str(exc), param_hint="'POOL'") from None
    letters_of = warm.dead_letters
    try:
        if replay:
            count = letters_of.take(spec, lambda letter: warm.cast(pool, letter.signal))
            cli.echo(f"replayed {count} dead letters of pool {pool!r} as casts")
        elif purge:
            count = letters_of.purge(spec)
            cli.echo(f"purged {count} dead letters of pool {pool!r}")
        else:
            letters = letters_of.read(spec)
            if as_json:
                cli.echo(json.dumps([letter.model_dump(mode="json") for letter in letters]))
            elif letters:
                cli.echo(render_dead_letters(letters), nl=False)
            else:
                cli.echo(f"no dead letters for pool {pool!r} (queue {spec.dead_letter_queue})")
    except BrokerUnavailable as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from None
    except warm.status_reader.delivery.outages() as exc:
        raise CeleryCommandException(
            message=f"could not reach the broker {warm.status_reader.delivery.broker_url}: "
                    f"{type(exc).__name__}: {exc}", exit_code=EX_UNAVAILABLE) from None
