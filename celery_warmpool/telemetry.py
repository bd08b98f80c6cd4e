"""Telemetry signals, sent the Celery way (``celery.utils.dispatch.Signal``).

Connect a receiver to watch a pool::

    from celery_warmpool import telemetry

    @telemetry.agent_checkout.connect
    def on_checkout(sender, agent, wait, **kwargs):
        print(sender.name, agent.id, wait)

``sender`` is the :class:`~celery_warmpool.pool.AgentPool` (or the :class:`Agent` for
call events). Receivers get keyword arguments only; Celery's dispatcher adds its own
``signal`` and ``sender``, so no telemetry argument is called ``signal``: the CloudEvent
being handled is passed as ``event``. A receiver's exception is logged by Celery and
swallowed. With no receiver connected, sending costs one attribute test.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal as TelemetrySignal

__all__ = [
    "TelemetrySignal",
    "agent_checkin",
    "agent_checkout",
    "agent_dismissed",
    "agent_replaced",
    "agent_setup_failed",
    "agent_started",
    "call_exception",
    "call_start",
    "call_stop",
    "pool_exhausted",
    "pool_pressure",
]

agent_checkout = TelemetrySignal(
    name="warmpool_agent_checkout", providing_args=["agent", "wait", "overflow"])
"""An agent was handed out; ``wait`` is the seconds the caller waited for it."""

agent_checkin = TelemetrySignal(
    name="warmpool_agent_checkin", providing_args=["agent", "held"])
"""An agent came back; ``held`` is how many seconds it was out (or ``None``)."""

call_start = TelemetrySignal(
    name="warmpool_call_start", providing_args=["agent", "event", "action"])
"""An agent started handling ``event`` (a :class:`~celery_warmpool.signal.Signal`)."""

call_stop = TelemetrySignal(
    name="warmpool_call_stop", providing_args=["agent", "event", "action", "reply", "duration"])
"""An agent finished handling ``event``; ``reply`` is the :class:`AgentReply`."""

call_exception = TelemetrySignal(
    name="warmpool_call_exception",
    providing_args=["agent", "event", "action", "exception", "duration"])
"""Handling ``event`` failed with ``exception``; the agent's state is unchanged."""

agent_started = TelemetrySignal(
    name="warmpool_agent_started", providing_args=["agent", "overflow", "duration"])
"""An agent finished ``setup()``; ``duration`` is the seconds its warm-up took."""

agent_setup_failed = TelemetrySignal(
    name="warmpool_agent_setup_failed", providing_args=["exception", "attempt", "retry_in"])
"""An agent's ``setup()`` raised; ``retry_in`` is the back-off before the next try."""

agent_replaced = TelemetrySignal(
    name="warmpool_agent_replaced", providing_args=["agent", "reason"])
"""A broken or worn-out agent was closed; a replacement is being built in the background."""

agent_dismissed = TelemetrySignal(
    name="warmpool_agent_dismissed", providing_args=["agent", "idle"])
"""An overflow agent was closed after it came back (at once, or after ``overflow_ttl``)."""

pool_exhausted = TelemetrySignal(
    name="warmpool_pool_exhausted", providing_args=["waited", "blocking"])
"""A checkout found no agent and no overflow room: it failed or it had to wait."""

pool_pressure = TelemetrySignal(
    name="warmpool_pool_pressure", providing_args=["status", "events"])
"""A pool with ``monitor_interval`` ran out of idle agents (see :mod:`~.monitor`); sent with
its warning, at most once per interval. ``status`` is the pool's :class:`PoolStatus` then,
``events`` the overflow or exhausted checkouts since the last send."""
