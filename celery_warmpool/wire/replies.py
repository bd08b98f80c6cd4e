"""Replies: stored where Celery stores them, published on the caller's own channel.

Each caller process listens on one Redis pub/sub channel of its own
(:func:`new_reply_channel`, ``warmpool:reply:<random>``), named in every call message it
sends (:attr:`~celery_warmpool.wire.message.CallMessage.reply`). A worker that ends
such a call stores the reply under the task's key as Celery does (so
``AsyncResult(task_id).get()`` and a late reader find it) and publishes it on that
channel, both in one pipeline, as an :func:`envelope` that names the call: the caller's
listener hands it to the call waiting for it by its id, with no subscription per call.
A call message without a channel (sent by Celery's own ``apply_async``) is stored and
published as Celery does.

A worker's reply is stored once, by the copy that took the call (see :mod:`.marks`), so
the read Celery makes before each store (not to overwrite a success stored by another
copy of the task) is left out here.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend

__all__ = ["REPLY_CHANNEL", "RepliesOnChannel", "envelope", "new_reply_channel",
           "opened", "reply_channel_of"]

#: A caller process's reply channel, by a random token.
REPLY_CHANNEL = "warmpool:reply:{token}"


def new_reply_channel() -> str:
    """A reply channel for one caller process (unique: a random token)."""
    return REPLY_CHANNEL.format(token=uuid.uuid4().hex)


def envelope(task_id: str, value: bytes | str) -> bytes:
    """What goes on a reply channel: the call's task id, a space, the stored value."""
    data = value.encode() if isinstance(value, str) else value
    return task_id.encode() + b" " + data


def opened(message: bytes) -> tuple[bytes, bytes]:
    """The task id and the stored value an :func:`envelope` carries."""
    task_id, _, value = message.partition(b" ")
    return task_id, value


def reply_channel_of(request: Any) -> str | None:
    """The reply channel the call ``request`` carries (a Celery request or context), or
    ``None`` (a message Celery sent, or not a pool call's)."""
    args = getattr(request, "args", None)
    if not args or not isinstance(args[0], Mapping):
        return None
    channel = args[0].get("reply")
    return channel if isinstance(channel, str) else None


#: Celery's Redis result backend, untyped in the stubs: its methods are used as they are.
_RedisBackend: Any = RedisBackend


class RepliesOnChannel(_RedisBackend):  # type: ignore[misc]
    """A Redis result backend that publishes a pool call's reply on its caller's channel.

    Mixed in before the app's own Redis backend class (see
    :class:`~celery_warmpool.wire.scoped.ResultStore`).
    """

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        channel = reply_channel_of(request)
        if channel is None:
            return super()._store_result(task_id, result, state, traceback,
                                         request=request, **kwargs)
        pipe = self.client.pipeline(transaction=False)
        self._stored(pipe, task_id, result, state, traceback, request, channel)
        pipe.execute()
        return result

    def store_many(self, outcomes: list[tuple[str, Any, str, Any]]) -> None:
        """Store (and publish) many replies in one round trip: each ``(task_id, result,
        state, request)``, as :meth:`mark_as_done` and :meth:`mark_as_failure` would one
        by one. Celery's own retries are not applied: the caller waits an outage out.

        Raises:
            The result store's connection errors.
        """
        pipe = self.client.pipeline(transaction=False)
        for task_id, result, state, request in outcomes:
            self._stored(pipe, task_id, self.encode_result(result, state), state, None,
                         request, reply_channel_of(request))
        pipe.execute()

    def _stored(self, pipe: Any, task_id: str, result: Any, state: str, traceback: Any,
                request: Any, channel: str | None) -> None:
        """Add one reply's store (and publish) to ``pipe``; published on the task's own key
        as Celery does when its message named no reply channel."""
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request)
        meta["task_id"] = str(task_id)
        value = self.encode(meta)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = self.get_key_for_task(task_id)
        if expires:
            pipe.setex(key, expires, value)
        else:
            pipe.set(key, value)
        if channel is None:
            pipe.publish(key, value)
        else:
            pipe.publish(channel, envelope(str(task_id), value))
