"""Settings scoped to the package: confirms and retries on its own messages and store calls.

The package needs two things of the broker and the result store that a Celery app does not
have by default, and it sets them on what it uses itself, never on the app:

- **Publisher confirms** (RabbitMQ). A message published just as the broker closes the
  connection is dropped without an error unless the publish waits for the broker's
  confirm. The package publishes its own messages (calls, casts, their copies sent again,
  casts delivered again after their process died, dead letters) through producers of its
  own (:class:`Producers`); on a py-amqp broker they are on connections of their own with
  kombu's ``confirm_publish``. The app's connection pool (``app.pool``), which every task
  of the app publishes through, is left as the app configured it.
- **Result-store retries.** A reply stored while the result store restarts must wait for
  it, not vanish, and a single store call must give up soon enough for a caller's
  deadline to decide. The package stores its replies (and reads and writes its marks)
  through a result backend of its own (:class:`ResultStore`): the app's backend class and
  URL, with ``always_retry``, at most a second between tries and a short ``retry_policy``
  unless the app set them. ``app.backend``, which every task of the app stores through,
  keeps the app's own settings.

``app.conf.warmpool_confirm_publish = False`` and ``warmpool_resilient_results = False``
turn either off for the package too; a ``confirm_publish`` the app sets in
``broker_transport_options`` applies to everything, the package's messages included.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from kombu.pools import ProducerPool

from .replies import RepliesOnChannel

__all__ = ["BACKEND_RETRY_POLICY", "PUBLISH_CONNECTIONS", "Producers", "ResultStore",
           "Scoped", "StoresOwnResults", "own_connection", "scoped"]

#: Producers (each on a broker connection) that publish the package's messages in one
#: process, whatever the number of calling threads: more threads wait their turn, briefly.
PUBLISH_CONNECTIONS = 4
#: How long one result-store operation retries by itself before it fails: briefly, so that
#: a caller's own deadline decides (Celery's default is 20 tries, about 20 s).
BACKEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2,
                        "interval_max": 0.5}
#: Celery's default longest sleep between two tries to store a result, and ours (ms).
CELERY_MAX_SLEEP_MS = 10_000
STORE_RETRY_MOST_MS = 1_000


class Producers:
    """The producers the package publishes its own messages with, one pool per process."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._pool: ProducerPool | None = None
        self._pid = 0
        self._connections_lock = threading.Lock()
        self._connection_pool: Any = None
        self._connections_pid = 0

    @functools.cached_property
    def confirms(self) -> bool:
        """Whether the package's publishes wait for the broker's confirm on connections
        of their own: on py-amqp brokers, unless ``warmpool_confirm_publish`` is false or
        the app sets ``confirm_publish`` itself (then the app's connections carry it)."""
        conf = self.app.conf
        if not conf.get("warmpool_confirm_publish", True):
            return False
        if "confirm_publish" in (conf.broker_transport_options or {}):
            return False
        return _driver(self.app) == "py-amqp"

    @contextmanager
    def acquire(self) -> Iterator[Any]:
        """A producer of this process's pool, for a ``with`` block (blocks for a free one)."""
        with self._producers().acquire(block=True) as producer:
            yield producer

    def _producers(self) -> ProducerPool:
        """This process's producers (made anew in a forked child)."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._pool = ProducerPool(self.connections(), limit=PUBLISH_CONNECTIONS,
                                          Producer=self.app.amqp.Producer)
            return self._pool

    def connections(self) -> Any:
        """This process's pool of the package's own broker connections (with publisher
        confirms where :attr:`confirms` says), which its producers publish on."""
        with self._connections_lock:
            if self._connection_pool is None or self._connections_pid != os.getpid():
                self._connections_pid = os.getpid()
                options = {"confirm_publish": True} if self.confirms else {}
                self._connection_pool = own_connection(self.app, **options).Pool(
                    limit=PUBLISH_CONNECTIONS)
            return self._connection_pool


def own_connection(app: Any, **transport_options: Any) -> Any:
    """A broker connection of the package's own, apart from the app's pool.

    It connects once when asked (``max_retries`` 0): kombu would otherwise keep trying for
    the app's ``broker_connection_timeout`` and more, past a caller's deadline; the package
    waits out an outage itself, within each caller's deadline (see
    :mod:`celery_warmpool.wire.outages`). ``transport_options`` are added to the app's.
    """
    connection = app.connection_for_write()
    options = {**(connection.transport_options or {}), **transport_options,
               "max_retries": 0}
    own = connection.clone(transport_options=options)
    connection.release()
    return own


class ResultStore:
    """The result backend the package stores its replies and marks through.

    Celery keeps ``app.backend`` per thread unless the app declares its backend thread
    safe (``result_backend_thread_safe``), because waiting for results (a Redis pub/sub
    consumer, an RPC reply queue) is not. The package only stores through this one and
    reads single keys, which Celery's Redis backend does through redis-py's thread-safe
    client: one serves every thread of a process there. Other backends get one per thread,
    as Celery gives them. With RPC (replies sent to the caller's own queue, which none of
    these settings touch) and without a result store, it is ``app.backend`` itself.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._local = threading.local()
        #: The process id and the backend every thread of that process shares.
        self._shared: tuple[int, Any] = (0, None)
        self._lock = threading.Lock()

    @functools.cached_property
    def _kind(self) -> str:
        """``"app"`` (``app.backend`` as it is), ``"shared"`` (one per process) or
        ``"thread"`` (one per thread): decided once, when first needed.

        A Redis store is always the package's own, shared: it publishes replies on their
        callers' channels (see :mod:`.replies`), with the package's retries or not.
        """
        backend = self.app.backend
        if _replies_on_channels(backend):
            return "shared"
        if not self.app.conf.get("warmpool_resilient_results", True) or not _tunable(backend):
            return "app"
        return "shared" if _shareable(backend) else "thread"

    @property
    def backend(self) -> Any:
        """The backend for the package's store calls in this thread."""
        kind, pid = self._kind, os.getpid()
        if kind == "app":
            return self.app.backend
        if kind == "shared":
            owner, shared = self._shared  # one read: a forked child makes its own
            if owner != pid:
                with self._lock:
                    if self._shared[0] != pid:
                        self._shared = (pid, self._new())
                    shared = self._shared[1]
            return shared
        backend = getattr(self._local, "backend", None)
        if backend is None or getattr(self._local, "pid", 0) != pid:
            backend = self._local.backend = self._new()
            self._local.pid = pid
        return backend

    def _new(self) -> Any:
        # Made as Celery makes app.backend (its class and URL from the app's settings),
        # then given the package's settings where the app left Celery's defaults.
        # The class and URL of app.backend, which the process has already: looking them
        # up again would read every installed package's entry points (as Celery does).
        backend_class: Any = type(self.app.backend)
        url = self.app.backend.url
        if _replies_on_channels(backend_class):
            backend_class = _replying(backend_class)
        backend = backend_class(app=self.app, url=url)
        if not self.app.conf.get("warmpool_resilient_results", True):
            return backend
        conf = self.app.conf
        backend.always_retry = True
        if conf.result_backend_max_sleep_between_retries_ms == CELERY_MAX_SLEEP_MS:
            backend.max_sleep_between_retries_ms = STORE_RETRY_MOST_MS
        if "retry_policy" not in (conf.result_backend_transport_options or {}):
            backend.retry_policy = {**backend.retry_policy, **BACKEND_RETRY_POLICY}
        return backend


