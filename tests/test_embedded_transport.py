"""The embedded broker's transport: a reader never takes a message before it is written."""

from __future__ import annotations

import threading
from pathlib import Path
from queue import Empty
from typing import Any

from kombu import Connection

from celery_warmpool.ops.embedded import Transport, embedded_config

QUEUE = "warmpool.race"


def race(transport: Any, directory: Path, messages: int = 200) -> tuple[int, list[str]]:
    """Write ``messages`` large messages while another connection reads them as they come.

    Returns how many were read intact, and the errors the reader met.
    """
    options = embedded_config(directory)["broker_transport_options"]
    payload = {"body": "x" * 200_000, "n": 0}
    read, errors = 0, []
    done = threading.Event()

    def reader() -> None:
        nonlocal read
        with Connection("filesystem://", transport=transport,
                        transport_options=options) as connection:
            channel: Any = connection.default_channel
            while read < messages and not (done.is_set() and not _pending(directory)):
                try:
                    message = channel._get(QUEUE)
                except Empty:
                    continue
                except ValueError as exc:  # a half-written file: JSONDecodeError
                    errors.append(repr(exc))
                    continue
                if message["body"] == payload["body"]:
                    read += 1
                else:
                    errors.append(f"message {message.get('n')} was cut short")

    thread = threading.Thread(target=reader)
    thread.start()
    with Connection("filesystem://", transport=transport,
                    transport_options=options) as connection:
        writer: Any = connection.default_channel
        for number in range(messages):
            writer._put(QUEUE, {**payload, "n": number})
    done.set()
    thread.join(60)
    return read, errors


def _pending(directory: Path) -> bool:
    return any((directory / "queue").glob(f"*.{QUEUE}.msg"))


def test_reader_never_takes_a_half_written_message(tmp_path: Path) -> None:
    read, errors = race(Transport, tmp_path)
    assert errors == []
    assert read == 200


def test_embedded_config_selects_the_atomic_transport(tmp_path: Path) -> None:
    config = embedded_config(tmp_path)
    assert config["broker_url"] == "filesystem://"
    assert config["broker_transport"] == "celery_warmpool.ops.embedded:Transport"
