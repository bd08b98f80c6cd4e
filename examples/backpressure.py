"""Backpressure: when every agent is busy, fail fast instead of queueing without end.

Run it (in-process pools first, then its own worker on an embedded broker):

    python examples/backpressure.py

On Redis: ``python examples/backpressure.py --broker redis://127.0.0.1:6379/0``.

A burst of 10 requests meets a pool of 2 agents whose work takes a while. Waiting
without a limit serves everyone, late; a short checkout ``timeout`` (``CheckoutTimeout``)
or ``block=False`` (``PoolExhausted``) sheds what cannot be served now, at once, so the
caller can answer "busy, retry later". In Celery, ``warm.call(..., timeout=...)`` sheds the
same way, and the shed call never runs later.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentPool,
    CheckoutTimeout,
    PoolExhausted,
    PoolSpec,
    Signal,
    WarmPool,
)
from examples.launch import BrokerChoice, example_app, parse_options, running_worker

BURST = 10
POOL_SIZE = 2
WORK_SECONDS = 0.3


class WorkState(BaseModel):
    done: int = 0


class Work(Action):
    """Hold the agent for ``seconds``, like a call to a slow backend."""

    name = "work"

    class Params(BaseModel):
        seconds: float = WORK_SECONDS

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        time.sleep(params.seconds)
        return {"done": context.state.done + 1}


class WorkerAgent(Agent[WorkState]):
    signal_routes = {"work.run": Work}


app = example_app("backpressure")
warm = WarmPool(app, pools=[PoolSpec("slow", WorkerAgent, size=POOL_SIZE)])


def work(seconds: float = WORK_SECONDS) -> Signal:
    return Signal.new("work.run", {"seconds": seconds}, source="/examples/backpressure")


def burst(request: Callable[[], object], refusal: str = "") -> str:
    """Send ``BURST`` requests at the same moment; say how many were served and shed."""
    start = threading.Barrier(BURST)
    outcomes: list[tuple[bool, float]] = []

    def one() -> None:
        start.wait()
        began = time.perf_counter()
        try:
            request()
            served = True
        except (CheckoutTimeout, PoolExhausted):
            served = False
        outcomes.append((served, time.perf_counter() - began))

    with ThreadPoolExecutor(BURST) as threads:
        for future in [threads.submit(one) for _ in range(BURST)]:
            future.result()
    served = [seconds for ok, seconds in outcomes if ok]
    shed = [seconds for ok, seconds in outcomes if not ok]
    text = f"served {len(served)} (slowest in {max(served, default=0):.2f}s)"
    if shed:
        text += f", shed {len(shed)} by {refusal} (each told within {max(shed) * 1000:.0f} ms)"
    return text


def in_process() -> None:
    with AgentPool(WorkerAgent, name="slow", size=POOL_SIZE) as pool:
        print(f"in-process pool of {POOL_SIZE} agents, a burst of {BURST} requests "
              f"of {WORK_SECONDS}s each:")
        print(f"  wait as long as it takes:  {burst(lambda: pool.call(work()))}")
        print(f"  checkout timeout 0.05s:    "
              f"{burst(lambda: pool.call(work(), timeout=0.05), 'CheckoutTimeout')}")

        def without_waiting() -> None:
            with pool.agent(block=False) as agent:
                agent.handle(work())

        print(f"  block=False:               {burst(without_waiting, 'PoolExhausted')}")
        counters = pool.status().counters
        print(f"  pool counters: checkouts={counters.checkouts} "
              f"exhausted={counters.exhausted} timeouts={counters.timeouts}")


def over_celery(choice: BrokerChoice) -> None:
    with running_worker(app, "examples.backpressure", choice, pool="threads", concurrency=8):
        print(f"in a Celery worker: {POOL_SIZE} long jobs hold both agents; "
              "calls with timeout=0.3s meanwhile:")
        busy = [warm.cast("slow", work(seconds=4.0)) for _ in range(POOL_SIZE)]
        for _ in range(20):  # until both jobs hold their agents
            status = warm.status("slow")
            if status.checked_out >= POOL_SIZE:
                break
        print(f"  pool status: state={status.state} checked_out={status.checked_out} "
              f"available={status.available}")
        served = shed = 0
        slowest_shed = 0.0
        for _ in range(3):
            began = time.perf_counter()
            try:
                warm.call("slow", work(seconds=0.0), timeout=0.3)
                served += 1
            except CheckoutTimeout:
                shed += 1
                slowest_shed = max(slowest_shed, time.perf_counter() - began)
        print(f"  while saturated: served {served}, shed {shed} by CheckoutTimeout (each "
              f"told within {slowest_shed * 1000:.0f} ms)")
        for result in busy:
            result.get(timeout=30, interval=0.01)
        reply = warm.call("slow", work(seconds=0.0), timeout=0.3)
        print(f"  once the long jobs are done: served; its agent has done "
              f"{reply.state['done']} jobs (its long job and this call: the shed calls "
              "never ran)")


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "Fail fast when a pool is saturated.", argv)
    in_process()
    over_celery(choice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
