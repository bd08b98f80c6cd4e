"""``/healthz``: whether the broker and the result store can be reached now.

Both checks block (kombu and the result backend have no asyncio client), so they run in
a small executor of their own, each bounded by a short timeout. The executor is the
gateway's and has two threads: Celery's result backend is per thread, so a check run on
any thread of the loop's default executor could leave a Redis client on each of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

__all__ = ["HealthCheck"]

logger = logging.getLogger(__name__)

#: Seconds each check may take before its part counts as down.
CHECK_TIMEOUT = 2.0


class HealthCheck:
    """Checks ``app``'s broker and result store, each within ``timeout`` seconds."""

    def __init__(self, app: Celery, timeout: float = CHECK_TIMEOUT) -> None:
        self.app = app
        self.timeout = timeout
        self._executor: ThreadPoolExecutor | None = None

    async def check(self) -> dict[str, str]:
        """``{"broker": ..., "result_store": ...}``, each ``"ok"`` or why it is down."""
        broker, store = await asyncio.gather(self._run(self._broker),
                                             self._run(self._result_store))
        return {"broker": broker, "result_store": store}

    def close(self) -> None:
        """Let the executor's threads go (a check still running finishes on its own)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _run(self, probe: Any) -> str:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(2, thread_name_prefix="warmpool-health")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, probe), self.timeout)
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except Exception as exc:
            logger.warning("health check %s failed: %r", probe.__name__, exc)
            return f"unreachable: {type(exc).__name__}"
        return "ok"

    def _broker(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=math.ceil(self.timeout))

    def _result_store(self) -> None:
        backend = self.app.backend
        client = getattr(backend, "client", None)
        if client is not None and hasattr(client, "ping"):
            client.ping()  # Redis: the result store's own client
        else:
            backend.get_task_meta("warmpool-healthz")  # any store: one read
