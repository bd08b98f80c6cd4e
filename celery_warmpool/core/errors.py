"""The exceptions of celery_warmpool, rooted in :class:`WarmPoolError`.

Every error carries what a caller needs to act on it (the pool's name, how long a
caller waited, the cause) as attributes, and keeps them in ``args`` too: Celery
rebuilds an exception on the caller's side as ``cls(*exc.args)``, so anything not
in ``args`` would be lost on its way back from a worker.
"""

from __future__ import annotations

from typing import Any


class WarmPoolError(Exception):
    """Base class of every error raised by celery_warmpool."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


# -- argument errors ---------------------------------------------------------------------


class InvalidArgument(WarmPoolError, ValueError):
    """An argument of a call is out of range or of the wrong type; nothing was sent.

    ``argument`` names it, ``value`` is its ``repr`` (short, and safe to carry back from a
    worker whatever it was), ``allowed`` says what is taken. A ``ValueError`` too, so
    code that caught the plain ``ValueError`` some arguments raised before keeps working.
    """

    def __init__(self, message: str, argument: str | None = None, value: str | None = None,
                 allowed: str | None = None) -> None:
        super().__init__(message, argument, value, allowed)
        self.argument = argument
        self.value = value
        self.allowed = allowed


# -- pool errors -------------------------------------------------------------------------


class PoolError(WarmPoolError):
    """An error about a pool as a whole."""

    def __init__(self, message: str, pool: str | None = None, *extra: Any) -> None:
        super().__init__(message, pool, *extra)
        self.pool = pool


class PoolExhausted(PoolError):
    """Every agent is checked out, no overflow room is left, and the caller would not wait."""

    def __init__(self, message: str, pool: str | None = None, size: int = 0,
                 max_overflow: int = 0) -> None:
        super().__init__(message, pool, size, max_overflow)
        self.size = size
        self.max_overflow = max_overflow


class CheckoutTimeout(PoolError, TimeoutError):
    """No agent became free within the caller's checkout timeout."""

    def __init__(self, message: str, pool: str | None = None, waited: float = 0.0,
                 size: int = 0, max_overflow: int = 0) -> None:
        super().__init__(message, pool, waited, size, max_overflow)
        # TimeoutError (an OSError) keeps only two args unless told otherwise.
        self.args = (message, pool, waited, size, max_overflow)
        self.waited = waited
        self.size = size
        self.max_overflow = max_overflow


class PoolBusy(PoolError):
    """The pool's waiting calls are at its ``max_queued``: this call was refused before it
    was queued, and will never run.

    ``count`` is the calls found waiting (queued in the broker, or reserved on a node and
    not yet running), ``bound`` the pool's ``max_queued``, ``retry_after`` the seconds
    after which trying again should find room (the waiting calls divided by the pool's
    recent drain rate), ``capacity`` the agents on live nodes (``0``: none anywhere, the
    calls waiting are not being served at all).
    """

    def __init__(self, message: str, pool: str | None = None, count: int = 0,
                 bound: int = 0, retry_after: float = 0.0, capacity: int = 0) -> None:
        super().__init__(message, pool, count, bound, retry_after, capacity)
        self.count = count
        self.bound = bound
        self.retry_after = retry_after
        self.capacity = capacity


class PoolClosed(PoolError):
    """The pool was closed: it hands out no more agents."""


class PoolStartError(PoolError):
    """The pool could not build its agents: the cause is in ``cause`` and ``__cause__``."""

    def __init__(self, message: str, pool: str | None = None, cause: str | None = None) -> None:
        super().__init__(message, pool, cause)
        self.cause = cause


class UnknownPool(PoolError):
    """No pool of that name is configured, or no worker hosts it."""


class NotCheckedOut(PoolError):
    """An agent was checked in that the pool did not hand out, or was already checked in."""


class ConfigurationError(WarmPoolError):
    """A pool's configuration is invalid: the message names the pool and the field."""

    def __init__(self, message: str, pool: str | None = None, field: str | None = None) -> None:
        super().__init__(message, pool, field)
        self.pool = pool
        self.field = field


# -- call errors -------------------------------------------------------------------------


class SignalError(WarmPoolError):
    """An error about one signal handled by an agent."""

    def __init__(self, message: str, signal_type: str | None = None, *extra: Any) -> None:
        super().__init__(message, signal_type, *extra)
        self.signal_type = signal_type


class InvalidSignal(SignalError):
    """A signal, or the parameters it carries, failed validation; ``errors`` lists why."""

    def __init__(self, message: str, signal_type: str | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, signal_type, errors or [])
        self.errors = errors or []


