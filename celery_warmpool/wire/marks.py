"""The marks a call keeps in the result store besides its reply: taken, cancelled, streams.

They are plain keys, named here for the callers and the workers alike (which write them
with their own Redis clients); nothing here imports Celery.

**The taken mark**: how a caller learns that a worker took its call.

A Redis broker can lose a call after the caller's publish succeeded: a server that shuts
down serves a worker's ``BRPOP`` in its last event-loop turn, records the pop in its
append-only file and exits before the reply leaves, so the message is gone from the
queue and no worker ever sees it. Nothing on the broker tells such a call from one still
queued, so the worker that takes a call marks it, in the result store, before it starts
it:

- key :data:`TAKEN_KEY` (``warmpool:taken:<task id>``), written with ``SET ... NX PX``
  through the result store's own client (so under its ``global_keyprefix`` if any);
- value :func:`taken_value`: JSON ``{"node": ..., "pid": ..., "at": <unix time>}``;
- it lives until the call's deadline plus :data:`TAKEN_MARGIN` seconds: past its
  deadline no copy of a call may start, so the mark is not needed longer.

Because the mark is set only if absent, it is also the claim: of several copies of one
call (same task id), only the copy whose worker set the mark runs, and any other copy is
dropped unrun and unanswered. A caller may therefore publish a call again, with the same
task id and deadline, while no mark exists, without the work running twice.

Casts are marked too (with a Redis result store), but they are delivered at least once,
so their mark also says which *copy* took the cast: ``0`` for the message as first sent,
``n`` for the ``n``-th copy its caller sent again because no mark appeared after the
broker came back (see :mod:`celery_warmpool.client.resends`). A cast's message that
finds its own copy number in the mark runs again: the broker or the worker delivering
the same message again after the process running it died, as at least once means. One
that finds another copy's number is dropped: a copy sent again never runs beside the
copy it stands in for. A cast's mark lives :data:`CAST_MARGIN` seconds past its deadline,
longer than its caller keeps it to send again (:data:`CAST_KEPT`).

**Cancel marks** tell the workers not to start a call whose caller stopped waiting.
Revoking a Celery task is a broadcast every worker keeps in memory, lost when a worker
restarts, and it only skips tasks not yet started. A cancel mark is a key written when a
caller leaves a call (a cancelled coroutine, an interrupted thread, a closed stream) and
kept as long as the call could still be waited for: the worker reads it before it starts
a call that waited for an agent (and drops the call unrun), and a running action reads it
through ``context.cancelled``. A caller that leaves before any worker took the call also
sets its taken mark, so that the worker drops it at its claim.

**Streams**: the chunks of a streaming call go to a Redis Stream named after its task id
(and are published on a channel of the same name); its reader says how far it has read
in a key beside it (see :mod:`celery_warmpool.worker.streams`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .queues import is_redis

__all__ = ["CAST_KEPT", "CAST_MARGIN", "CLAIM", "TAKEN_KEY", "TAKEN_MARGIN", "TakenMark",
           "cancel_key", "is_cancelled", "loses_popped_messages", "mark_cancelled",
           "read_key", "stream_key", "taken_key", "taken_ttl", "taken_value"]

#: The key of a call's mark, formatted with the call's task id.
TAKEN_KEY = "warmpool:taken:{task_id}"
#: Seconds a mark outlives its call's deadline (room for clocks that disagree).
TAKEN_MARGIN = 60.0
#: Seconds a caller keeps a cast it sent, to send it again if no worker took it.
CAST_KEPT = 300.0
#: Seconds a cast's mark outlives its deadline: longer than its caller keeps it.
CAST_MARGIN = CAST_KEPT + TAKEN_MARGIN


@dataclass(frozen=True)
class TakenMark:
    """Who took a call, when (unix time), and which copy of it (casts: see the module)."""

    node: str
    pid: int
    at: float
    copy: int = 0

    @classmethod
    def parse(cls, value: str | bytes) -> TakenMark:
        """The mark stored as ``value`` (what :func:`taken_value` wrote).

        Raises:
            ValueError: ``value`` is not such a mark.
        """
        try:
            data = json.loads(value)
            return cls(node=str(data["node"]), pid=int(data["pid"]), at=float(data["at"]),
                       copy=int(data.get("copy", 0)))
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a taken mark: {value!r}") from exc


#: Marks a call or cast taken and reads its cancel mark, in one round trip.
#: KEYS: the taken mark, the cancel mark. ARGV: this process's mark, its lifetime (ms).
#: Returns ``{1}`` when the mark is set here, ``{0}`` when the caller cancelled the call,
#: ``{2, value}`` when the mark was set before (by another copy, or by a caller that left:
#: ``value`` says which).
CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return {0}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1}
end
return {2, redis.call('GET', KEYS[1])}
"""
#: What :data:`CLAIM` answers first.
CANCELLED_BY_CALLER, MINE, HELD = 0, 1, 2


