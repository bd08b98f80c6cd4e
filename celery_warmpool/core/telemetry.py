"""Telemetry: what pools and agents do, as signals any code can listen to.

Connect a receiver to watch a pool::

    from celery_warmpool import telemetry

    @telemetry.agent_checkout.connect
    def on_checkout(sender, agent, wait, **kwargs):
        print(sender.name, agent.id, wait)

    telemetry.agent_checkin.connect(on_checkin, sender=pool)   # one pool only

A receiver connected with ``sender=pool`` is kept by that pool (in its
:class:`PoolHooks`, ``pool.hooks``), not by the signal: so a pool nobody listens to pays
one attribute test per event (``if hooks.agent_checkout``), whatever other pools'
listeners do. A receiver connected without a sender listens to every pool, and so every
pool pays for it. Events of agents (``call_*``, ``stream_chunk``, ``batch_run``) are sent
by the agent, with the agent as sender.

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
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = [
    "POOL_SIGNALS",
    "PoolHooks",
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
#: How a receiver is held: calling it gives the receiver, or None once it is collected.
Reference = Callable[[], Callable[..., Any] | None]


def _identity(receiver: Callable[..., Any]) -> tuple[int, int]:
    # A bound method is a new object at each attribute access: identify it by its parts.
    owner = getattr(receiver, "__self__", None)
    function = getattr(receiver, "__func__", receiver)
    return id(function), id(owner)


class TelemetrySignal:
    """A named signal whose receivers cannot break the code that sends it.

    ``providing_args`` names the keyword arguments it sends besides ``signal`` and
    ``sender``. A signal ``per_pool`` is sent by pools: a receiver connected for one pool
    is kept by that pool's :class:`PoolHooks`, and :attr:`key` names it there.
    """

    def __init__(self, name: str, doc: str, providing_args: tuple[str, ...], *,
                 per_pool: bool = False) -> None:
        self.name = name
        self.__doc__ = doc
        self.providing_args = frozenset(providing_args)
        self.per_pool = per_pool
        #: The signal's attribute in a pool's hooks: its name without ``warmpool_``.
        self.key = name.removeprefix("warmpool_")
        #: Connected receivers, by connection (those of one pool are its hooks'). Replaced,
        #: never changed in place, so that ``send`` reads a consistent snapshot unlocked.
        self.receivers: dict[_Key, Reference] = {}
        self._lock = threading.Lock()
        #: The hooks of every live pool, told when a receiver of every pool comes or goes.
        self._watchers: weakref.WeakSet[PoolHooks] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<TelemetrySignal {self.name}>"

    def connect(self, receiver: F, sender: Any = None, weak: bool = True) -> F:
        """Call ``receiver`` on every send (by ``sender`` only, if given); return it.

        Usable as a decorator. With ``weak`` the signal does not keep the receiver alive:
        it is disconnected when garbage collected. A pool's receiver is kept by the pool
        (see :class:`PoolHooks`), so it costs nothing to the others.
        """
        hooks = self._hooks_of(sender)
        if hooks is not None:
            return hooks.connect(self, receiver, weak)
        key: _Key = (_identity(receiver), None if sender is None else id(sender))
        reference = _reference(receiver, weak, lambda: self._drop(key))
        with self._lock:
            self.receivers = {**self.receivers, key: reference}
        if sender is None:
            self._tell_watchers()
        return receiver

    def disconnect(self, receiver: Callable[..., Any], sender: Any = None) -> None:
        """Stop calling ``receiver`` for ``sender`` (as connected). Safe to call twice."""
        hooks = self._hooks_of(sender)
        if hooks is not None:
            hooks.disconnect(self, receiver)
            return
        self._drop((_identity(receiver), None if sender is None else id(sender)))

    def send(self, sender: Any = None, **kwargs: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver of ``sender`` with ``kwargs``; log and skip those that raise.

        Returns ``(receiver, what it returned)`` for those that did not raise.
        """
        hooks = self._hooks_of(sender)
        if hooks is not None:
            return hooks.send(self, **kwargs)
        wanted = id(sender)
        return _call([reference for (_, listens_to), reference in self.receivers.items()
                      if listens_to is None or listens_to == wanted], self, sender, kwargs)

    def everyone(self) -> tuple[Reference, ...]:
        """The receivers of every sender (connected without one)."""
        return tuple(reference for (_, listens_to), reference in self.receivers.items()
                     if listens_to is None)

    def watch(self, hooks: PoolHooks) -> None:
        """Tell ``hooks`` whenever a receiver of every sender comes or goes."""
        with self._lock:
            self._watchers.add(hooks)

    def _hooks_of(self, sender: Any) -> PoolHooks | None:
        if not self.per_pool or sender is None:
            return None
        hooks = getattr(sender, "hooks", None)
        return hooks if isinstance(hooks, PoolHooks) else None

    def _drop(self, key: _Key) -> None:
        with self._lock:
            if key not in self.receivers:
                return
            self.receivers = {k: v for k, v in self.receivers.items() if k != key}
        if key[1] is None:
            self._tell_watchers()

    def _tell_watchers(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for hooks in watchers:
            hooks.refresh(self)


class PoolHooks:
    """Who listens to one pool: its own receivers, and those of every pool.

    Every pool has one (``pool.hooks``). For each signal of :data:`POOL_SIGNALS` it has an
    attribute named after the signal (``hooks.agent_checkout``): the references of the
    receivers to call, an empty tuple when nobody listens, so a pool tests it before
    building what it sends::

        if hooks.agent_checkin:
            hooks.send(telemetry.agent_checkin, agent=agent, held=held)

    ``telemetry.agent_checkin.connect(fn, sender=pool)`` lands here, as does
    ``pool.hooks.connect(telemetry.agent_checkin, fn)``.
    """

    # One per signal of POOL_SIGNALS, by its key (set in __init__, kept current by refresh).
    agent_checkout: tuple[Reference, ...]
    agent_checkin: tuple[Reference, ...]
    checkout_timeout: tuple[Reference, ...]
    pool_exhausted: tuple[Reference, ...]
    agent_started: tuple[Reference, ...]
    agent_setup_failed: tuple[Reference, ...]
    agent_replaced: tuple[Reference, ...]
    agent_dismissed: tuple[Reference, ...]
    pool_pressure: tuple[Reference, ...]

    def __init__(self, sender: Any) -> None:
        """Hooks for ``sender`` (the pool), which every receiver gets as ``sender``."""
        self.sender = sender
        self._lock = threading.Lock()
        self._own: dict[str, dict[tuple[int, int], Reference]] = {}
        for signal in POOL_SIGNALS:
            setattr(self, signal.key, signal.everyone())
            signal.watch(self)

    def connect(self, signal: TelemetrySignal, receiver: F, weak: bool = True) -> F:
        """Call ``receiver`` on every send of ``signal`` by this pool; return it."""
        key = _identity(receiver)
        reference = _reference(receiver, weak, lambda: self._drop(signal, key))
        with self._lock:
            self._own.setdefault(signal.key, {})[key] = reference
        self.refresh(signal)
        return receiver

    def disconnect(self, signal: TelemetrySignal, receiver: Callable[..., Any]) -> None:
        """Stop calling ``receiver`` on ``signal``. Safe to call twice."""
        self._drop(signal, _identity(receiver))

    def listeners(self, signal: TelemetrySignal) -> int:
        """How many receivers this pool's own ``signal`` has (the others' not counted)."""
        with self._lock:
            return len(self._own.get(signal.key, {}))

    def refresh(self, signal: TelemetrySignal) -> None:
        """Recompute who receives ``signal`` (after a receiver came or went)."""
        with self._lock:
            own = tuple(self._own.get(signal.key, {}).values())
            setattr(self, signal.key, own + signal.everyone())

    def send(self, signal: TelemetrySignal, **kwargs: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver of ``signal`` for this pool; log and skip those that raise."""
        references: tuple[Reference, ...] = getattr(self, signal.key)
        return _call(references, signal, self.sender, kwargs)

    def _drop(self, signal: TelemetrySignal, key: tuple[int, int]) -> None:
        with self._lock:
            own = self._own.get(signal.key, {})
            if own.pop(key, None) is None:
                return
        self.refresh(signal)


def _reference(receiver: Callable[..., Any], weak: bool,
               dropped: Callable[[], None]) -> Reference:
    """A reference to ``receiver``: weak (``dropped`` runs when it is collected) or not."""
    if not weak:
        return _Strong(receiver)
    if hasattr(receiver, "__self__"):
        return weakref.WeakMethod(receiver, lambda _: dropped())
    return weakref.ref(receiver, lambda _: dropped())


def _call(references: Iterable[Reference], signal: TelemetrySignal, sender: Any,
          kwargs: dict[str, Any]) -> list[tuple[Callable[..., Any], Any]]:
    """Call each live receiver; log and skip those that raise."""
    results: list[tuple[Callable[..., Any], Any]] = []
    for reference in references:
        receiver = reference()
        if receiver is None:
            continue
        try:
            results.append((receiver, receiver(signal=signal, sender=sender, **kwargs)))
        except Exception:
            logger.exception("telemetry receiver %r of %s failed", receiver, signal.name)
    return results


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
    ("agent", "wait", "overflow"), per_pool=True)

agent_checkin = TelemetrySignal(
    "warmpool_agent_checkin",
    "An agent came back: ``agent`` and ``held`` (seconds since it was handed out).",
    ("agent", "held"), per_pool=True)

checkout_timeout = TelemetrySignal(
    "warmpool_checkout_timeout",
    "A checkout gave up: ``waited`` (seconds), ``timeout`` (what the caller allowed).",
    ("waited", "timeout"), per_pool=True)

pool_exhausted = TelemetrySignal(
    "warmpool_pool_exhausted",
    "A checkout found no idle agent and no overflow room: ``blocking`` (it waits; else it "
    "fails with PoolExhausted) and ``waiting`` (callers queued, this one included).",
    ("blocking", "waiting"), per_pool=True)

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
    ("agent", "overflow", "duration"), per_pool=True)

agent_setup_failed = TelemetrySignal(
    "warmpool_agent_setup_failed",
    "An agent's setup() raised: ``exception``, ``attempt`` (1 for the first try) and "
    "``retry_in`` (seconds before the next try, or None when nobody retries).",
    ("exception", "attempt", "retry_in"), per_pool=True)

agent_replaced = TelemetrySignal(
    "warmpool_agent_replaced",
    "A broken or worn-out agent was closed and a replacement is being built: ``agent`` and "
    "``reason``.",
    ("agent", "reason"), per_pool=True)

agent_dismissed = TelemetrySignal(
    "warmpool_agent_dismissed",
    "An agent left the pool for good without a replacement (an overflow agent, or a "
    "surplus after a resize): ``agent`` and ``idle`` (seconds it sat idle before).",
    ("agent", "idle"), per_pool=True)

pool_pressure = TelemetrySignal(
    "warmpool_pool_pressure",
    "A pool with ``monitor_interval`` ran out of idle agents (see the monitor module), "
    "sent with its warning, at most once per interval: ``status`` (the PoolStatus) and "
    "``events`` (overflow or exhausted checkouts since the last one).",
    ("status", "events"), per_pool=True)

#: The signals a pool sends (its hooks have one attribute each, named by ``key``).
POOL_SIGNALS: tuple[TelemetrySignal, ...] = (
    agent_checkout, agent_checkin, checkout_timeout, pool_exhausted, agent_started,
    agent_setup_failed, agent_replaced, agent_dismissed, pool_pressure)
