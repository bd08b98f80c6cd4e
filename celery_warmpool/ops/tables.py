"""What ``celery warmpool`` prints: pool status as tables or JSON, dead letters, silent nodes."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core.status import PoolStatus
from ..wire.dead_letters import DeadLetter
from ..wire.membership import NodeRecord

__all__ = ["render_dead_letters", "render_not_answering", "render_status_json",
           "render_status_table"]

#: The table's columns after the node / process one: header and how to read the value.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("state", "state"),
    ("size", "size"),
    ("available", "available"),
    ("checked out", "checked_out"),
    ("overflow", "overflow"),
    ("waiting", "waiting"),
    ("held / window", "held"),
    ("checkouts", "counters.checkouts"),
    ("timeouts", "counters.timeouts"),
    ("replacements", "counters.replacements"),
    ("failures", "counters.failures"),
)


#: Fields that describe one process, empty on a node's or a pool's total.
PROCESS_FIELDS = {"pid", "process_index", "updated_at"}


def _value(status: PoolStatus, path: str) -> str:
    if path == "held":  # the pool's messages a node holds, of the most it may (per node)
        return f"{status.taken}/{status.window}" if status.reservations else ""
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


def render_status_table(report: Mapping[str, Iterable[PoolStatus]],
                        queued: Mapping[str, int | None] | None = None) -> str:
    """The status of each pool as text tables, one per pool, sorted by pool name.

    ``report`` maps a pool's name to its statuses as nodes report them (what
    :meth:`StatusReader.collect` returns), ``queued`` to the calls queued in the broker.
    Each table has a row per node, a row per process under prefork, and a total row
    when more than one node hosts the pool.
    """
    blocks: list[str] = []
    for name in sorted(report):
        status = _combined(name, report[name], queued)
        nodes = len(status.nodes)
        heading = (f"pool {name}: {status.state}, {status.available} of {status.alive} "
                   f"agents available, {nodes} {'node' if nodes == 1 else 'nodes'}")
        lines = [heading, f"  {_backlog(status)}",
                 *(f"  {line}" for line in _table(_rows(status)))]
        failing = [leaf for leaf in status.processes or [status] if leaf.last_error]
        if failing:
            # The most recent report last, with where it came from, so it can be acted on.
            leaf = failing[-1]
            where = ", ".join(part for part in (leaf.node, leaf.pid and f"pid {leaf.pid}")
                              if part)
            lines.append(f"  last error{f' ({where})' if where else ''}: {leaf.last_error}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else ""


def render_status_json(report: Mapping[str, Iterable[PoolStatus]],
                       queued: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """The status of each pool as JSON data: totals (the backlog with the calls
    ``queued`` in the broker), then each node with its processes."""
    document: dict[str, Any] = {}
    for name in sorted(report):
        status = _combined(name, report[name], queued)
        nodes = status.nodes
        document[name] = {
            **status.model_dump(mode="json", exclude={"processes", "node", *PROCESS_FIELDS}),
            "nodes": {node: nodes[node].model_dump(mode="json", exclude=PROCESS_FIELDS)
                      for node in sorted(nodes)},
        }
    return document


def _combined(name: str, statuses: Iterable[PoolStatus],
              queued: Mapping[str, int | None] | None) -> PoolStatus:
    status = PoolStatus.combine(name, statuses)
    return status.model_copy(update={"queued": (queued or {}).get(name)})


def _backlog(status: PoolStatus) -> str:
    """The pool's backlog line: its parts, the capacity, how fast it drains."""
    queued = "?" if status.queued is None else str(status.queued)
    return (f"backlog {status.backlog}: {queued} queued, {status.reserved} reserved, "
            f"{status.running} running; capacity {status.capacity}, draining "
            f"{status.drain_rate:.1f} calls/s")


def render_not_answering(records: Sequence[NodeRecord], now: float | None = None) -> str:
    """A line per node recorded as alive that did not answer."""
    now = time.time() if now is None else now
    lines = []
    for record in records:
        seen = f", last heartbeat {now - record.seen_at:.1f}s ago" if record.seen_at else ""
        pid = f", pid {record.pid}" if record.pid else ""
        pools = f" (pools {', '.join(record.pools)}{pid}{seen})" if record.pools else ""
        lines.append(f"not answering: {record.node}{pools}")
    return "".join(f"{line}\n" for line in lines)


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
