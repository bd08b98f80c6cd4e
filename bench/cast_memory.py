"""A caller that only casts: 100,000 casts with no outage, memory held for few of them.

    python bench/cast_memory.py               # 100,000 casts, about 10 minutes
    python bench/cast_memory.py --casts 20000

With a Redis broker a caller keeps each cast it sent until a worker is known to have
taken it, to send it again if a broker restart lost it (see
``celery_warmpool.client.resends``). This measures that the record stays bounded when no
outage happens: one threads node (``-c 16``) serves ``bench/long_lived_app.py``'s pool on
a redis-server of the run's own (appendonly, each write synced, as for a broker that
must lose no cast); this process casts ``lived.echo`` from one thread, as
fast as it can publish, and reads its resident memory (RSS) and the number of casts it
keeps every 10,000 casts.

Targets: RSS grows by at most 5% between the 10,000th cast and the last, and the record
never holds more than ``MOST_KEPT`` casts (it holds those not yet taken: as many as the
node is behind, plus up to ``SWEEP_AT`` taken ones not yet looked for); once the node
has run every cast, a sweep leaves none. Exit status 0 if every target is met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak import RedisServer  # noqa: E402
from celery_warmpool.client.resends import MOST_KEPT  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

MARK = 10_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--casts", type=int, default=100_000, help="casts (default 100,000)")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="warmpool-cast-memory-"))
    store = RedisServer(folder)
    store.start()
    os.environ.update(WARMPOOL_BROKER_URL=f"{store.url}/0",
                      WARMPOOL_RESULT_BACKEND=f"{store.url}/1")
    worker = WorkerProcess("bench.long_lived_app", pool="threads", concurrency=16,
                           broker=f"{store.url}/0", backend=f"{store.url}/1",
                           env={"PYTHONPATH": str(ROOT)}, cwd=ROOT, loglevel="WARNING",
                           log_path=folder / "worker.log")
    verdict = 1
    try:
        worker.start(timeout=60)
        verdict = cast_and_measure(options.casts)
        return verdict
    finally:
        worker.stop()
        store.stop()
        if verdict == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"(the worker's and the store's logs are kept in {folder})")


def cast_and_measure(total: int) -> int:
    from bench.long_lived_app import warm

    me = psutil.Process()
    rss: dict[int, int] = {}
    kept: dict[int, int] = {}
    started = time.monotonic()
    for number in range(1, total + 1):
        warm.cast("lived", {"type": "lived.echo", "data": {"value": number}})
        if number % MARK == 0 or number == total:
            rss[number] = me.memory_info().rss
            kept[number] = len(warm.client._sent_casts or ())
            print(f"{number:>8,} casts: RSS {rss[number] / 2**20:7.1f} MiB, "
                  f"{kept[number]:>6,} kept", flush=True)
    elapsed = time.monotonic() - started
    settled = _settled(warm, total)
    first = rss[min(MARK, total)]
    growth = (rss[total] - first) / first
    print(f"\n{total:,} casts in {elapsed:.1f} s ({total / elapsed:,.0f} casts/s)")
    targets = [
        (f"RSS from cast {min(MARK, total):,} to the last: {growth:+.1%} (at most +5%)",
         growth <= 0.05),
        (f"casts kept at most: {max(kept.values()):,} (at most {MOST_KEPT:,})",
         max(kept.values()) <= MOST_KEPT),
        (f"casts kept once the node ran them all and a sweep looked: {settled:,} (0)",
         settled == 0),
    ]
    for text, met in targets:
        print(f"  {'met    ' if met else 'MISSED '} {text}")
    return 0 if all(met for _, met in targets) else 1


def _settled(warm: Any, total: int) -> int:
    """Casts kept once the node has run every one and the record was swept once more."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if warm.status("lived", timeout=2.0).counters.calls >= total:
            break
        time.sleep(0.5)
    record = warm.client._sent_casts
    if record is None:
        return 0
    time.sleep(1.0)  # older than SWEEP_AGE, every one of them
    swept = threading.Event()
    warm.client.listener().submit(lambda client: (record.sweep(client), swept.set()))
    swept.wait(30)
    return len(record)


if __name__ == "__main__":
    raise SystemExit(main())
