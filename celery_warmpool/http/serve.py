"""Running the gateway under uvicorn: what ``celery warmpool serve`` does."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import uvicorn

from .app import create_app
from .guard import DEFAULT_MAX_BODY

if TYPE_CHECKING:
    from ..extension import WarmPool

__all__ = ["is_loopback", "serve"]

logger = logging.getLogger("celery_warmpool.http")

#: Seconds open streams get to end when the server is told to stop.
GRACEFUL_SHUTDOWN = 10


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def serve(warm: WarmPool, *, host: str = "127.0.0.1", port: int = 8000,
          pools: Iterable[str] | None = None, token: str | None = None,
          max_body: int = DEFAULT_MAX_BODY, access_log: bool = False) -> None:
    """Serve ``warm``'s pools over HTTP until the process is told to stop.

    Raises:
        UnknownPool: ``pools`` names a pool the app does not have.
    """
    app = create_app(warm, token=token, max_body=max_body, pools=pools)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if not token and not is_loopback(host):
        logger.warning(
            "serving on %s without a token: anyone who can reach it can call every pool; "
            "give --token or set WARMPOOL_HTTP_TOKEN", host)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
