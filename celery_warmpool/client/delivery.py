"""Getting a message through, and its answer back, within the caller's deadline.

A broker or result store that goes away for less than a call's ``timeout`` (a restart, a
failover) is waited out: publishing is retried until the deadline, and the wait for the
reply keeps going across the reconnection. Only an outage that outlasts the deadline
reaches the caller, as :class:`BrokerUnavailable` naming the address (password masked),
never as kombu's or redis' own exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from ..core.errors import BrokerUnavailable

__all__ = ["Delivery"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two tries while the broker is away: first and longest.
RETRY_FIRST = 0.05
RETRY_MOST = 0.5
#: How a single publish retries by itself (kombu reconnects in between); our own loop
#: repeats it until the caller's deadline.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.1,
                 "interval_max": 0.2}


class Delivery:
    """Publishes and waits for ``app`` within deadlines, across broker outages."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._outages: tuple[type[BaseException], ...] | None = None

    @property
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

    def outages(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean "the broker or result store cannot be reached"."""
        if self._outages is None:
            connection = self.app.connection_for_write()
            try:
                found = (*connection.connection_errors, *connection.channel_errors)
            finally:
                connection.release()
            backend = getattr(self.app.backend, "connection_errors", ())
            self._outages = (OperationalError, ConnectionError, *found, *backend)
        return self._outages

    def publish(self, send: Callable[[], T], deadline: float, timeout: float) -> T:
        """Run ``send()`` (a publish) until it works or ``deadline`` passes.

        Raises:
            BrokerUnavailable: the broker could not be reached before the deadline.
        """
        delay = RETRY_FIRST
        while True:
            try:
                return send()
            except self.outages() as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"could not reach the broker {self.broker_url} within "
                        f"{timeout:g}s: {type(exc).__name__}: {exc}", self.broker_url,
                        timeout) from exc
                logger.debug("broker %s unreachable (%r); retrying", self.broker_url, exc)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, RETRY_MOST)

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
                return result.get(timeout=remaining, interval=0.02,
                                  disable_sync_subtasks=False)
            except CeleryTimeout:
                outage = None  # reachable, just no answer yet: the deadline decides
            except self.outages() as exc:
                outage = exc
                logger.debug("result store %s unreachable (%r); still waiting",
                             self.backend_url, exc)
                time.sleep(min(RETRY_MOST, max(0.0, deadline - time.monotonic())))
