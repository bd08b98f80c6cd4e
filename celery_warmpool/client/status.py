"""Reading pool status from the worker nodes that host the pools."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from ..configuration import PoolConfiguration
from ..core.errors import UnknownPool
from ..core.status import PoolStatus
from .delivery import Delivery

__all__ = ["StatusReader"]

logger = logging.getLogger(__name__)


class StatusReader:
    """Asks worker nodes for their pools' status with the ``warmpool_status`` command."""

    def __init__(self, app: Any, configuration: PoolConfiguration) -> None:
        self.app = app
        self.configuration = configuration
        self.delivery = Delivery(app)

    def status(self, pool: str, timeout: float = 1.0) -> PoolStatus:
        """``pool``'s status summed over every node that hosts it, per node inside.

        Raises:
            UnknownPool: the pool is not configured, or no worker answered for it.
            BrokerUnavailable: the broker could not be reached within ``timeout``.
        """
        self.configuration.spec(pool)
        parts = self.collect(pool, timeout=timeout).get(pool, [])
        if not parts:
            raise UnknownPool(f"no worker hosting pool {pool!r} answered within {timeout}s",
                              pool)
        return PoolStatus.combine(pool, parts)

    def collect(self, pool: str | None = None, timeout: float = 1.0,
                destination: Sequence[str] | None = None) -> dict[str, list[PoolStatus]]:
        """Every node's status of ``pool`` (or of all pools), by pool name.

        With ``destination`` (node names) only those nodes are asked, and the wait ends
        as soon as each has answered.

        Raises:
            BrokerUnavailable: the broker could not be reached within ``timeout``.
        """
        nodes = list(destination) if destination else None
        replies = self.delivery.publish(
            lambda: self.app.control.broadcast(
                "warmpool_status", arguments={"pool": pool}, reply=True, timeout=timeout,
                destination=nodes, limit=len(nodes) if nodes else None),
            time.monotonic() + timeout, timeout)
        found: dict[str, list[PoolStatus]] = {}
        for reply in replies or []:
            for node, report in reply.items():
                if not isinstance(report, dict):
                    # A worker of another app on the same broker, which has no such
                    # command, answers with an error text.
                    logger.debug("node %s gave no pool status: %r", node, report)
                    continue
                for name, data in report.items():
                    found.setdefault(name, []).append(PoolStatus.model_validate(data))
        return found
