"""The backlog board: what each node holds of each pool's work, where others read it.

Every node reports, per hosted pool, its :class:`~celery_warmpool.core.status.PoolLoad`
(calls reserved and not started, calls running, its capacity once warm, its drain
rate) into one Redis hash per pool queue, ``warmpool.backlog.<queue>``, a field per
node::

    HSET warmpool.backlog.warmpool.search worker1@host "2 4 4 37.500 1765130000250"

the numbers, then when the report expires in milliseconds of the Redis server's own
clock (stamped by the server, so the nodes' clocks do not matter). A report not
refreshed within :data:`TTL` seconds is ignored by every reader, so a node that dies
drops out by then; one that stops withdraws its fields.

The board lives in the broker when it is Redis, so that a caller's admission check
(:mod:`celery_warmpool.client.admission`) reads the nodes' reserved calls in the same
script that pushes the call; else in the result store when it is Redis (callers read
it there for a refused call's ``retry_after``, the metrics for the pool's backlog);
else there is none (:meth:`BacklogBoard.of` is ``None``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from ..core.status import PoolLoad

__all__ = ["REFRESH", "TTL", "BacklogBoard", "board_key", "decode", "encode", "totals"]

logger = logging.getLogger(__name__)

#: Seconds a node's report stays valid, and the longest a node goes without refreshing it.
TTL: Final = 3.0
REFRESH: Final = 1.0

#: Stamps a node's report with its expiry on the server's clock
#: (KEYS: the pool's hash; ARGV: node, numbers, TTL in ms).
_WRITE = """
pcall(redis.replicate_commands)
local now = redis.call('TIME')
local expires = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. expires)
-- The hash outlives its longest-lived report, so that it goes once no node reports.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""
#: The reports still valid, as a flat list of node, numbers (KEYS: the pool's hash).
_READ = """
pcall(redis.replicate_commands)
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local found = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
    local expires = tonumber(string.match(fields[i + 1], '(%d+)$'))
    if expires and expires > ms then
        found[#found + 1] = fields[i]
        found[#found + 1] = fields[i + 1]
    end
end
return found
"""


def board_key(queue: str) -> str:
    """The board's hash for the pool whose queue is ``queue`` (before any key prefix)."""
    return f"warmpool.backlog.{queue}"


def encode(load: PoolLoad) -> str:
    """A node's report as the board keeps it (the expiry is added by the server)."""
    return f"{load.reserved} {load.running} {load.capacity} {load.drain_rate:.3f}"


def decode(value: str | bytes) -> PoolLoad:
    """A report read back from the board (its expiry dropped).

    Raises:
        ValueError: the value is not a report.
    """
    text = value.decode() if isinstance(value, bytes) else value
    reserved, running, capacity, rate, *_ = text.split()
    return PoolLoad(reserved=int(reserved), running=int(running), capacity=int(capacity),
                    drain_rate=float(rate))


class BacklogBoard:
    """The board in one Redis database (see the module), keys under ``prefix``."""

    def __init__(self, client: Any, prefix: str = "", owner: Any = None) -> None:
        self.client = client
        self.prefix = prefix
        #: What keeps the client's connections open (a kombu connection), released by
        #: :meth:`close`.
        self._owner = owner
        self._write = client.register_script(_WRITE)
        self._read = client.register_script(_READ)

    @classmethod
    def of(cls, app: Any) -> BacklogBoard | None:
        """``app``'s board: in its Redis broker, else its Redis result store, else none.

        A broker board has a connection of its own (kombu's Redis channel, so the
        broker's transport options and key prefix are the ones kombu uses); close it
        with :meth:`close`.
        """
        connection = app.connection_for_write()
        if connection.transport.driver_type == "redis":
            channel = connection.default_channel
            from redis import Redis

            return cls(Redis(connection_pool=channel.pool), channel.global_keyprefix,
                       owner=connection)
        connection.release()
        client = getattr(app.backend, "client", None)
        if client is None or not hasattr(client, "register_script"):
            return None
        return cls(client)

    def key(self, queue: str) -> str:
        """The full key of ``queue``'s hash."""
        return self.prefix + board_key(queue)

    def report(self, queue: str, node: str, load: PoolLoad, ttl: float = TTL) -> None:
        """Record ``node``'s ``load`` of the pool of ``queue``, valid for ``ttl`` seconds."""
        self._write(keys=[self.key(queue)], args=[node, encode(load), int(ttl * 1000)])

    def withdraw(self, queue: str, node: str) -> None:
        """Forget ``node``'s report of the pool of ``queue`` (it stops hosting it)."""
        self.client.hdel(self.key(queue), node)

    def read(self, queue: str) -> dict[str, PoolLoad]:
        """Every node's valid report of the pool of ``queue``, by node."""
        flat = self._read(keys=[self.key(queue)])
        found: dict[str, PoolLoad] = {}
        for node, value in zip(flat[::2], flat[1::2], strict=True):
            name = node.decode() if isinstance(node, bytes) else str(node)
            try:
                found[name] = decode(value)
            except ValueError:
                logger.warning("backlog board %s: unreadable report of %s: %r",
                               self.key(queue), name, value)
        return found

    def close(self) -> None:
        """Release the board's own connection, if it has one."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.release()


def totals(loads: Mapping[str, PoolLoad]) -> PoolLoad:
    """The nodes' reports summed into one."""
    return PoolLoad(reserved=sum(load.reserved for load in loads.values()),
                    running=sum(load.running for load in loads.values()),
                    capacity=sum(load.capacity for load in loads.values()),
                    drain_rate=sum(load.drain_rate for load in loads.values()))
