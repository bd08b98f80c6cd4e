"""An embedded broker and result store that need no server: for demos and examples.

Kombu's filesystem transport carries the messages (fanout included, so broadcast
commands such as ``warmpool_status`` work) and Celery's file result backend keeps the
results, both in one directory that every process on the machine can reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["POLLING_INTERVAL", "embedded_config", "is_embedded"]

#: Seconds between two looks at the message folder when it is empty.
POLLING_INTERVAL = 0.01


def embedded_config(directory: str | Path) -> dict[str, Any]:
    """Celery settings for a broker and result store kept under ``directory``."""
    root = Path(directory).resolve()
    queue = root / "queue"
    processed = root / "processed"
    results = root / "results"
    for folder in (queue, processed, results):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "store_processed": False,
            # Fanout (broadcast, control commands) needs a shared control folder.
            "control_folder": str(root / "control"),
            # Kombu polls the folder once a second by default: every hop of a call
            # would wait up to that long.
            "polling_interval": POLLING_INTERVAL,
        },
        "result_backend": f"file://{results}",
        "broker_connection_retry_on_startup": True,
    }


def is_embedded(broker_url: str | None) -> bool:
    """Whether ``broker_url`` names the embedded (filesystem) broker."""
    return not broker_url or broker_url.startswith("filesystem://")
