"""A caller in a process of its own, for tests that read what it prints.

    python -m tests.quiet_caller BROKER BACKEND SECONDS

It calls the ``counter`` pool of ``tests.integration_app`` for ``SECONDS`` seconds from a
thread (``warm.call``), an event loop (``warm.acall``) and with casts (``warm.cast``, every
tenth one waited for with ``AsyncResult.get``, which starts Celery's own result consumer),
dropping every result as it goes. Its log goes to stdout, so that whatever reaches stderr
is what Python or a library printed on its own. It says ``calling`` once the first call is
answered, and at the end one JSON line: the outcomes by kind.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

from tests.integration_app import make_app

ECHO = {"type": "counter.echo", "data": {"value": 1}}


def calls(warm: Any, until: float, outcomes: Counter[str]) -> None:
    while time.monotonic() < until:
        try:
            warm.call("counter", ECHO, timeout=10)
            outcomes["call"] += 1
        except Exception as exc:
            outcomes[f"call {type(exc).__name__}"] += 1


async def acalls(warm: Any, until: float, outcomes: Counter[str]) -> None:
    while time.monotonic() < until:
        try:
            await warm.acall("counter", ECHO, timeout=10)
            outcomes["acall"] += 1
        except Exception as exc:
            outcomes[f"acall {type(exc).__name__}"] += 1


def casts(warm: Any, until: float, outcomes: Counter[str]) -> None:
    number = 0
    while time.monotonic() < until:
        number += 1
        try:
            result = warm.cast("counter", ECHO)
            if number % 10 == 0:
                result.get(timeout=10)
            outcomes["cast"] += 1
        except Exception as exc:
            outcomes[f"cast {type(exc).__name__}"] += 1
        del result
        time.sleep(0.02)


def main() -> None:
    broker, backend, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _, warm = make_app(broker, backend, [{"name": "counter", "size": 2,
                                         "agent": "tests.integration_app:CounterAgent"}])
    warm.call("counter", ECHO, timeout=30)
    print("calling", flush=True)
    outcomes: Counter[str] = Counter()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=calls, args=(warm, until, outcomes)),
               threading.Thread(target=casts, args=(warm, until, outcomes)),
               threading.Thread(target=asyncio.run, args=(acalls(warm, until, outcomes),))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()
    print(json.dumps(outcomes), flush=True)


if __name__ == "__main__":
    main()
