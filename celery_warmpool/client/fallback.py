"""Calls where no reply listener can serve: Celery's own way of waiting for a result.

Only a plain Redis result store has a reply listener (see :mod:`.listener`). With any other
result backend (``rpc://``, a database, files, Sentinel) a call is sent with Celery's own
``apply_async`` (through one of the package's producers, so that a pool's bound holds)
and waited for with Celery's ``get()``, one waiting thread per call, within the call's
deadline (see :class:`~.delivery.Delivery`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from celery import Task
from celery.result import AsyncResult

from ..configuration import PoolConfiguration
from ..core.arguments import pool_model
from ..core.errors import CheckoutTimeout, WarmPoolError, WorkerFailed
from ..core.reply import AgentReply
from ..core.signal import Signal
from ..wire.message import CallMessage
from ..wire.queues import pool_queue, route
from .admission import Bound
from .delivery import Delivery
from .publisher import Publisher

__all__ = ["CeleryCalls", "no_reply"]


class CeleryCalls:
    """Calls sent with ``apply_async`` and waited for with Celery's ``get()``."""

    def __init__(self, configuration: PoolConfiguration, handle_task: Task,  # type: ignore[type-arg]
                 publisher: Publisher, delivery: Delivery) -> None:
        self.configuration = configuration
        self.handle_task = handle_task
        self.app = handle_task.app
        self.publisher = publisher
        self.delivery = delivery

    def call(self, pool: str, events: list[Signal], timeout: float,
             call_timeout: float | None, reply_grace: float,
             model: str | None = None) -> list[AgentReply]:
        """Run ``events`` on one agent of ``pool`` (see :meth:`PoolClient.transaction`)."""
        spec = self.configuration.spec(pool)
        started = time.monotonic()
        call = CallMessage(pool, [event.to_wire() for event in events], time.time() + timeout,
                           call_timeout, transaction=len(events) > 1,
                           model=pool_model(pool, spec.max_models, model))
        bound = Bound(pool, spec.queue, spec.max_queued)

        def send() -> Any:
            # Through a producer of the publisher's, so the pool's bound holds here too.
            with self.publisher.producer(bound) as producer:
                return self.handle_task.apply_async(  # type: ignore[call-arg]
                    call.to_args(), producer=producer, argsrepr=call.argsrepr(),
                    kwargsrepr="{}", retry=False,
                    **route(pool_queue(self.app, spec.queue, spec.max_queued)))

        sent = self.delivery.publish(send, started + timeout, timeout)
        # Read through app.backend, which Celery subscribed in this thread as it sent.
        result: AsyncResult = AsyncResult(sent.id, app=self.app)  # type: ignore[type-arg]
        window = timeout + (call_timeout or 0.0) + reply_grace
        silent = functools.partial(no_reply, pool, timeout, window, spec.size,
                                   spec.max_overflow)
        try:
            replies = self.delivery.wait(result, started + window, window, silent)
        except WarmPoolError:
            raise
        except Exception as exc:  # the worker's own failure, as Celery raised it here
            raise WorkerFailed.wrapping(exc, pool) from exc
        return [AgentReply.model_validate(reply) for reply in replies]


def no_reply(pool: str, timeout: float, window: float, size: int,
             max_overflow: int) -> CheckoutTimeout:
    """The error of a call that heard nothing within ``window`` seconds."""
    # The message carries its deadline: a worker that takes it now drops it.
    return CheckoutTimeout(
        f"pool {pool!r}: no reply within {window:.1f}s. No worker started the call "
        f"within timeout={timeout}s (it carries that deadline and will not start "
        "later), or the worker running it was lost", pool, window, size, max_overflow)
