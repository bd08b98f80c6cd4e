"""``celery -A proj warmpool ...``: warm pools from the command line.

Installed as a Celery subcommand through the ``celery.commands`` entry point, so it
appears in ``celery --help``::

    celery -A proj warmpool status                  # a table per pool, every node
    celery -A proj warmpool status --pool search    # one pool
    celery -A proj warmpool status --json           # for machines
    celery -A proj warmpool status --watch 2        # refresh every 2 s until Ctrl-C
    celery -A proj warmpool status -d w1@host       # only these nodes (comma separated)
    celery -A proj warmpool resize search --size 4  # a new size on every node hosting it
    celery -A proj warmpool drain search -d w1@host # take a node out without losing a call
    celery -A proj warmpool dead-letters search     # casts that could not succeed
    celery -A proj warmpool dead-letters search --replay   # cast them again
    celery -A proj warmpool dead-letters search --purge    # drop them
    celery -A proj warmpool serve --port 8000       # the HTTP gateway (the http extra)

The status comes from the ``warmpool_status`` broadcast every worker with warm pools
answers. No answer is an error (exit status 69, ``EX_UNAVAILABLE``), as it is for
``celery status``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
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
from ..core.arguments import MIN_SECONDS, seconds
from ..core.errors import BrokerUnavailable, InvalidArgument, UnknownPool
from ..wire.dead_letters import READ_LIMIT
from .tables import (
    render_dead_letters,
    render_not_answering,
    render_status_json,
    render_status_table,
)

__all__ = ["status_report", "warmpool"]

class Seconds(click.ParamType):  # type: ignore[type-arg]
    """A number of seconds, checked as the calls check theirs (see
    :mod:`celery_warmpool.core.arguments`): a usage error otherwise, never a traceback."""

    name = "seconds"

    def __init__(self, minimum: float = MIN_SECONDS) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        name = param.name if param is not None and param.name else "seconds"
        try:
            return seconds(name, value if isinstance(value, float) else float(value),
                           minimum=self.minimum)
        except InvalidArgument as exc:
            self.fail(str(exc), param, ctx)
        except ValueError:
            self.fail(f"{name} must be a number of seconds, got {value!r}", param, ctx)


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
        report: StatusReport = warm.status_reader.report(pool, timeout, destination,
                                                         queued=True)
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
    """Warm agent pools: status, resize, drain, dead letters."""


@warmpool.command(cls=CeleryCommand)
@click.option("-p", "--pool", cls=CeleryOption, default=None, metavar="NAME",
              help_group="Status Options", help="Only this pool (default: every pool).")
@click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Status Options", help="Print JSON instead of tables.")
@click.option("-w", "--watch", cls=CeleryOption, type=Seconds(minimum=0.1),
              default=None, metavar="SECONDS", help_group="Status Options",
              help="Refresh every SECONDS until Ctrl-C (with --json: one line each).")
@click.option("-t", "--timeout", cls=CeleryOption, type=Seconds(),
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
        document = render_status_json(report.pools, report.queued)
        for record in report.not_answering:
            for name in record.pools:
                if name in document:
                    document[name].setdefault("not_answering", []).append(record.node)
        cli.echo(json.dumps(document, sort_keys=True))
        return
    cli.echo(render_status_table(report.pools, report.queued), nl=False)
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
@click.option("--limit", cls=CeleryOption, type=click.IntRange(min=1), default=READ_LIMIT,
              show_default=True, help_group="Dead Letter Options",
              help="List at most this many letters, the oldest first.")
@click.pass_context
@handle_preload_options
def dead_letters(ctx: click.Context, pool: str, as_json: bool, replay: bool, purge: bool,
                 limit: int, **kwargs: Any) -> None:
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
            count = letters_of.take(
                spec, lambda letter: warm.cast(pool, letter.signal, model=letter.model))
            cli.echo(f"replayed {count} dead letters of pool {pool!r} as casts")
        elif purge:
            count = letters_of.purge(spec)
            cli.echo(f"purged {count} dead letters of pool {pool!r}")
        else:
            letters = letters_of.read(spec, limit)
            if as_json:
                cli.echo(json.dumps([letter.model_dump(mode="json") for letter in letters]))
            elif letters:
                cli.echo(render_dead_letters(letters), nl=False)
                depth = letters_of.depth(spec)
                if depth > len(letters):
                    cli.echo(f"(the oldest {len(letters)} of {depth}: --limit shows more)")
            else:
                cli.echo(f"no dead letters for pool {pool!r} (queue {spec.dead_letter_queue})")
    except BrokerUnavailable as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from None
    except warm.status_reader.delivery.outages.errors as exc:
        raise CeleryCommandException(
            message=f"could not reach the broker {warm.status_reader.delivery.broker_url}: "
                    f"{type(exc).__name__}: {exc}", exit_code=EX_UNAVAILABLE) from None


def _nodes_for(warm: Any, pool: str, destination: list[str] | None) -> list[str] | None:
    """The nodes to send a pool's command to: those given, else the live hosts of the pool
    (membership), else ``None`` (every node)."""
    if destination:
        return destination
    live = warm.status_reader.membership.live(pool)
    return None if live is None else [record.node for record in live]


def _command(cli: CLIContext, warm: Any, name: str, pool: str, arguments: dict[str, Any],
             destination: list[str] | None, timeout: float) -> dict[str, dict[str, Any]]:
    """Send a control command about ``pool``; print and return each node's answer."""
    try:
        warm.spec(pool)
    except UnknownPool as exc:
        raise click.BadParameter(str(exc), param_hint="'POOL'") from None
    nodes = _nodes_for(warm, pool, destination)
    if nodes == []:
        raise CeleryCommandException(message=f"no live node hosts pool {pool!r}",
                                     exit_code=EX_UNAVAILABLE)
    try:
        replies = warm.status_reader.command(name, {"pool": pool, **arguments}, timeout,
                                             nodes)
    except BrokerUnavailable as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from None
    answers = {node: answer for reply in replies for node, answer in reply.items()
               if isinstance(answer, dict)}
    if not answers:
        raise CeleryCommandException(
            message=f"no worker hosting pool {pool!r} answered within {timeout}s",
            exit_code=EX_UNAVAILABLE)
    for node in sorted(answers):
        answer = answers[node]
        cli.echo(f"{node}: {answer['ok']}" if "ok" in answer
                 else f"{node}: refused: {answer.get('error')}")
    for node in sorted(set(nodes or ()) - set(answers)):
        cli.echo(f"{node}: no answer within {timeout}s")
    return answers


