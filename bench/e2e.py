"""End-to-end latency and throughput: warm pools against bare Celery, in one run.

    python bench/e2e.py            # about a minute
    python bench/e2e.py --quick

Starts one prefork worker (concurrency 2) on the local Redis (databases 10 and 11) and
measures, interleaved so that machine noise hits every row alike:

- a bare Celery task round trip (``acks_late``, like pool tasks: same delivery guarantee);
- ``warm.call`` with a trivial action;
- a pool-aware task (``@warm.task``) round trip;
- a spawn-per-request task whose agent takes 200 ms to build;

then the throughput of a burst of ``warm.cast`` against a burst of bare ``.delay()``.
Results are ratios to bare Celery; the shared machine makes absolute numbers noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
from celery.result import AsyncResult

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import redis_url, send_and_wait  # noqa: E402

BROKER, BACKEND = redis_url(10), redis_url(11)
# The app reads its URLs when imported.
os.environ.update({"WARMPOOL_BROKER_URL": BROKER, "WARMPOOL_RESULT_BACKEND": BACKEND})

from bench.e2e_app import TOUCH, app, bare, echo, pooled, spawn, warm  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

#: Targets: warm.call p50 within 5% of bare Celery; cast throughput within 5% of .delay().
CALL_P50_TARGET = 1.05
CAST_THROUGHPUT_TARGET = 0.95


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def latencies(rounds: int, spawn_every: int) -> dict[str, list[float]]:
    reply = warm.call("trivial", TOUCH).model_dump(mode="json")
    runs: dict[str, Callable[[], object]] = {
        "bare Celery task": lambda: bare.delay().get(timeout=10),
        "bare, same payload": lambda: echo.delay(TOUCH.to_wire(), reply).get(timeout=10),
        "warm.call": lambda: warm.call("trivial", TOUCH),
        "pool-aware task": lambda: pooled.delay().get(timeout=10),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    samples["spawn-per-request task"] = []
    for run in runs.values():  # warm every path up once
        run()
    for index in range(rounds):
        for name, run in runs.items():
            samples[name].append(timed(run))
        if index % spawn_every == 0:
            samples["spawn-per-request task"].append(
                timed(lambda: spawn.delay().get(timeout=10)))
    return samples


def burst(send: Callable[[], AsyncResult], count: int) -> float:
    """Messages per second for ``count`` sends and all their results."""
    started = time.perf_counter()
    send_and_wait(app, send, count)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    options = parser.parse_args()
    rounds, burst_size, repeats = (100, 200, 2) if options.quick else (400, 500, 6)

    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    worker = WorkerProcess("bench.e2e_app", pool="prefork", concurrency=2, broker=BROKER,
                           backend=BACKEND, cwd=ROOT, loglevel="WARNING",
                           env={"PYTHONPATH": str(ROOT)})
    worker.start()
    try:
        app.control.ping(timeout=0.5)
        samples = latencies(rounds, spawn_every=max(1, rounds // 20))
        casts: list[float] = []
        delays: list[float] = []
        for repeat in range(repeats):
            # Alternate which goes first, so that a drift in the machine's load hits both.
            runs = [(delays, lambda: bare.delay()),
                    (casts, lambda: warm.cast("trivial", TOUCH))]
            for rates, send in runs if repeat % 2 == 0 else reversed(runs):
                rates.append(burst(send, burst_size))
    finally:
        worker.stop()

    base50 = statistics.median(samples["bare Celery task"])
    base99 = percentile(samples["bare Celery task"], 0.99)
    print(f"one prefork worker, concurrency 2, Redis; {rounds} round trips each "
          f"(spawn-per-request: {len(samples['spawn-per-request task'])})\n")
    print(f"{'round trip':<24}{'p50 ms':>9}{'p99 ms':>9}{'p50 / bare':>12}{'p99 / bare':>12}")
    for name, values in samples.items():
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        print(f"{name:<24}{p50 * 1e3:>9.2f}{p99 * 1e3:>9.2f}{p50 / base50:>12.2f}"
              f"{p99 / base99:>12.2f}")
    delay_rate, cast_rate = max(delays), max(casts)
    print(f"\n{'burst of ' + str(burst_size):<24}{'msg/s':>9}{'/ bare':>9}")
    print(f"{'bare .delay()':<24}{delay_rate:>9.0f}{1.0:>9.2f}")
    print(f"{'warm.cast':<24}{cast_rate:>9.0f}{cast_rate / delay_rate:>9.2f}")

    call_ratio = statistics.median(samples["warm.call"]) / base50
    cast_ratio = cast_rate / delay_rate
    print(f"\ntarget warm.call p50 <= {CALL_P50_TARGET} x bare: {call_ratio:.2f} "
          f"{'PASS' if call_ratio <= CALL_P50_TARGET else 'MISS'}")
    print(f"target warm.cast throughput >= {CAST_THROUGHPUT_TARGET} x bare: {cast_ratio:.2f} "
          f"{'PASS' if cast_ratio >= CAST_THROUGHPUT_TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
