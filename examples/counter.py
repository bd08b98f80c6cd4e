"""A counter pool: state that persists across calls, per-request isolation, failed calls.

Run it (starts its own worker on an embedded broker; no server needed):

    python examples/counter.py

On Redis: ``python examples/counter.py --broker redis://127.0.0.1:6379/0``.
To run the worker yourself: ``celery -A examples.counter worker -P threads -c 2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

from typing import Any

from pydantic import BaseModel

from celery_warmpool import (
    Action,
    ActionContext,
    ActionFailed,
    Agent,
    PoolSpec,
    Signal,
    WarmPool,
)
from examples.launch import example_app, parse_options, running_worker


class CounterState(BaseModel):
    count: int = 0
    last_by: int = 0


class Increment(Action):
    name = "increment"

    class Params(BaseModel):
        by: int = 1

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"count": context.state.count + params.by, "last_by": params.by}


class Fail(Action):
    name = "fail"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        context.state.count = -1  # changed in place, then failed: the agent never sees it
        raise RuntimeError("asked to fail")


class CounterAgent(Agent[CounterState]):
    signal_routes = {"counter.increment": Increment, "counter.fail": Fail}


app = example_app("counter")
warm = WarmPool(app, pools=[
    PoolSpec("counter", CounterAgent, size=1),
    PoolSpec("isolated", CounterAgent, size=1, reset_on_checkin=True),
])


@warm.task(pool="counter", name="counter.peek")
def peek(agent: CounterAgent) -> int:
    """A pool-aware task: the worker passes the agent, callers pass nothing."""
    return agent.state.count


def main(argv: list[str] | None = None) -> int:
    _, choice = parse_options(app, "A counter pool in a real Celery worker.", argv)
    increment = Signal.new("counter.increment", {"by": 1}, source="/examples/counter")
    with running_worker(app, "examples.counter", choice, pool="threads", concurrency=2):
        first = warm.call("counter", increment)
        second = warm.call("counter", increment)
        print(f"shared state: count {first.state['count']} then {second.state['count']} "
              f"(agent {second.agent_id}, pid {second.pid})")

        one = warm.call("isolated", increment)
        two = warm.call("isolated", increment)
        print(f"reset_on_checkin: count {one.state['count']} then {two.state['count']}")

        try:
            warm.call("counter", Signal.new("counter.fail", source="/examples/counter"))
        except ActionFailed as exc:
            print(f"failed call raised {type(exc).__name__}: {exc}")
        print(f"state after the failed call: count {peek.delay().get(timeout=10, interval=0.01)} "
              "(unchanged, read by a pool-aware task)")

        status = warm.status("counter")
        print(f"status of 'counter': state={status.state} size={status.size} "
              f"available={status.available} checkouts={status.counters.checkouts} "
              f"calls={status.counters.calls} call_failures={status.counters.call_failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
