"""The reply listener: one per process, through which every waiting call gets its reply.

Celery's Redis result backend lives in a thread-local: every calling thread gets its own
pub/sub connection and connection pool, and every waiting thread drains its own socket.
Here one listener per process (per result store) owns one pub/sub connection, subscribed
to the result channel of every call in flight, whatever thread or event loop waits for
it, and a small client for the rest (reading stored replies, cancel marks).

- **One reader.** A daemon thread runs the listener's own event loop; it alone reads the
  pub/sub socket and hands each message to the :class:`Mailbox` of its subscription.
  Callers never touch the socket: they ask for a subscription and wait on its mailbox.
- **Nothing missed.** Once Redis confirms a subscription, the listener reads the channel's
  stored value (Celery stores a reply, then publishes it), so a reply stored before the
  subscription reaches its caller too. Reads of many subscriptions go in one ``MGET``.
- **Reconnecting** happens in one place (:meth:`ReplyListener._reconnect`): the listener
  subscribes again to every channel it holds, and each confirmation reads the stored value
  again, so replies stored while the result store was away are read once it is back.
- **Nothing piles up.** A subscription leaves Redis and the listener's table when its
  caller is done with it, on every path (reply, error, deadline, cancellation).
- **Forks.** A listener belongs to the process that made it; a child gets a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import redis.asyncio as aioredis
from celery.backends.redis import RedisBackend, SentinelBackend
from redis import exceptions as redis_errors
from redis.connection import SSLConnection, UnixDomainSocketConnection

from .mailbox import Mailbox

__all__ = ["ReplyListener", "Subscription"]

logger = logging.getLogger(__name__)

#: Seconds between two tries to reach the result store: first and longest.
RECONNECT_FIRST = 0.05
RECONNECT_MOST = 0.5
#: Connections of the listener's command client (catch-up reads, cancel marks).
COMMAND_CONNECTIONS = 4

#: What says "the result store cannot be reached".
OUTAGES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

CatchUp = Callable[[aioredis.Redis], Awaitable[None]]


class Subscription:
    """One channel a caller waits on, and the mailbox where what arrives goes.

    ``key`` is read once the subscription is confirmed (and after every reconnection);
    its value, if any, is put in the mailbox as a published message would be. ``catch_up``,
    if given, runs at the same moments instead, for channels whose missed messages live
    elsewhere (a stream's chunks). With a ``tag``, items go in as ``(tag, data)``, so that
    subscriptions sharing one mailbox can be told apart.
    """

    __slots__ = ("catch_up", "channel", "key", "mailbox", "tag")

    def __init__(self, channel: bytes, key: bytes | None, catch_up: CatchUp | None,
                 mailbox: Mailbox | None, tag: str | None) -> None:
        self.channel = channel
        self.key = key
        self.catch_up = catch_up
        self.mailbox = mailbox or Mailbox()
        self.tag = tag

    def put(self, data: bytes) -> None:
        """Leave ``data`` in the mailbox (tagged, if the subscription has a tag)."""
        self.mailbox.put(data if self.tag is None else (self.tag, data))


class ReplyListener:
    """Listens for the replies of every call of this process (see the module)."""

    #: One listener per process and result store, by the store's address.
    _listeners: ClassVar[dict[tuple[int, str], ReplyListener]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_backend(cls, backend: Any) -> ReplyListener | None:
        """This process's listener for ``backend`` (a Celery result backend), made on
        first use; ``None`` unless the backend is a plain Redis one (not Sentinel)."""
        if not isinstance(backend, RedisBackend) or isinstance(backend, SentinelBackend):
            return None
        url = str(backend.as_uri())
        key = (os.getpid(), url)
        listener = cls._listeners.get(key)
        if listener is None:
            with cls._registry_lock:
                listener = cls._listeners.get(key)
                if listener is None:
                    params = dict(backend.connparams)  # type: ignore[attr-defined]
                    listener = cls._listeners[key] = cls(params, url)
        return listener

    def __init__(self, connection_params: dict[str, Any], url: str) -> None:
        self.url = url
        self._params = _asyncio_params(connection_params)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._requests: deque[tuple[str, Any]] = deque()
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: dict[bytes, Subscription] = {}  # the loop's thread only
        self._catching_up: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # running, so not garbage collected
        self._catch_up_running = False
        self._pubsub: Any = None
        self._client: aioredis.Redis | None = None
        # Set while the pub/sub socket is connected and subscribed to all that is held.
        self._ready = asyncio.Event()
        #: When the result store stopped answering, and why; ``None`` while it answers.
        self.down_since: float | None = None
        self.last_error: BaseException | None = None

    # -- what callers use ------------------------------------------------------------

    @property
    def owned_here(self) -> bool:
        """Whether this process made the listener (a forked child must make its own)."""
        return self._pid == os.getpid()

    def subscribe(self, channel: bytes, key: bytes | None = None, *,
                  catch_up: CatchUp | None = None, mailbox: Mailbox | None = None,
                  tag: str | None = None) -> Subscription:
        """Start listening on ``channel``; what arrives goes to the subscription's mailbox
        (a new one, or ``mailbox``). See :class:`Subscription` for the rest.

        Returns at once: the subscription is sent by the listener's thread.
        """
        subscription = Subscription(channel, key, catch_up, mailbox, tag)
        self._request("subscribe", subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop listening for ``subscription`` (returns at once)."""
        self._request("unsubscribe", subscription)

    def submit(self, command: Callable[[aioredis.Redis], Awaitable[Any]]) -> None:
        """Run ``command(client)`` on the listener's client, without waiting for it.

        For writes a caller must not wait on (a cancel mark written as a call is
        abandoned); a failure is logged.
        """
        self._request("command", command)

    def outage(self) -> BaseException | None:
        """Why the result store cannot be reached now, or ``None`` if it can."""
        return self.last_error if self.down_since is not None else None

    @property
    def subscriptions(self) -> int:
        """Channels the listener holds (callers still waiting)."""
        return len(self._subscriptions)

    # -- requests from any thread --------------------------------------------------------

    def _request(self, kind: str, item: Any) -> None:
        with self._lock:
            self._requests.append((kind, item))
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
            loop = self._loop if self._loop is not None else self._start_locked()
        loop.call_soon_threadsafe(self._flush)

    def _start_locked(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        threading.Thread(target=self._run, args=(loop, started), daemon=True,
                         name="warmpool-reply-listener").start()
        started.wait()
        return loop

    def _run(self, loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        pool = aioredis.ConnectionPool(**self._params)
        self._pubsub = aioredis.Redis(connection_pool=pool).pubsub()
        # Blocking: past its connections a command waits for one rather than fail.
        self._client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
            **{**self._params, "max_connections": COMMAND_CONNECTIONS}))
        self._spawn(self._read_forever())
        started.set()
        loop.run_forever()

    # -- the listener's thread -------------------------------------------------------

    def _flush(self) -> None:
        with self._lock:
            requests = list(self._requests)
            self._requests.clear()
            self._flush_scheduled = False
        added: dict[bytes, Subscription] = {}
        removed: list[bytes] = []
        item: Any
        for kind, item in requests:
            if kind == "subscribe":
                added[item.channel] = item
                self._subscriptions[item.channel] = item
            elif kind == "unsubscribe":
                channel: bytes = item.channel
                if self._subscriptions.get(channel) is item:
                    del self._subscriptions[channel]
                if added.pop(channel, None) is None:
                    removed.append(channel)  # sent before: unsubscribe in Redis too
            else:
                self._spawn(self._command(item))
        if added or removed:
            self._spawn(self._send(list(added), removed))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, added: list[bytes], removed: list[bytes]) -> None:
        if not self._ready.is_set():
            return  # the (re)connection subscribes to every channel held then
        try:
            if added:
                await self._pubsub.subscribe(*added)
            if removed:
                await self._pubsub.unsubscribe(*removed)
        except OUTAGES as exc:
            # The reader notices too and reconnects, subscribing to all that is held.
            logger.debug("reply listener: subscribing failed (%r)", exc)

    async def _command(self, command: Callable[[aioredis.Redis], Awaitable[Any]]) -> None:
        assert self._client is not None
        try:
            await command(self._client)
        except OUTAGES as exc:
            logger.debug("reply listener: a command to the result store failed: %r", exc)

    async def _read_forever(self) -> None:
        await self._reconnect(None)
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except OUTAGES as exc:
                await self._reconnect(exc)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        subscription = self._subscriptions.get(message["channel"])
        if subscription is None:
            return  # a caller that is gone; its unsubscribe is on its way
        if kind == "message":
            subscription.put(message["data"])
        elif kind == "subscribe":
            self._catch_up(subscription)

    def _catch_up(self, subscription: Subscription) -> None:
        """Read what ``subscription`` may have missed before it was confirmed."""
        if subscription.catch_up is not None:
            self._spawn(self._command(subscription.catch_up))
            return
        if subscription.key is None:
            return
        self._catching_up.append(subscription)
        if not self._catch_up_running:
            self._catch_up_running = True
            self._spawn(self._read_stored())

    async def _read_stored(self) -> None:
        # One MGET for every subscription confirmed meanwhile: under load, many.
        assert self._client is not None
        try:
            while self._catching_up:
                batch = [subscription for subscription in self._catching_up
                         if subscription.channel in self._subscriptions]
                self._catching_up = []
                if not batch:
                    continue
                try:
                    values = await self._client.mget([sub.key or b"" for sub in batch])
                except OUTAGES as exc:
                    logger.debug("reply listener: reading stored replies failed: %r", exc)
                    self._catching_up[:0] = batch
                    await asyncio.sleep(RECONNECT_MOST)
                    continue
                for subscription, value in zip(batch, values, strict=True):
                    if value is not None:
                        subscription.put(value)  # type: ignore[arg-type]  # bytes: no decoding
        finally:
            self._catch_up_running = False

    async def _reconnect(self, error: BaseException | None) -> None:
        """(Re)connect the pub/sub socket and subscribe to every channel held.

        Retries until the result store answers. Each subscription's confirmation then
        reads what it may have missed (see :meth:`_catch_up`).
        """
        self._ready.clear()
        if error is not None and self.down_since is None:
            self.down_since, self.last_error = time.monotonic(), error
            logger.debug("reply listener: result store %s unreachable: %r", self.url, error)
        delay = RECONNECT_FIRST
        while True:
            try:
                await self._subscribe_all()
                break
            except OUTAGES as exc:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                self.last_error = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MOST)
        self._ready.set()
        if self.down_since is not None:
            logger.warning(
                "result store %s was unreachable for %.1fs (%s: %s); reconnected: the %d "
                "calls waiting read their replies", self.url,
                time.monotonic() - self.down_since, type(self.last_error).__name__,
                self.last_error, len(self._subscriptions))
            self.down_since = None

    async def _subscribe_all(self) -> None:
        await self._pubsub.aclose()  # a fresh socket; channels are sent below
        await self._pubsub.connect()
        sent: set[bytes] = set()
        # Until nothing is left: subscriptions may come while one is sent.
        while missing := [channel for channel in self._subscriptions if channel not in sent]:
            await self._pubsub.subscribe(*missing)
            sent.update(missing)


def _asyncio_params(params: dict[str, Any]) -> dict[str, Any]:
    """Celery's (synchronous) Redis connection parameters, for redis' asyncio client."""
    result = {name: value for name, value in params.items() if value is not None}
    connection_class = result.pop("connection_class", None)
    if connection_class is not None:
        if issubclass(connection_class, UnixDomainSocketConnection):
            result["connection_class"] = aioredis.UnixDomainSocketConnection
        elif issubclass(connection_class, SSLConnection):
            result["connection_class"] = aioredis.SSLConnection
    # The pub/sub socket waits for messages as long as it takes.
    result.pop("socket_timeout", None)
    result.pop("max_connections", None)
    return result