@functools.cache
def _replying(backend_class: type[Any]) -> type[Any]:
    """``backend_class`` (a Redis result backend) that publishes pool calls' replies on
    their callers' channels."""
    return type(f"Replying{backend_class.__name__}", (RepliesOnChannel, backend_class), {})


def _replies_on_channels(backend: Any) -> bool:
    """Whether ``backend`` (a backend or its class) is a plain Redis one (not Sentinel),
    whose callers wait on reply channels (see :mod:`.replies`)."""
    from celery.backends.redis import RedisBackend, SentinelBackend

    kind = backend if isinstance(backend, type) else type(backend)
    return issubclass(kind, RedisBackend) and not issubclass(kind, SentinelBackend)


class Scoped:
    """The package's own producers and result store for one app."""

    def __init__(self, app: Any) -> None:
        self.producers = Producers(app)
        self.results = ResultStore(app)


_scoped: weakref.WeakKeyDictionary[Any, Scoped] = weakref.WeakKeyDictionary()
_scoped_lock = threading.Lock()


def scoped(app: Any) -> Scoped:
    """The package's own producers and result store for ``app`` (made on first use)."""
    found = _scoped.get(app)
    if found is None:
        with _scoped_lock:
            found = _scoped.get(app)
            if found is None:
                found = _scoped[app] = Scoped(app)
    return found


class StoresOwnResults(Task):  # type: ignore[type-arg]
    """A task whose results, and the marks it reads and writes, go through the package's
    own result store (:class:`ResultStore`) rather than ``app.backend``."""

    @property
    def backend(self) -> Any:
        """The backend Celery stores this task's results through, in this thread."""
        if self._backend is not None:  # given one explicitly: Celery's own rule
            return self._backend
        return scoped(self.app).results.backend

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value


def _tunable(backend: Any) -> bool:
    """Whether the package's settings mean anything for ``backend``."""
    from celery.backends.base import DisabledBackend
    from celery.backends.rpc import RPCBackend

    return not isinstance(backend, RPCBackend | DisabledBackend)


def _shareable(backend: Any) -> bool:
    """Whether one object of ``backend``'s kind may serve every thread for storing."""
    from celery.backends.redis import RedisBackend

    return isinstance(backend, RedisBackend) or bool(getattr(backend, "thread_safe", False))


def _driver(app: Any) -> str | None:
    """The name of the client library of ``app``'s broker transport (nothing connects)."""
    try:
        connection = app.connection_for_write()
    except Exception:  # a broker URL kombu cannot use: Celery reports it when it connects
        return None
    try:
        return str(connection.transport.driver_name)
    except Exception:  # its client library is missing, say: the same
        return None
    finally:
        connection.release()
