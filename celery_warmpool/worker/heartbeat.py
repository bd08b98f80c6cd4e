"""The node's heartbeat: it keeps the node's membership record fresh while it runs.

Announced as soon as the node is ready (its agents warm), refreshed every heartbeat from
a daemon thread of the worker's main process, withdrawn at shutdown. A node that dies
without withdrawing drops out when its record expires (three heartbeats).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..wire.membership import Membership, NodeRecord

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """Announces ``record()`` every heartbeat until stopped."""

    def __init__(self, membership: Membership, record: Callable[[], NodeRecord]) -> None:
        self.membership = membership
        self.record = record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._node: str | None = None

    def start(self) -> None:
        """Announce now, then every heartbeat from a daemon thread."""
        if not self._announce():
            return  # no membership store: nothing to keep fresh
        self._thread = threading.Thread(target=self._loop, name="warmpool-heartbeat",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and withdraw the record (the node is going away)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        if self._node is not None:
            try:
                self.membership.withdraw(self._node)
            except Exception:  # the broker is gone too: the record expires by itself
                logger.warning("warm pools: could not withdraw node %s from membership",
                               self._node, exc_info=True)
            self._node = None

    def _loop(self) -> None:
        while not self._stop.wait(self.membership.heartbeat):
            self._announce()

    def _announce(self) -> bool:
        try:
            record = self.record()
            stored = self.membership.announce(record)
        except Exception:
            logger.warning("warm pools: could not refresh this node's membership record",
                           exc_info=True)
            return True  # keep trying: the result store may come back
        if stored:
            self._node = record.node
        return stored
