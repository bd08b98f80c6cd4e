"""Where agents get built in a prefork child (and in the solo pool's one process).

Celery sends ``worker_process_init`` in each new prefork child, the replacements of dead
or recycled children included, before the child tells the main process it is up, so a
child still warming up is never given a task. The solo pool sends it in the main process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import signals

if TYPE_CHECKING:
    from .extension import WarmPool

__all__ = ["connect"]

logger = logging.getLogger(__name__)


def _process_index() -> int:
    try:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
    except ImportError:  # pragma: no cover - billiard ships with Celery
        index = None
    return int(index) if index is not None else 0


def connect(warm: WarmPool) -> None:
    """Build ``warm``'s pools in each child as it starts; close them as it exits."""

    def on_process_init(sender: Any = None, **kwargs: Any) -> None:
        if warm.execution not in ("prefork", "solo"):
            return  # not a worker of this app, or its pools live in the main process
        warm.start_process(index=_process_index())

    def on_process_shutdown(sender: Any = None, **kwargs: Any) -> None:
        if warm.execution == "prefork":
            warm.stop_process()

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False)
