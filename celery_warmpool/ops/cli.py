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
from collections.abc import Sequence
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

from ..client.status import StatusReport
from ..core.errors import BrokerUnavailable, UnknownPool
from .tables import (
    render_dead_letters,
    render_not_answering,
    render_status_json,
    render_status_table,
)

__all__ = ["status_report", "warmpool"]

def status_report(app: Celery, pool: str | None = None, timeout: float = 1.0,
                  destination: Sequence[str] | None = None) -> StatusReport:
    """Every answering node's status of ``pool`` (or of every pool), and silent nodes.

    With ``destination`` only the named nodes are asked; else the live nodes from the
    membership records, if there are any.

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
        report: StatusReport = warm.status_reader.report(pool, timeout, destination)
    except BrokerUnavailable as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from None
    if not report.pools:
        hosting = f"hosting pool {pool!r} " if pool else "with warm pools "
        silent = [record.node for record in report.not_answering]
        among = (f" (asked: {', '.join(destination)})" if destination
                 else f" (recorded but silent: {', '.join(silent)})" if silent else "")
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


def _print_status(cli: CLIContext, report: StatusReport, as_json: bool) -> None:
    if as_json:
        document = render_status_json(report.pools)
        for record in report.not_answering:
            for name in record.pools:
                if name in document:
                    document[name].setdefault("not_answering", []).append(record.node)
        cli.echo(json.dumps(document, sort_keys=True))
        return
    cli.echo(render_status_table(report.pools), nl=False)
    if report.not_answering:
        cli.echo(render_not_answering(report.not_answering), nl=False)


def _warm_pool_of(app: Celery) -> Any:
    warm = getattr(app, "warmpool", None)
    if warm is None:
        raise CeleryCommandException(
            message=f"the app {app.main!r} has no warm pools: create WarmPool(app) in the "
                    "module given to -A", exit_code=EX_UNAVAILABLE)
    return warm


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
