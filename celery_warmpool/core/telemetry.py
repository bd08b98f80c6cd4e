"""Telemetry: what pools and agents do, as signals any code can listen to.

Connect a receiver to watch a pool::

    from celery_warmpool import telemetry

    @telemetry.agent_checkout.connect
    def on_checkout(sender, agent, wait, **kwargs):
        print(sender.name, agent.id, wait)

    telemetry.agent_checkin.connect(on_checkin, sender=pool)   # one pool only

A receiver gets keyword arguments only, as Celery's signals give them: ``signal``,
``sender`` (the :class:`~celery_warmpool.core.pool.AgentPool`, or the :class:`Agent` for
call events) and those the signal names in ``providing_args``; it should accept
``**kwargs`` so that new arguments do not break it. No signal sends an argument of its
own called ``signal``: the CloudEvent being handled is passed as ``event``. Receivers are
held weakly unless connected with ``weak=False``. A receiver's exception is logged and
swallowed: telemetry never breaks a checkout. With no receiver connected, sending costs
one attribute test (``if signal.receivers``), which is why senders make it first.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "TelemetrySignal",
    "agent_checkin",
    "agent_checkout",
    "agent_dismissed",
    "agent_replaced",
    "agent_setup_failed",
    "agent_started",
    "batch_run",
    "call_exception",
    "call_start",
    "call_stop",
    "checkout_timeout",
    "pool_exhausted",
    "pool_pressure",
    "stream_chunk",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
#: A connection: the receiver's identity and the sender it listens to (None: any).
_Key = tuple[tuple[int, int], int | None]


def _identity(receiver: Callable[..., Any]) -> tuple[int, int]:
    # A bound method is a new object at each attribute access: identify it by its parts.
    owner = getattr(receiver, "__self__", None)
    function = getattr(receiver, "__func__", receiver)
    return id(function), id(owner)


class TelemetrySignal:
    """A named signal whose receivers cannot break the code that sends it.

    ``providing_args`` names the keyword arguments it sends besides ``signal`` and
    ``sender``.
    """

    def __init__(self, name: str, doc: str, providing_args: tuple[str, ...]) -> None:
        self.name = name
        self.__doc__ = doc
        self.providing_args = frozenset(providing_args)
        #: Connected receivers, by connection. Replaced, never changed in place, so that
        #: ``send`` reads a consistent snapshot without a lock.
        self.receivers: dict[_Key, Callable[[], Callable[..., Any] | None]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<TelemetrySignal {self.name}>"

    def connect(self, receiver: F, sender: Any = None, weak: bool = True) -> F:
        """Call ``receiver`` on every send (by ``sender`` only, if given); return it.

        Usable as a decorator. With ``weak`` the signal does not keep the receiver alive:
        it is disconnected when garbage collected.
        """
        key: _Key = (_identity(receiver), None if sender is None else id(sender))
        reference: Callable[[], Callable[..., Any] | None]
        if not weak:
            reference = _Strong(receiver)
        elif hasattr(receiver, "__self__"):
            reference = weakref.WeakMethod(receiver, lambda _: self._drop(key))
        else:
            reference = weakref.ref(receiver, lambda _: self._drop(key))
        with self._lock:
            self.receivers = {**self.receivers, key: reference}
        return receiver

    def disconnect(self, receiver: Callable[..., Any], sender: Any = None) -> None:
        """Stop calling ``receiver`` for ``sender`` (as connected). Safe to call twice."""
        self._drop((_identity(receiver), None if sender is None else id(sender)))

    def send(self, sender: Any = None, **kwargs: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver of ``sender`` with ``kwargs``; log and skip those that raise.

        Returns ``(receiver, what it returned)`` for those that did not raise.
        """
        results: list[tuple[Callable[..., Any], Any]] = []
        wanted = id(sender)
        for (_, listens_to), reference in self.receivers.items():
            receiver = reference()
            if receiver is None or (listens_to is not None and listens_to != wanted):
                continue
            try:
                results.append((receiver, receiver(signal=self, sender=sender, **kwargs)))
            except Exception:
                logger.exception("telemetry receiver %r of %s failed", receiver, self.name)
        return results

    def _drop(self, key: _Key) -> None:
        with self._lock:
            if key in self.receivers:
                self.receivers = {k: v for k, v in self.receivers.items() if k != key}


