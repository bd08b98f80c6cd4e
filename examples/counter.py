"""A counter pool: state that persists across calls, and per-request isolation.

Run a worker:   celery -A examples.counter worker -P threads -c 4 --loglevel=info
Then call it:   python -m examples.counter

Broker and result store come from WARMPOOL_BROKER_URL / WARMPOOL_RESULT_BACKEND
(default: the local Redis).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, PoolSpec, Signal, WarmPool


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
        raise RuntimeError("asked to fail")


class CounterAgent(Agent[CounterState]):
    signal_routes = {"counter.increment": Increment, "counter.fail": Fail}


app = Celery(
    "counter",
    broker=os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
)
warm = WarmPool(app, pools=[
    PoolSpec("counter", CounterAgent, size=1),
    PoolSpec("isolated", CounterAgent, size=1, reset_on_checkin=True),
])


@warm.task(pool="counter", name="counter.peek")
def peek(agent: CounterAgent) -> int:
    """A pool-aware task: the worker passes the agent, callers pass nothing."""
    return agent.state.count


def main() -> None:
    increment = Signal.new("counter.increment", {"by": 1}, source="/examples/counter")
    first = warm.call("counter", increment)
    second = warm.call("counter", increment)
    print(f"shared state: {first.state['count']} then {second.state['count']}")
    one = warm.call("isolated", increment)
    two = warm.call("isolated", increment)
    print(f"reset_on_checkin: {one.state['count']} then {two.state['count']}")
    print(f"peek task: {peek.delay().get(timeout=10)}")
    print(warm.status("counter").model_dump_json(indent=2))


if __name__ == "__main__":
    main()
