"""The reply listener: one per process, through which every waiting call gets its reply.

Celery's Redis result backend lives in a thread-local: every calling thread gets its own
pub/sub connection and connection pool, and every waiting thread drains its own socket.
Here one listener per process (per result store) owns one pub/sub connection, subscribed
to the result channel of every call in flight, whatever thread or event loop waits for
it, and one more connection for the rest (reading stored replies, cancel marks).

- **One reader.** A daemon thread alone reads the pub/sub socket and hands each message
  to the :class:`Mailbox` of its subscription. Callers never touch the socket: they ask
  for a subscription (which wakes the thread through a socket pair) and wait on its
  mailbox. Requests that come while the thread is busy go out together.
- **Nothing missed.** Once Redis confirms a subscription, the listener reads the channel's
  stored value (Celery stores a reply, then publishes it), so a reply stored before the
  subscription reaches its caller too. Reads of many subscriptions go in one ``MGET``.
- **Reconnecting** happens in one place (:meth:`ReplyListener._reconnect`): the listener
  subscribes again to every channel it holds, and each confirmation reads the stored value
  again, so replies stored while the result store was away are read once it is back.
- **Nothing piles up.** A subscription leaves Redis and the listener's table when its
  caller is done with it, on every path (reply, error, deadline, cancellation).
- **Forks.** A listener belongs to the process that made it; a child gets a fresh one.

It drives redis-py's (synchronous) connections with a selector rather than redis-py's
asyncio ``PubSub``: measured here, the asyncio client spent about 700 us of CPU per call
on the listener's side (subscribe, read back, message, unsubscribe, each through its
retry and event layers), the connections driven directly a fraction of that.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Final

import redis
from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.utils.url import maybe_sanitize_url
from redis import exceptions as redis_errors

from ..wire.outages import BACKOFF, MOST, REDIS_OUTAGES
from ..wire.replies import new_reply_channel, opened
from .mailbox import Mailbox

__all__ = ["RECONNECTED", "ReplyListener", "Subscription"]

logger = logging.getLogger(__name__)

#: Seconds a connection, a command or the rest of a message may take.
SOCKET_TIMEOUT = 5.0
#: The most channels in one SUBSCRIBE when subscribing again after a reconnection.
SUBSCRIBE_BATCH = 1000
#: Seconds a command run after an outage is tried again while the store fails it.
AFTER_OUTAGE_RETRY = 60.0
#: Names of this machine, as one server's address.
LOCAL_NAMES = {"localhost": "127.0.0.1", "::1": "127.0.0.1"}

#: What says "the result store cannot be reached".
OUTAGES = REDIS_OUTAGES
#: Seconds between two looks at commands waiting to be tried again (and stored replies
#: still to be read).
RETRY_EVERY = MOST

#: Put in the mailbox of every subscription to a stored reply (one with a ``key``, tagged
#: if it has a tag) once the listener is back from an outage of the result store: a call
#: may then ask whether its message was taken.
RECONNECTED: Final = object()

#: A command run on the listener's client: for writes nobody waits on, and read-backs.
Command = Callable[[redis.Redis], Any]


class Subscription:
    """One channel a caller waits on, and the mailbox where what arrives goes.

    ``key`` is read once the subscription is confirmed (and after every reconnection);
    its value, if any, is put in the mailbox as a published message would be. ``catch_up``,
    if given, runs at the same moments instead, for channels whose missed messages live
    elsewhere (a stream's chunks). With a ``tag``, items go in as ``(tag, data)``, so that
    subscriptions sharing one mailbox can be told apart.
    """

    __slots__ = ("catch_up", "channel", "key", "mailbox", "tag", "task_id")

    def __init__(self, channel: bytes, key: bytes | None, catch_up: Command | None,
                 mailbox: Mailbox | None, tag: str | None,
                 task_id: bytes | None = None) -> None:
        self.channel = channel
        #: The call it waits for on the process's reply channel (see ReplyListener.expect).
        self.task_id = task_id
        self.key = key
        self.catch_up = catch_up
        self.mailbox = mailbox or Mailbox()
        self.tag = tag

    def put(self, data: Any) -> None:
        """Leave ``data`` in the mailbox (tagged, if the subscription has a tag)."""
        self.mailbox.put(data if self.tag is None else (self.tag, data))


class ReplyListener:
    """Listens for the replies of every call of this process (see the module)."""

    #: One listener per process and result store, by the store's address.
    _listeners: ClassVar[dict[tuple[int, str], ReplyListener]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_backend(cls, backend: Any, broker_url: str | None = None) -> ReplyListener | None:
        """This process's listener for ``backend`` (a Celery result backend), made on
        first use; ``None`` unless the backend is a plain Redis one (not Sentinel).

        A Redis broker at ``broker_url`` on another server is watched too (see
        :meth:`watch_broker`).
        """
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
        listener.watch_broker(broker_url)  # each app's broker: apps may share a store
        return listener

    def __init__(self, connection_params: dict[str, Any], url: str,
                 role: str = "result store") -> None:
        self.url = url
        #: What this listener's server is to its callers: ``"result store"``, ``"broker"``.
        self.role = role
        # No health checks: redis-py's expects a plain PONG, which a subscribed connection
        # never gives, so it would take every check for an outage.
        self._params = {name: value for name, value in connection_params.items()
                        if value is not None and name not in (
                            "max_connections", "health_check_interval")}
        self._lock = threading.Lock()
        self._requests: deque[tuple[str, Any]] = deque()
        self._woken = False
        self._wake: socket.socket | None = None
        #: This process's reply channel (see celery_warmpool.wire.replies): named in its
        #: calls' messages, subscribed once, whatever the number of calls.
        self.channel = new_reply_channel().encode()
        #: The calls waiting for a reply on that channel, by task id. Changed by callers
        #: (one dictionary operation each), read by the listener's thread.
        self._expected: dict[bytes, Subscription] = {}
        self._started = False
        # The listener thread's own, from here on.
        self._subscriptions: dict[bytes, Subscription] = {}
        self._catching_up: list[Subscription] = []
        self._after_outage: list[Command] = []
        self._brokers: set[tuple[Any, ...]] = set()  # the servers of the brokers watched
        #: Commands to try again while the store fails them, each until a monotonic time.
        self._due: list[tuple[Command, float]] = []
        # redis-py's connections (their methods are untyped).
        self._pubsub: Any = None
        self._reads: Any = None
        self._client: redis.Redis | None = None
        self._selector = selectors.DefaultSelector()
        self._watched: int | None = None  # the pub/sub socket's descriptor, once connected
        #: When the result store stopped answering, and why; ``None`` while it answers.
        self.down_since: float | None = None
        self.last_error: BaseException | None = None

    # -- what callers use ------------------------------------------------------------

    def subscribe(self, channel: bytes, key: bytes | None = None, *,
                  catch_up: Command | None = None, mailbox: Mailbox | None = None,
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

    def expect(self, task_id: str, key: bytes, *, mailbox: Mailbox | None = None,
               tag: str | None = None) -> Subscription:
        """Wait for the reply of call ``task_id`` on this process's reply channel
        (:attr:`channel`, which the call's message must name); ``key`` is where the reply
        is stored, read after every (re)subscription of the channel.

        No command goes to Redis and the listener's thread is not woken: the channel is
        subscribed once for every call. Returns at once.
        """
        subscription = Subscription(self.channel, key, None, mailbox, tag, task_id.encode())
        self._expected[subscription.task_id] = subscription  # type: ignore[index]
        if not self._started:
            self._request("start", None)
        return subscription

    def forget(self, subscription: Subscription) -> None:
        """Stop waiting for the reply ``subscription`` expected (returns at once)."""
        task_id = subscription.task_id
        if task_id is not None and self._expected.get(task_id) is subscription:
            del self._expected[task_id]

    def submit(self, command: Command, *, retry_for: float = 0.0) -> None:
        """Run ``command(client)`` on the listener's thread, without waiting for it.

        For writes a caller must not wait on (a cancel mark written as a call is
        abandoned) and reads whose answer goes to a mailbox. A command the result store
        fails for an outage (or while it loads its data after a restart) is tried again
        for ``retry_for`` seconds; any other failure is logged.
        """
        self._request("command", (command, time.monotonic() + retry_for))

    def after_outage(self, command: Command) -> None:
        """Run ``command(client)`` on the listener's thread each time the result store
        answers again after an outage (tried again while it fails, for a minute).

        Starts the listener if it is not running, so that it watches for outages.
        """
        self._request("after_outage", command)

    def leave(self, why: BaseException, command: Command) -> None:
        """Run a caller's last write (its cancel mark) as it goes away for ``why``.

        An interrupted program (``KeyboardInterrupt``, ``SystemExit``) may exit before
        this thread would run it: it is written now, in the calling thread, on a client
        of its own (a failure is logged). A cancelled coroutine or a closed stream leaves
        it to this thread, so that no event loop waits for it.
        """
        if not isinstance(why, KeyboardInterrupt | SystemExit):
            self.submit(command)
            return
        try:
            command(self._urgent)
        except Exception:
            logger.warning("reply listener: could not write to the result store %s",
                           self.url, exc_info=True)

    @functools.cached_property
    def _urgent(self) -> redis.Redis:
        return redis.Redis(connection_pool=redis.ConnectionPool(
            **{**self._params, "socket_timeout": SOCKET_TIMEOUT / 5,
               "socket_connect_timeout": SOCKET_TIMEOUT / 5}))

    def watch_broker(self, broker_url: str | None) -> None:
        """Take an outage of the Redis broker at ``broker_url`` as one of the result store.

        A broker that restarts can lose a message a worker popped in its last moment (see
        :mod:`celery_warmpool.wire.marks`); calls learn of it from the result store's
        outage when both are one server. A broker on a server of its own is watched by a
        second listener that only holds a connection to it: once it answers again after
        an outage, this listener tells its calls and runs its commands for after an
        outage, as it does after its own. Other brokers (RabbitMQ) lose no popped message
        and are not watched.
        """
        params = _broker_params(broker_url, self._params)
        if params is None or broker_url is None:
            return
        with self._lock:
            if _server(params) in self._brokers:
                return  # watched already, for another app of this process
            self._brokers.add(_server(params))
        watch = ReplyListener(params, str(maybe_sanitize_url(broker_url)), role="broker")
        watch.after_outage(lambda _: self._request("outage over", None))

    def outage(self) -> BaseException | None:
        """Why the result store cannot be reached now, or ``None`` if it can."""
        return self.last_error if self.down_since is not None else None

    @property
    def subscriptions(self) -> int:
        """Channels and calls the listener holds for callers still waiting."""
        return len(self._subscriptions) + len(self._expected)

    # -- requests from any thread --------------------------------------------------------

    def _request(self, kind: str, item: Any) -> None:
        self._started = True
        with self._lock:
            self._requests.append((kind, item))
            if self._woken:
                return  # the thread has not taken the last requests yet: it takes this
            self._woken = True
            wake = self._wake if self._wake is not None else self._start_locked()
        wake.send(b"\0")

    def _start_locked(self) -> socket.socket:
        reader, self._wake = socket.socketpair()
        reader.setblocking(False)
        self._selector.register(reader, selectors.EVENT_READ, "wake")
        threading.Thread(target=self._run, daemon=True, name="warmpool-reply-listener").start()
        return self._wake

    # -- the listener's thread -------------------------------------------------------

    def _run(self) -> None:
        self._reconnect(None)
        while True:
            try:
                self._serve_once()
            except Exception as exc:  # a store's odd answer must not end the listener
                logger.exception("reply listener: unexpected error; reconnecting")
                self._reconnect(exc)

    def _serve_once(self) -> None:
        """Wait for requests or messages, and deal with what came."""
        timeout = RETRY_EVERY if self._catching_up or self._due else None
        for key, _ in self._selector.select(timeout):
            if key.data == "wake":
                _drain(key.fileobj)  # type: ignore[arg-type]
                self._take_requests()
            else:
                self._read_messages()
        if self._catching_up:
            self._read_stored()
        if self._due:
            self._run_due()

    def _take_requests(self) -> None:
        with self._lock:
            requests = list(self._requests)
            self._requests.clear()
            self._woken = False
        added: dict[bytes, Subscription] = {}
        removed: list[bytes] = []
        commands: list[tuple[Command, float]] = []
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
            elif kind == "start":
                pass  # the thread runs now: its connection subscribed the reply channel
            elif kind == "after_outage":
                self._after_outage.append(item)
            elif kind == "outage over":  # the broker's, seen by its watch
                self._outage_over()
            else:
                commands.append(item)
        if self.down_since is None:  # else the reconnection subscribes to all held then
            try:
                self._send("SUBSCRIBE", list(added))
                self._send("UNSUBSCRIBE", removed)
            except OUTAGES as exc:
                self._reconnect(exc)
        for command, until in commands:
            self._command(command, until)

    def _send(self, command: str, channels: list[bytes]) -> None:
        if channels:
            assert self._pubsub is not None
            self._pubsub.send_command(command, *channels)

    def _command(self, command: Command, until: float = 0.0) -> None:
        """Run ``command``; keep it to try again until ``until`` if the store is away."""
        assert self._client is not None
        try:
            command(self._client)
        except OUTAGES as exc:
            logger.debug("reply listener: a command to the result store failed: %r", exc)
            if time.monotonic() < until:
                self._due.append((command, until))
        except Exception:  # refused by the store (read-only, out of memory): go on serving
            logger.exception("reply listener: the result store refused a command")

    def _run_due(self) -> None:
        due, self._due = self._due, []
        for command, until in due:
            self._command(command, until)

    def _read_messages(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        try:
            while pubsub.can_read(timeout=0):
                self._dispatch(pubsub.read_response())
        except OUTAGES as exc:
            self._reconnect(exc)

    def _dispatch(self, message: list[Any]) -> None:
        kind, channel = message[0], message[1]
        if channel == self.channel:
            if kind == b"message":
                task_id, value = opened(message[2])
                expected = self._expected.get(task_id)
                if expected is not None:  # else a caller that is gone
                    expected.put(value)
            elif kind == b"subscribe":
                # Replies stored before the channel was (re)subscribed: read them.
                self._catching_up.extend(self._expected.values())
            return
        subscription = self._subscriptions.get(channel)
        if subscription is None:
            return  # a caller that is gone; its unsubscribe is on its way
        if kind == b"message":
            subscription.put(message[2])
        elif kind == b"subscribe":
            self._catch_up(subscription)

    def _catch_up(self, subscription: Subscription) -> None:
        """Read what ``subscription`` may have missed before it was confirmed."""
        if subscription.catch_up is not None:
            self._command(subscription.catch_up)
        elif subscription.key is not None:
            self._catching_up.append(subscription)  # read after this round of messages

    def _read_stored(self) -> None:
        # One MGET for every subscription confirmed in this round: under load, many.
        batch = [subscription for subscription in self._catching_up
                 if self._still_waiting(subscription)]
        if not batch:
            self._catching_up = []
            return
        reads = self._reads
        assert reads is not None
        try:
            reads.send_command("MGET", *[subscription.key for subscription in batch])
            values = reads.read_response()
        except OUTAGES as exc:
            # Tried again within RETRY_EVERY, or after the reconnection.
            logger.debug("reply listener: reading stored replies failed: %r", exc)
            return
        self._catching_up = []
        for subscription, value in zip(batch, values, strict=True):
            if value is not None:
                subscription.put(value)

    def _still_waiting(self, subscription: Subscription) -> bool:
        if subscription.task_id is not None:
            return self._expected.get(subscription.task_id) is subscription
        return self._subscriptions.get(subscription.channel) is subscription

    def _reconnect(self, error: BaseException | None) -> None:
        """(Re)connect the pub/sub socket and subscribe to every channel held.

        Retries until the result store answers; callers' requests wait meanwhile. Each
        subscription's confirmation then reads what it may have missed (see
        :meth:`_catch_up`).
        """
        if error is not None and self.down_since is None:
            self.down_since, self.last_error = time.monotonic(), error
            logger.debug("reply listener: result store %s unreachable: %r", self.url, error)
        pauses = BACKOFF.pauses()
        while True:
            try:
                self._connect()
                break
            except OUTAGES as exc:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                self.last_error = exc
                time.sleep(next(pauses))
        if self.down_since is not None:
            waiting = (f": the {len(self._subscriptions)} calls waiting read their replies"
                       if self.role == "result store" else "")
            logger.warning(
                "%s %s was unreachable for %.1fs (%s: %s); reconnected%s", self.role,
                self.url, time.monotonic() - self.down_since, type(self.last_error).__name__,
                self.last_error, waiting)
            self.down_since = None
            self._outage_over()

    def _outage_over(self) -> None:
        """Tell every call waiting that an outage is over, and run the commands for it."""
        for subscription in [*self._subscriptions.values(), *self._expected.values()]:
            if subscription.key is not None:
                subscription.put(RECONNECTED)
        until = time.monotonic() + AFTER_OUTAGE_RETRY
        self._due.extend((command, until) for command in self._after_outage
                         if all(command is not other for other, _ in self._due))

    def _connect(self) -> None:
        if self._pubsub is not None:
            self._pubsub.disconnect()
            self._pubsub = None
        if self._watched is not None:
            # By its number: the socket that had it may be closed already.
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._watched)
            self._watched = None
        if self._client is None:
            self._client = redis.Redis(connection_pool=redis.ConnectionPool(
                **{**self._params, "socket_timeout": SOCKET_TIMEOUT,
                   "socket_connect_timeout": SOCKET_TIMEOUT}))
            self._reads = _connection(self._params)
        self._pubsub = pubsub = _connection(self._params)
        pubsub.connect()
        self._watched = pubsub.fileno()
        self._selector.register(self._watched, selectors.EVENT_READ, "pubsub")
        channels = [self.channel, *self._subscriptions]
        for start in range(0, len(channels), SUBSCRIBE_BATCH):
            pubsub.send_command("SUBSCRIBE", *channels[start:start + SUBSCRIBE_BATCH])


class _Connection(redis.Connection):
    """A redis-py connection whose socket a selector can watch."""

    def fileno(self) -> int:
        # redis-py keeps its socket private; the selector needs its descriptor.
        sock = self._sock
        if sock is None:
            raise redis_errors.ConnectionError("the result store connection is closed")
        return sock.fileno()


def _connection(params: dict[str, Any]) -> Any:
    """A connection to the result store, as Celery's parameters describe it."""
    options = dict(params)
    base = options.pop("connection_class", redis.Connection)
    # Bounded, so that a store that accepts but never answers is an outage, not a hang
    # (the selector says when a message is there; a read waits only for its rest).
    options["socket_timeout"] = SOCKET_TIMEOUT
    options["socket_connect_timeout"] = options.get("socket_connect_timeout") or SOCKET_TIMEOUT
    options["socket_keepalive"] = True
    # RESP2: messages come as replies (RESP3 would hand them to a push handler).
    options["protocol"] = 2
    kind = _Connection if base is redis.Connection else type(
        "_Watched" + base.__name__, (base,), {"fileno": _Connection.fileno})
    return kind(**options)


def _broker_params(broker_url: str | None, store: dict[str, Any]) -> dict[str, Any] | None:
    """How to reach a Redis broker at ``broker_url`` if it is not the server of the
    result store (connection parameters ``store``); else ``None``."""
    first = (broker_url or "").split(";")[0].strip()  # of a failover list, the first
    if first.partition("://")[0] != "redis":  # TLS and sockets are not watched
        return None
    parse: Any = redis.connection.parse_url  # untyped in redis-py
    params: dict[str, Any] = parse(first)
    return None if _server(params) == _server(store) else params


def _server(params: dict[str, Any]) -> tuple[Any, ...]:
    host = params.get("host") or "localhost"
    return (LOCAL_NAMES.get(host, host), int(params.get("port") or 6379), params.get("path"))


def _drain(wake: socket.socket) -> None:
    try:
        while wake.recv(4096):
            pass
    except BlockingIOError:
        pass