def loses_popped_messages(app: Any) -> bool:
    """Whether ``app``'s broker can lose a message a worker popped (Redis, see the module):
    only then are calls and casts marked taken, and sent again after an outage. RabbitMQ
    keeps a message until it is acknowledged, and delivers it again if its consumer goes
    away first; a lost copy cannot happen there, so neither marks nor copies are needed."""
    return is_redis(app)


def taken_key(task_id: str) -> str:
    """The key of the mark of the call sent as ``task_id``."""
    return TAKEN_KEY.format(task_id=task_id)


def taken_value(node: str, pid: int, at: float, copy: int = 0) -> str:
    """The value a worker stores as its mark: JSON ``node``, ``pid``, ``at``, ``copy``."""
    return json.dumps({"node": node, "pid": pid, "at": at, "copy": copy})


def taken_ttl(deadline: float | None, now: float, margin: float = TAKEN_MARGIN) -> float:
    """Seconds a mark made at ``now`` lives, for work due to start by ``deadline``.

    Work without a deadline is marked for ``margin`` seconds (:data:`TAKEN_MARGIN` for
    calls, :data:`CAST_MARGIN` for casts).
    """
    left = 0.0 if deadline is None else max(0.0, deadline - now)
    return left + margin


# -- cancel marks and streams ------------------------------------------------------------

#: The key of a call's cancel mark, by its task id.
CANCEL_KEY = "warmpool:cancelled:{task_id}"
#: The taken mark a caller leaves on a call it cancelled before any worker took it.
CANCELLED = '{"cancelled": true}'
#: The key (a Redis Stream) and pub/sub channel of a call's chunks, by its task id.
STREAM_KEY = "warmpool:stream:{task_id}"


def cancel_key(task_id: str) -> str:
    """The key of the cancel mark of the call ``task_id``."""
    return CANCEL_KEY.format(task_id=task_id)


def mark_cancelled(client: Any, *, task_id: str, seconds: float) -> None:
    """Mark the call ``task_id`` cancelled for ``seconds`` (a Redis client).

    The call's taken mark is set too, unless a worker set it already: a worker that takes
    the call later finds it taken and drops it unrun, at no cost of its own.
    """
    pipe = client.pipeline(transaction=False)
    pipe.set(taken_key(task_id), CANCELLED, nx=True, px=max(1, int(seconds * 1000)))
    pipe.set(cancel_key(task_id), b"1", px=max(1, int(seconds * 1000)))
    pipe.execute()


def is_cancelled(client: Any, task_id: str) -> bool:
    """Whether the call ``task_id`` was cancelled by its caller (a Redis client)."""
    return bool(client.exists(cancel_key(task_id)))


def stream_key(task_id: str) -> str:
    """The Redis Stream (and channel) that carries the chunks of call ``task_id``."""
    return STREAM_KEY.format(task_id=task_id)


def read_key(task_id: str) -> str:
    """Where the reader of call ``task_id`` says how many chunks it has read."""
    return f"{stream_key(task_id)}:read"
