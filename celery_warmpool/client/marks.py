"""The keys a call keeps in the result store besides its reply: cancel marks, streams.

**Cancel marks** tell the workers not to start a call whose caller stopped waiting.

Revoking a Celery task is a broadcast every worker keeps in memory, lost when a worker
restarts, and it only skips tasks not yet started. A cancel mark is a key in the result
store, written when a caller leaves a call (a cancelled coroutine, an interrupted thread,
a closed stream) and kept as long as the call could still be waited for: the worker reads
it before it starts a call (and drops the call unrun), and a running action reads it
through ``context.cancelled``.

**Streams**: the chunks of a streaming call go to a Redis Stream named after its task id
(and are published on a channel of the same name); its reader says how far it has read
in a key beside it (see :mod:`celery_warmpool.worker.streams`).
"""

from __future__ import annotations

from typing import Any

from ..core.marks import taken_key

__all__ = ["cancel_key", "is_cancelled", "mark_cancelled", "read_key", "stream_key"]

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
    the call later finds it taken and drops it unrun, at no cost of its own (see
    :mod:`celery_warmpool.core.marks`).
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
