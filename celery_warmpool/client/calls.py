"""Calling pools over the broker: call (wait for the reply), cast (do not), transaction."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.result import AsyncResult

from ..core.errors import CheckoutTimeout
from ..core.reply import AgentReply
from ..core.signal import Signal
from .delivery import Delivery

if TYPE_CHECKING:
    from ..configuration import PoolConfiguration

__all__ = ["PoolClient", "SignalLike"]

#: Seconds a caller waits beyond ``timeout + call_timeout`` for the reply to travel back.
REPLY_GRACE = 2.0
#: Seconds a cast without a ``timeout`` keeps trying to reach an unreachable broker.
PUBLISH_TIMEOUT = 10.0

SignalLike = Signal | Mapping[str, Any] | str


class PoolClient:
    """Call, cast and transact with pools over the broker.

    ``handle_task`` and ``cast_task`` are the tasks that run a call's and a cast's signals
    on a pool's agents in the worker.
    """

    def __init__(self, configuration: PoolConfiguration, handle_task: Task,  # type: ignore[type-arg]
                 cast_task: Task) -> None:  # type: ignore[type-arg]
        self.configuration = configuration
        self.handle_task = handle_task
        self.cast_task = cast_task
        self.delivery = Delivery(handle_task.app)

    def call(self, pool: str, signal: SignalLike, timeout: float = 5.0,
             call_timeout: float | None = 5.0) -> AgentReply:
        """Handle ``signal`` on an agent of ``pool`` and return its reply.

        Arguments:
            timeout: seconds the call may wait to start (for a worker and a free agent);
                past it the caller gets :class:`CheckoutTimeout` and it never runs.
            call_timeout: seconds the work may take; past it the caller gets
                :class:`CallTimeout` and the agent that overran is replaced.

        A broker or result store away for less than the call's time is waited out.

        Raises:
            UnknownPool, InvalidSignal, UnknownSignal, ActionFailed, CheckoutTimeout,
            CallTimeout, AgentLost, BrokerUnavailable: as their names say; never a reply
            hiding an error.
        """
        return self._send(pool, [Signal.parse(signal)], timeout, call_timeout, False)[0]

    def transaction(self, pool: str, signals: Iterable[SignalLike], timeout: float = 5.0,
                    call_timeout: float | None = 5.0) -> list[AgentReply]:
        """Handle ``signals`` in order on one agent, all or nothing (see :meth:`call`)."""
        events = [Signal.parse(signal) for signal in signals]
        if not events:
            return []
        return self._send(pool, events, timeout, call_timeout, True)

    def cast(self, pool: str, signal: SignalLike, timeout: float | None = None,
             call_timeout: float | None = None) -> AsyncResult:  # type: ignore[type-arg]
        """Send ``signal`` without waiting; the agent is held until the work ends.

        Returns the :class:`AsyncResult`, as ``.delay()`` does. With ``timeout`` the work
        is dropped (to the dead-letter queue) if it cannot start within that many
        seconds. Publishing is retried while the broker is away, for ``timeout`` seconds
        or :data:`PUBLISH_TIMEOUT` without one.

        Raises:
            BrokerUnavailable: the broker could not be reached in that time.
        """
        event = Signal.parse(signal)
        spec = self.configuration.spec(pool)
        deadline = None if timeout is None else time.time() + timeout
        bound = PUBLISH_TIMEOUT if timeout is None else timeout
        return self.delivery.publish(
            lambda: self.cast_task.apply_async(
                (pool, [event.to_wire()], deadline, call_timeout, False),
                **_send_options(spec.queue, pool, [event])),
            time.monotonic() + bound, bound)

    def _send(self, pool: str, events: list[Signal], timeout: float,
              call_timeout: float | None, transaction: bool) -> list[AgentReply]:
        spec = self.configuration.spec(pool)
        started = time.monotonic()
        deadline = time.time() + timeout
        result = self.delivery.publish(
            lambda: self.handle_task.apply_async(
                (pool, [event.to_wire() for event in events], deadline, call_timeout,
                 transaction), **_send_options(spec.queue, pool, events)),
            started + timeout, timeout)
        window = timeout + (call_timeout or 0.0) + REPLY_GRACE

        def no_reply() -> CheckoutTimeout:
            # The message carries its deadline: a worker that takes it now drops it.
            return CheckoutTimeout(
                f"pool {pool!r}: no reply within {window:.1f}s. No worker started the call "
                f"within timeout={timeout}s (it carries that deadline and will not start "
                "later), or the worker running it was lost", pool, window, spec.size,
                spec.max_overflow)

        replies = self.delivery.wait(result, started + window, window, no_reply)
        return [AgentReply.model_validate(reply) for reply in replies]


def _send_options(queue: str, pool: str, events: list[Signal]) -> dict[str, Any]:
    # argsrepr is what worker logs and monitors show for the message; giving it also
    # spares Celery a slow generic repr of the signals on every send.
    kinds = ", ".join(f"{event.type}#{event.id}" for event in events)
    return {"queue": queue, "argsrepr": f"({pool!r}, [{kinds}])", "kwargsrepr": "{}"}