class UnknownSignal(SignalError):
    """No route of the agent matches the signal's type."""


class ActionFailed(SignalError):
    """The action raised, or returned updates the agent's state rejects; state is unchanged."""

    def __init__(self, message: str, signal_type: str | None = None, action: str | None = None,
                 cause: str | None = None) -> None:
        super().__init__(message, signal_type, action, cause)
        self.action = action
        self.cause = cause


class CallTimeout(SignalError, TimeoutError):
    """The work outlasted its ``call_timeout``; the agent that overran is replaced."""

    def __init__(self, message: str, signal_type: str | None = None,
                 timeout: float = 0.0) -> None:
        super().__init__(message, signal_type, timeout)
        self.args = (message, signal_type, timeout)
        self.timeout = timeout


class ModelLoadFailed(WarmPoolError):
    """A model's ``load_model()`` failed, so the calls that need it fail too.

    ``model`` is its id, ``cause`` the failure's type and message, ``pool`` the pool.
    The model is tried again by a later call once ``retry_in`` seconds have passed (the
    wait doubles with each failure in a row); until then its calls fail at once with
    this error, without a load.
    """

    def __init__(self, message: str, model: str | None = None, cause: str | None = None,
                 pool: str | None = None, retry_in: float = 0.0) -> None:
        super().__init__(message, model, cause, pool, retry_in)
        self.model = model
        self.cause = cause
        self.pool = pool
        self.retry_in = retry_in


# -- delivery errors ---------------------------------------------------------------------


class AgentLost(WarmPoolError):
    """The process running a call died before it answered (a killed or crashed child).

    ``may_have_run`` says whether the work had started: if so, its effects outside the
    agent (a row written, a request sent) may have happened; the agent's state died with
    the process.
    """

    def __init__(self, message: str, pool: str | None = None, node: str | None = None,
                 pid: int | None = None, signal_type: str | None = None,
                 may_have_run: bool = True) -> None:
        super().__init__(message, pool, node, pid, signal_type, may_have_run)
        self.pool = pool
        self.node = node
        self.pid = pid
        self.signal_type = signal_type
        self.may_have_run = may_have_run


class BrokerUnavailable(WarmPoolError):
    """The broker or the result store could not be reached within the call's timeout.

    ``url`` is the address that failed, its password masked; ``waited`` the seconds spent
    trying.
    """

    def __init__(self, message: str, url: str | None = None, waited: float = 0.0) -> None:
        super().__init__(message, url, waited)
        self.url = url
        self.waited = waited


class WorkerFailed(WarmPoolError):
    """The package's own code failed in the worker (not the action: that is
    :class:`ActionFailed`); ``cause`` holds the original error's type and message.

    Whatever the worker raised reaches the caller as this, never as the foreign exception
    itself (an ``OverflowError``, a redis ``ResponseError``): callers catch
    :class:`WarmPoolError` and nothing else.
    """

    def __init__(self, message: str, pool: str | None = None, cause: str | None = None) -> None:
        super().__init__(message, pool, cause)
        self.pool = pool
        self.cause = cause

    @classmethod
    def wrapping(cls, exc: BaseException, pool: str | None = None) -> WarmPoolError:
        """``exc`` itself if it is a :class:`WarmPoolError`, else a ``WorkerFailed`` naming
        its type and message."""
        if isinstance(exc, WarmPoolError):
            return exc
        cause = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}".removeprefix(
            "builtins.")
        where = f"pool {pool!r}: " if pool else ""
        return cls(f"{where}the worker failed to run the call: {cause}", pool, cause)


class HandedBack(PoolError):
    """The pool gives its waiting callers back: its node is draining or shutting down.

    Raised to a caller queued for an agent when :meth:`AgentPool.hand_back` is called,
    and to checkouts that would wait after it: a worker puts their messages back on the
    broker for other nodes to serve.
    """


# -- streams -----------------------------------------------------------------------------


class StreamNotFinished(WarmPoolError):
    """A stream's final reply was asked for before the stream ended, or after it was
    closed early (it has none then)."""


class StreamCancelled(Exception):
    """The reader of a stream went away: stop producing chunks.

    Internal control flow, not an error a caller sees, hence not a :class:`WarmPoolError`:
    the sink a worker gives ``pool.work.run_stream`` raises it from ``emit`` when
    nobody reads any more, and ``run_stream`` raises it back after closing the action's
    generator at its ``yield``. The agent is not broken by it and its state is unchanged.
    """
