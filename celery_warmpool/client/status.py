"""Reading pool status from the worker nodes that host the pools.

With membership records (see :mod:`..wire.membership`) the live nodes are asked by name, and the
answer is complete as soon as each has answered: a node that is recorded but does not
answer within the timeout is reported as not answering, not left out. Without records
(a result backend that keeps none, or no node recorded for the pool) every node is asked
and the whole timeout is waited out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..configuration import PoolConfiguration
from ..core.arguments import pool_name, seconds
from ..core.errors import UnknownPool
from ..core.status import PoolStatus
from ..wire.membership import Membership, NodeRecord
from ..wire.queues import queue_length
from ..wire.scoped import scoped
from .delivery import Delivery

__all__ = ["StatusReader", "StatusReport"]

logger = logging.getLogger(__name__)


@dataclass
class StatusReport:
    """What the nodes said, by pool, and who was asked but did not answer."""

    pools: dict[str, list[PoolStatus]] = field(default_factory=dict)
    #: Nodes that are recorded as alive (hosting the pool asked about) and did not answer.
    not_answering: list[NodeRecord] = field(default_factory=list)
    #: Whether the nodes to ask came from membership records (else: whoever answered).
    from_membership: bool = False
    #: Per pool: the calls queued in the broker (see :meth:`StatusReader.queued`).
    queued: dict[str, int | None] = field(default_factory=dict)


class StatusReader:
    """Asks worker nodes for their pools' status with the ``warmpool_status`` command."""

    def __init__(self, app: Any, configuration: PoolConfiguration) -> None:
        self.app = app
        self.configuration = configuration
        self.delivery = Delivery(app)
        self.membership = Membership(app)

    def status(self, pool: str, timeout: float = 1.0) -> PoolStatus:
        """``pool``'s status summed over every node that hosts it, per node inside.

        Recorded nodes that did not answer are listed in ``not_answering``.

        Raises:
            InvalidArgument: ``timeout`` is not a number of seconds from 0.001 to 86400.
            UnknownPool: the pool is not configured, or no worker answered for it.
            BrokerUnavailable: the broker could not be reached within ``timeout``.
        """
        timeout = seconds("timeout", timeout)
        self.configuration.spec(pool_name(pool))
        report = self.report(pool, timeout=timeout, queued=True)
        parts = report.pools.get(pool, [])
        silent = [record.node for record in report.not_answering]
        if not parts:
            why = f" (recorded but silent: {', '.join(silent)})" if silent else ""
            raise UnknownPool(f"no worker hosting pool {pool!r} answered within "
                              f"{timeout}s{why}", pool)
        return PoolStatus.combine(pool, parts).model_copy(
            update={"not_answering": silent, "queued": report.queued.get(pool)})

    def queued(self, pool: str) -> int | None:
        """The calls of ``pool`` queued in the broker now (``None`` if it cannot be read).

        Every list of a priority queue on Redis, the ready messages on RabbitMQ: those a
        node took are in its ``reserved`` and ``running`` (see
        :class:`~celery_warmpool.core.status.PoolLoad`).
        """
        spec = self.configuration.spec(pool)
        try:
            with self._connection() as connection:
                return queue_length(connection, spec.queue)
        except Exception as exc:  # the status stands without it
            logger.warning("could not read the length of queue %s: %r", spec.queue, exc)
            return None

    def nodes(self, pool: str | None = None, timeout: float = 1.0) -> list[NodeRecord]:
        """The live nodes hosting ``pool`` (every pool, if ``None``), by name.

        From membership records; without them, from the nodes that answer a status
        broadcast within ``timeout``.

        Raises:
            InvalidArgument: ``timeout`` is not a number of seconds from 0.001 to 86400.
        """
        timeout = seconds("timeout", timeout)
        if pool is not None:
            self.configuration.spec(pool_name(pool))
        live = self.membership.live(pool)
        if live is not None:
            return live
        return [NodeRecord(node=node, pools=sorted(pools), execution_pool="unknown",
                           started_at=0.0, pid=0)
                for node, pools in sorted(self._answering(pool, timeout).items())]

    def collect(self, pool: str | None = None, timeout: float = 1.0,
                destination: Sequence[str] | None = None) -> dict[str, list[PoolStatus]]:
        """Every node's status of ``pool`` (or of all pools), by pool name.

        Raises:
            BrokerUnavailable: the broker could not be reached within ``timeout``.
        """
        return self.report(pool, timeout, destination).pools

    def report(self, pool: str | None = None, timeout: float = 1.0,
               destination: Sequence[str] | None = None, *,
               queued: bool = False) -> StatusReport:
        """What the nodes say of ``pool`` (or of all pools), and who did not answer;
        with ``queued``, the calls each pool has queued in the broker too.

        Only the nodes in ``destination`` are asked if it is given; else the live nodes
        from membership records, if there are any. Either way the wait ends as soon as
        each has answered.

        Raises:
            BrokerUnavailable: the broker could not be reached within ``timeout``.
        """
        records: dict[str, NodeRecord] = {}
        nodes = list(destination) if destination else None
        if nodes is None:
            # No records at all (no node running, or none that keeps records under this
            # app's key): ask whoever listens, and wait out the timeout.
            records = {record.node: record for record in self.membership.live(pool) or ()}
            nodes = list(records) or None
        replies = self.command("warmpool_status", {"pool": pool}, timeout, nodes)
        report = StatusReport(from_membership=bool(records))
        answered = set()
        for reply in replies:
            for node, answer in reply.items():
                if not isinstance(answer, dict):
                    # A worker of another app on the same broker, which has no such
                    # command, answers with an error text.
                    logger.debug("node %s gave no pool status: %r", node, answer)
                    continue
                answered.add(node)
                for name, data in answer.items():
                    report.pools.setdefault(name, []).append(PoolStatus.model_validate(data))
        report.not_answering = [records.get(node) or _unrecorded(node)
                                for node in nodes or () if node not in answered]
        if queued:
            report.queued = {name: self.queued(name) for name in report.pools
                             if name in self.configuration.specs}
        return report

    def command(self, name: str, arguments: dict[str, Any], timeout: float,
                nodes: list[str] | None = None) -> list[dict[str, Any]]:
        """Send the control command ``name`` to ``nodes`` (every node if ``None``) and
        return their replies; with ``nodes``, the wait ends once each has answered.

        Raises:
            InvalidArgument: ``timeout`` is not a number of seconds from 0.001 to 86400.
            BrokerUnavailable: the broker could not be reached within ``timeout``.
        """
        timeout = seconds("timeout", timeout)
        def broadcast() -> list[dict[str, Any]]:
            with self._connection() as connection:
                return self.app.control.broadcast(
                    name, arguments=arguments, reply=True, timeout=timeout,
                    destination=nodes, limit=len(nodes) if nodes else None,
                    connection=connection) or []

        replies: list[dict[str, Any]] = self.delivery.publish(
            broadcast, time.monotonic() + timeout, timeout)
        return replies

    def _connection(self) -> Any:
        """A broker connection of the package's own pool, for a ``with`` block: status
        reads from many threads at once share a few connections, opened once."""
        return scoped(self.app).producers.connections().acquire(block=True)

    def _answering(self, pool: str | None, timeout: float) -> dict[str, set[str]]:
        pools: dict[str, set[str]] = {}
        for name, statuses in self.report(pool, timeout).pools.items():
            for status in statuses:
                pools.setdefault(status.node or "", set()).add(name)
        return pools


def _unrecorded(node: str) -> NodeRecord:
    return NodeRecord(node=node, pools=[], execution_pool="unknown", started_at=0.0, pid=0)
