"""Getting a message through, and its answer back, within the caller's deadline.

A broker or result store that goes away for less than a call's ``timeout`` (a restart, a
failover) is waited out: publishing is retried until the deadline, and the wait for the
reply keeps going across the reconnection. Only an outage that outlasts the deadline
reaches the caller, as :class:`BrokerUnavailable` naming the address (password masked),
never as kombu's or redis' own exception.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.utils.url import maybe_sanitize_url

from ..core.errors import BrokerUnavailable
from ..wire.outages import BACKOFF, Outages
from .protocol import publish_steps
from .shells import run_blocking

__all__ = ["Delivery"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between looks for a reply: where it comes by subscription, and where the
#: result store must be polled for it.
ASYNC_INTERVAL = 0.5
POLL_INTERVAL = 0.01
#: The longest single wait for a reply: each new wait reads the stored result again, so a
#: notification missed while the result store was away costs at most this much.
WAIT_SLICE = 1.0


class Delivery:
    """Publishes and waits for ``app`` within deadlines, across broker outages."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def interval(self) -> float:
        """How often to look for a reply: Celery's default where replies come by
        subscription (Redis, RPC: a shorter one only costs every call about half a
        millisecond of the caller's time); often where the result store is polled."""
        return ASYNC_INTERVAL if getattr(self.app.backend, "is_async", False) else POLL_INTERVAL

    @functools.cached_property
    def broker_url(self) -> str:
        """The broker's address, password masked."""
        return str(maybe_sanitize_url(self.app.conf.broker_url or "amqp://"))

    @property
    def backend_url(self) -> str:
        """The result store's address, password masked."""
        backend = self.app.backend
        try:
            return str(backend.as_uri())
        except Exception:  # a backend without a URI form
            return str(maybe_sanitize_url(str(self.app.conf.result_backend)))

    @property
    def outages(self) -> Outages:
        """What says "the broker or result store cannot be reached" for this app."""
        return Outages.of(self.app)

    def publish(self, send: Callable[[], T], deadline: float, timeout: float) -> T:
        """Run ``send()`` (a publish) until it works or ``deadline`` passes.

        Raises:
            BrokerUnavailable: the broker could not be reached before the deadline.
        """
        return run_blocking(publish_steps(send, deadline, timeout, self.outages,
                                          self.broker_url))

    def wait(self, result: Any, deadline: float, window: float,
             no_reply: Callable[[], BaseException]) -> Any:
        """The value of ``result`` once ready; wait until ``deadline`` at most.

        Errors the work raised are raised here. A result store that is away is waited
        out until the deadline.

        Raises:
            BrokerUnavailable: the result store was unreachable when the deadline passed.
            What ``no_reply()`` returns: no answer came before the deadline.
        """
        outage: BaseException | None = None
        pauses = BACKOFF.pauses()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if outage is not None:
                    raise BrokerUnavailable(
                        f"could not reach the result store {self.backend_url} for the "
                        f"reply within {window:g}s: {type(outage).__name__}: {outage}",
                        self.backend_url, window) from outage
                raise no_reply()
            try:
                return result.get(timeout=min(remaining, WAIT_SLICE), interval=self.interval,
                                  disable_sync_subtasks=False)
            except CeleryTimeout:
                outage = None  # reachable, just no answer yet: the deadline decides
            except Exception as exc:
                if not self.outages.is_outage(exc):
                    raise  # the worker's answer (an error of the call), or a fault
                outage = exc
                logger.debug("result store %s unreachable (%r); still waiting",
                             self.backend_url, exc)
                time.sleep(min(next(pauses), max(0.0, deadline - time.monotonic())))