class _Strong:
    """A reference that keeps its receiver alive (``weak=False``)."""

    __slots__ = ("receiver",)

    def __init__(self, receiver: Callable[..., Any]) -> None:
        self.receiver = receiver

    def __call__(self) -> Callable[..., Any]:
        return self.receiver


agent_checkout = TelemetrySignal(
    "warmpool_agent_checkout",
    "An agent was handed out: ``agent``, ``wait`` (seconds the caller waited for it, "
    "building an overflow agent included) and ``overflow`` (whether it is one).",
    ("agent", "wait", "overflow"))

agent_checkin = TelemetrySignal(
    "warmpool_agent_checkin",
    "An agent came back: ``agent`` and ``held`` (seconds since it was handed out).",
    ("agent", "held"))

checkout_timeout = TelemetrySignal(
    "warmpool_checkout_timeout",
    "A checkout gave up: ``waited`` (seconds), ``timeout`` (what the caller allowed).",
    ("waited", "timeout"))

pool_exhausted = TelemetrySignal(
    "warmpool_pool_exhausted",
    "A checkout found no idle agent and no overflow room: ``blocking`` (it waits; else it "
    "fails with PoolExhausted) and ``waiting`` (callers queued, this one included).",
    ("blocking", "waiting"))

call_start = TelemetrySignal(
    "warmpool_call_start",
    "An agent started handling ``event`` (a Signal) with ``action`` (its name).",
    ("agent", "event", "action"))

call_stop = TelemetrySignal(
    "warmpool_call_stop",
    "An agent finished handling ``event``: ``action``, ``reply`` (the AgentReply) and "
    "``duration`` (seconds).",
    ("agent", "event", "action", "reply", "duration"))

call_exception = TelemetrySignal(
    "warmpool_call_exception",
    "Handling ``event`` failed: ``action``, ``exception`` and ``duration``; the agent's "
    "state is unchanged.",
    ("agent", "event", "action", "exception", "duration"))

stream_chunk = TelemetrySignal(
    "warmpool_stream_chunk",
    "A streaming action yielded a chunk of ``event``: ``index`` (0 for the first) and "
    "``chunk`` (the value, JSON). Sent before the chunk goes to the reader; call_start "
    "and call_stop or call_exception frame the stream as any call.",
    ("agent", "event", "index", "chunk"))

batch_run = TelemetrySignal(
    "warmpool_batch_run",
    "An agent ran a batch of ``action``: ``size`` (signals), ``failed`` (those that got an "
    "error) and ``duration`` (seconds). Each signal also sends call_stop or "
    "call_exception.",
    ("agent", "action", "size", "failed", "duration"))

agent_started = TelemetrySignal(
    "warmpool_agent_started",
    "An agent finished setup(): ``agent``, ``overflow`` and ``duration`` (seconds of warm-up).",
    ("agent", "overflow", "duration"))

agent_setup_failed = TelemetrySignal(
    "warmpool_agent_setup_failed",
    "An agent's setup() raised: ``exception``, ``attempt`` (1 for the first try) and "
    "``retry_in`` (seconds before the next try, or None when nobody retries).",
    ("exception", "attempt", "retry_in"))

agent_replaced = TelemetrySignal(
    "warmpool_agent_replaced",
    "A broken or worn-out agent was closed and a replacement is being built: ``agent`` and "
    "``reason``.",
    ("agent", "reason"))

agent_dismissed = TelemetrySignal(
    "warmpool_agent_dismissed",
    "An agent left the pool for good without a replacement (an overflow agent, or a "
    "surplus after a resize): ``agent`` and ``idle`` (seconds it sat idle before).",
    ("agent", "idle"))

pool_pressure = TelemetrySignal(
    "warmpool_pool_pressure",
    "A pool with ``monitor_interval`` ran out of idle agents (see the monitor module), "
    "sent with its warning, at most once per interval: ``status`` (the PoolStatus) and "
    "``events`` (overflow or exhausted checkouts since the last one).",
    ("status", "events"))
