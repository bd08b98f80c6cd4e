"""An embedded broker and result store that need no server: for demos and examples.

Kombu's filesystem transport carries the messages (fanout included, so broadcast
commands such as ``warmpool_status`` work) and Celery's file result backend keeps the
results, both in one directory that every process on the machine can reach.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.json import dumps

__all__ = ["POLLING_INTERVAL", "Transport", "embedded_config", "is_embedded"]

#: Seconds between two looks at the message folder when it is empty.
POLLING_INTERVAL = 0.01


class Channel(filesystem.Channel):
    """Kombu's filesystem channel, writing each message atomically."""

    # The same signature as Kombu's filesystem channel, which its own base types differently.
    def _put(self, queue: str, payload: dict[str, Any],  # type: ignore[override]
             **kwargs: Any) -> None:
        """Put a message on ``queue``: written under a name readers skip, then renamed.

        Kombu's own channel creates the message file and then writes it, so a reader
        polling the folder can take the file while it is still empty and fail on it.
        """
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.part"
        with open(partial, "wb") as file:
            file.write(dumps(payload).encode())
        os.replace(partial, final)


class Transport(filesystem.Transport):
    """The embedded broker's transport (see :class:`Channel`)."""

    Channel = Channel


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
        "broker_transport": f"{__name__}:Transport",
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
