"""Warm means warm: the first call to a node just ready, against a steady one.

    pip install -e '.[ml]'           # torch (CPU) and all-MiniLM-L6-v2
    python bench/warmup.py           # about three minutes

all-MiniLM-L6-v2 on the CPU, one torch thread per process, a sentence per call; the
duration is the agent's own (``reply.duration``), so the broker and the caller's side do
not blur it. Three ways to hold the model, each on fresh nodes with and without
``PoolSpec(warmup=[one embed])``:

- ``preloaded``, a prefork node (-c 2): the model loaded once by ``preload`` before the
  fork, shared by both children;
- ``per_agent``, a threads node (-c 2, 2 agents): each agent loads its copy in ``setup()``;
- ``models``, a threads node (-c 2, 2 agents): a multiplexed pool, the model loaded ahead
  as ``minilm`` (``models=["minilm"]``) by ``load_model``.

For each node, its first call against the median of the 40 calls after it, and one call
after the node idled 3 s (what a pause costs a warm node on this machine). Target, with
warm-up: a ratio of at most 1.2 for every way, in the median of ``--runs`` fresh nodes.
The exit status is 0 when it is met.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REDIS = os.environ.get("WARMPOOL_BENCH_REDIS", "redis://127.0.0.1:6379")
BROKER, BACKEND = f"{REDIS}/12", f"{REDIS}/13"
# Read by the app module as it is imported (by this process and by the workers).
os.environ.update(WARMPOOL_BROKER_URL=BROKER, WARMPOOL_RESULT_BACKEND=BACKEND)

import redis  # noqa: E402

from bench.measure import print_targets  # noqa: E402
from bench.warmup_app import make_app  # noqa: E402
from celery_warmpool.ops.processes import WorkerProcess  # noqa: E402

SCENARIOS = (("preloaded", "prefork"), ("per_agent", "threads"), ("models", "threads"))
STEADY = 40
#: Seconds the node idles before the last call: a warm node's call after a pause costs
#: more than one in a stream of calls (caches cooled, on a shared machine), whatever
#: warm-up did; that call shows how much.
IDLE = 3.0
TARGET = 1.2


def run_node(scenario: str, execution: str,
             warm_up: bool) -> tuple[float, float, float, float]:
    """On a fresh node: its first call, the median of the calls after it, one call after
    the node idled IDLE seconds (ms), and the warm-up seconds its status shows."""
    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    node = WorkerProcess("bench.warmup_app", pool=execution, concurrency=2, broker=BROKER,
                         backend=BACKEND, cwd=ROOT, loglevel="WARNING",
                         env={"PYTHONPATH": str(ROOT), "WARMPOOL_BENCH_SCENARIO": scenario,
                              "WARMPOOL_BENCH_WARMUP": "1" if warm_up else "0"})
    node.start(timeout=300)
    try:
        _, warm = make_app(scenario, warm_up)
        model = "minilm" if scenario == "models" else None

        def send(text: str) -> Any:
            return warm.call("embedder", {"type": "text.embed", "data": {"text": text}},
                             timeout=60, call_timeout=60, model=model)

        first = send("the first sentence after the node is ready").duration * 1000
        steady = [send(f"a steady sentence number {index}").duration * 1000
                  for index in range(STEADY)]
        time.sleep(IDLE)
        idle = send("a sentence after the node idled").duration * 1000
        status = warm.status("embedder")
        return first, statistics.median(steady), idle, status.warmup_seconds or 0.0
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh nodes per way and setting")
    parser.add_argument("--ways", nargs="+", default=[way for way, _ in SCENARIOS],
                        choices=[way for way, _ in SCENARIOS], help="the ways to measure")
    options = parser.parse_args()
    scenarios = [(way, execution) for way, execution in SCENARIOS if way in options.ways]
    ratios: dict[tuple[str, bool], list[float]] = {}
    print("all-MiniLM-L6-v2 on the CPU, one sentence per call, agent time (reply.duration)\n")
    print(f"  {'way':10} {'warm-up':8} {'first ms':>9} {'steady ms':>10} {'ratio':>6} "
          f"{'after idle ms':>14} {'warm-up s':>10}")
    for scenario, execution in scenarios:
        for warm_up in (False, True):
            for _ in range(options.runs):
                first, steady, idle, warmup_seconds = run_node(scenario, execution, warm_up)
                ratios.setdefault((scenario, warm_up), []).append(first / steady)
                print(f"  {scenario:10} {'yes' if warm_up else 'no':8} {first:9.1f} "
                      f"{steady:10.1f} {first / steady:6.2f} {idle:14.1f} "
                      f"{warmup_seconds:10.2f}", flush=True)
    print("\nthe first call / the steady median, median over nodes")
    checks = []
    for scenario, execution in scenarios:
        for warm_up in (False, True):
            median = statistics.median(ratios[(scenario, warm_up)])
            name = f"{scenario} ({execution}), warm-up {'on' if warm_up else 'off'}"
            checks.append((name, median, f"<= {TARGET}" if warm_up else "-",
                           median <= TARGET if warm_up else True))
    print_targets(checks, width=44)
    return 0 if all(met for *_, met in checks) else 1


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"\n{time.monotonic() - started:.0f} s")
    sys.exit(status)
