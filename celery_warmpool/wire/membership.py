"""Membership: which worker nodes host which pools, kept by the nodes themselves.

Every node that hosts pools records itself (its name, the pools it hosts, its execution
pool, its capacity per pool, when it started) and refreshes the record every
``warmpool_heartbeat`` seconds (2 by default); a record not refreshed for three heartbeats
has expired, so a node that dies drops out within that time. Readers (``warm.nodes()``,
``warm.status()``, ``celery warmpool status``) then ask exactly the live nodes and stop
waiting as soon as all have answered, instead of waiting out a broadcast's timeout.

The records live in the result backend when it is Redis (a sorted set of node names
scored by when each record expires, and a hash of the records), under a key named after
the app. With another result backend there is no membership: readers wait out the
timeout, and say so once in the log.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .scoped import scoped

__all__ = ["HEARTBEAT", "Membership", "NodeRecord"]

logger = logging.getLogger(__name__)

#: Seconds between two refreshes of a node's record (``app.conf.warmpool_heartbeat``).
HEARTBEAT = 2.0
#: Heartbeats a record outlives its last refresh by.
EXPIRES_AFTER = 3


#: Drops the expired nodes' names and records in one step (KEYS: names, records; ARGV: now).
_FORGET_EXPIRED = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
    redis.call('HDEL', KEYS[2], unpack(expired))
end
return #expired
"""


class NodeRecord(BaseModel):
    """What a node says of itself."""

    model_config = ConfigDict(frozen=True)

    node: str
    pools: list[str]
    execution_pool: str
    #: Calls of each pool the node runs at once.
    capacity: dict[str, int] = Field(default_factory=dict)
    started_at: float
    pid: int
    #: When the record was last refreshed (the node's clock, Unix time).
    seen_at: float = 0.0


class Membership:
    """The live nodes of an app, as recorded in its result backend (see the module)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._warned = False

    @property
    def heartbeat(self) -> float:
        return float(self.app.conf.get("warmpool_heartbeat") or HEARTBEAT)

    @property
    def key(self) -> str:
        name = self.app.conf.get("warmpool_membership_key") or (
            f"warmpool:{self.app.main or 'celery'}:nodes")
        return str(name)

    def store(self) -> Any:
        """The Redis client of the result backend, or ``None`` without one (the package's
        own backend's: one per process, whatever the number of threads reading)."""
        client = getattr(scoped(self.app).results.backend, "client", None)
        if client is None or not hasattr(client, "zadd"):
            if not self._warned:
                self._warned = True
                logger.info(
                    "warm pools: the result backend (%s) keeps no membership records: "
                    "status asks every node and waits out its timeout",
                    type(self.app.backend).__name__)
            return None
        return client

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors = getattr(self.app.backend, "connection_errors", ())
        return tuple(errors) or (OSError,)

    def announce(self, record: NodeRecord) -> bool:
        """Record ``record`` as alive for three heartbeats; say whether it was stored."""
        client = self.store()
        if client is None:
            return False
        now = time.time()
        data = record.model_copy(update={"seen_at": now}).model_dump_json()
        pipe = client.pipeline()
        pipe.zadd(self.key, {record.node: now + EXPIRES_AFTER * self.heartbeat})
        pipe.hset(f"{self.key}:records", record.node, data)
        pipe.eval(_FORGET_EXPIRED, 2, self.key, f"{self.key}:records", now)
        pipe.execute()
        return True

    def withdraw(self, node: str) -> None:
        """Forget ``node`` (it is shutting down)."""
        client = self.store()
        if client is None:
            return
        pipe = client.pipeline()
        pipe.zrem(self.key, node)
        pipe.hdel(f"{self.key}:records", node)
        pipe.execute()

    def live(self, pool: str | None = None) -> list[NodeRecord] | None:
        """The live nodes (hosting ``pool``, if given), by name; ``None`` without a store."""
        client = self.store()
        if client is None:
            return None
        try:
            names = [name.decode() if isinstance(name, bytes) else str(name)
                     for name in client.zrangebyscore(self.key, time.time(), "+inf")]
            raws = client.hmget(f"{self.key}:records", names) if names else []
        except self._connection_errors() as exc:
            # The result store is down; the broker may not be: readers ask everyone.
            logger.info("warm pools: membership records unreadable (%s): asking every "
                    "node instead", exc)
            return None
        records = []
        for raw in raws:
            if raw is None:
                continue
            record = NodeRecord.model_validate(json.loads(raw))
            if pool is None or pool in record.pools:
                records.append(record)
        return sorted(records, key=lambda record: record.node)