def _pool_nodes_option(group: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``-d/--destination`` option of a command about one pool."""
    return click.option(
        "-d", "--destination", cls=CeleryOption, type=COMMA_SEPARATED_LIST, default=None,
        help_group=group,
        help="Comma separated list of nodes (default: every node hosting POOL).")


@warmpool.command(cls=CeleryCommand)
@click.argument("pool")
@click.option("-s", "--size", cls=CeleryOption, type=click.IntRange(min=1), required=True,
              help_group="Resize Options", help="The pool's new size on each node.")
@click.option("-m", "--max-overflow", cls=CeleryOption, type=click.IntRange(min=0),
              default=None, help_group="Resize Options",
              help="The pool's new max_overflow (threads, gevent, eventlet).")
@_pool_nodes_option("Resize Options")
@click.option("-t", "--timeout", cls=CeleryOption, type=Seconds(),
              default=2.0, help_group="Resize Options",
              help="Seconds to wait for nodes to answer.")
@click.pass_context
@handle_preload_options
def resize(ctx: click.Context, pool: str, size: int, max_overflow: int | None,
           destination: list[str] | None, timeout: float, **kwargs: Any) -> None:
    """Change a pool's size on its nodes while they serve (prefork: the children)."""
    cli: CLIContext = ctx.obj
    answers = _command(cli, _warm_pool_of(cli.app), "warmpool_resize", pool,
                       {"size": size, "max_overflow": max_overflow}, destination, timeout)
    if any("ok" not in answer for answer in answers.values()):
        ctx.exit(1)


@warmpool.command(cls=CeleryCommand)
@click.argument("pool")
@_pool_nodes_option("Drain Options")
@click.option("--resume", cls=CeleryOption, is_flag=True, help_group="Drain Options",
              help="Take the pool's work again.")
@click.option("--wait/--no-wait", cls=CeleryOption, default=True, help_group="Drain Options",
              help="Wait until the pool is idle on those nodes (the default).")
@click.option("-t", "--timeout", cls=CeleryOption, type=Seconds(),
              default=300.0, help_group="Drain Options",
              help="Seconds to wait for the pool to be idle.")
@click.pass_context
@handle_preload_options
def drain(ctx: click.Context, pool: str, destination: list[str] | None, resume: bool,
          wait: bool, timeout: float, **kwargs: Any) -> None:
    """Stop nodes taking a pool's work, let running work finish, say when it is idle."""
    cli: CLIContext = ctx.obj
    warm = _warm_pool_of(cli.app)
    answers = _command(cli, warm, "warmpool_drain", pool, {"resume": resume}, destination,
                       min(timeout, 5.0))
    draining = sorted(node for node, answer in answers.items() if "ok" in answer)
    if resume or not wait or not draining:
        if len(draining) < len(answers):
            ctx.exit(1)
        return
    if not _wait_until_idle(cli, warm, pool, draining, timeout):
        ctx.exit(1)


def _wait_until_idle(cli: CLIContext, warm: Any, pool: str, nodes: list[str],
                     timeout: float) -> bool:
    """Report each node's work left for ``pool`` until none holds any; False on timeout."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    while True:
        busy: dict[str, int] = {}
        for status in warm.status_reader.collect(pool, timeout=2.0, destination=nodes).get(
                pool, []):
            node = status.node or ""
            taken = status.reservations.get(node, (0, 0))[0]
            busy[node] = max(taken, status.checked_out)
        for node in nodes:
            left = busy.get(node)
            if left is not None and left != last.get(node):
                cli.echo(f"{node}: pool {pool!r} is idle: the node can be stopped"
                         if left == 0 else f"{node}: {left} calls of pool {pool!r} left")
                last[node] = left
        if all(busy.get(node) == 0 for node in nodes):
            return True
        if time.monotonic() >= deadline:
            cli.error(f"pool {pool!r} was not idle on every node within {timeout:g}s")
            return False
        time.sleep(0.5)


@warmpool.command(cls=CeleryCommand)
@click.option("--host", cls=CeleryOption, default="127.0.0.1", help_group="Serve Options",
              help="Address to listen on (default: this machine only).")
@click.option("--port", cls=CeleryOption, type=click.IntRange(min=0, max=65535),
              default=8000, help_group="Serve Options", help="Port to listen on.")
@click.option("--pools", cls=CeleryOption, type=COMMA_SEPARATED_LIST, default=None,
              help_group="Serve Options",
              help="Comma separated list of pools to serve (default: every pool).")
@click.option("--token", cls=CeleryOption, default=None, envvar="WARMPOOL_HTTP_TOKEN",
              help_group="Serve Options",
              help="Require 'Authorization: Bearer TOKEN' (default: $WARMPOOL_HTTP_TOKEN).")
@click.option("--max-body", cls=CeleryOption, type=click.IntRange(min=1), default=1 << 20,
              help_group="Serve Options", help="Largest request body in bytes (413 past it).")
@click.option("--access-log", cls=CeleryOption, is_flag=True, help_group="Serve Options",
              help="Log every request.")
@click.pass_context
@handle_preload_options
def serve(ctx: click.Context, host: str, port: int, pools: list[str] | None,
          token: str | None, max_body: int, access_log: bool, **kwargs: Any) -> None:
    """Serve the pools over HTTP: call, cast, stream, status, OpenAPI, a live page."""
    cli: CLIContext = ctx.obj
    warm = _warm_pool_of(cli.app)
    try:
        from ..http.serve import serve as run
    except ImportError as exc:
        raise CeleryCommandException(
            message=f"serving needs the http extra (pip install 'celery-warmpool[http]'): "
                    f"{exc}", exit_code=EX_UNAVAILABLE) from None
    try:
        run(warm, host=host, port=port, pools=pools, token=token or None,
            max_body=max_body, access_log=access_log)
    except UnknownPool as exc:
        raise click.BadParameter(str(exc), param_hint="'--pools'") from None
