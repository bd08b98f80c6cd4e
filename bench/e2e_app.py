"""The Celery app ``bench/e2e.py`` runs in one prefork worker."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, PoolSpec, Signal, WarmPool


class Hits(BaseModel):
    hits: int = 0


class Touch(Action):
    name = "touch"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"hits": context.state.hits + 1}


class TrivialAgent(Agent[Hits]):
    signal_routes = {"bench.touch": Touch}


class CostlyAgent(TrivialAgent):
    """An agent whose warm-up takes 200 ms (a model load, a connection handshake)."""

    def setup(self) -> None:
        time.sleep(0.2)


app = Celery(
    "bench_e2e",
    broker=os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/10"),
    backend=os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/11"),
    set_as_current=False,
)
app.conf.broker_connection_retry_on_startup = True
warm = WarmPool(app, pools=[PoolSpec("trivial", TrivialAgent, size=2)])
TOUCH = Signal.new("bench.touch", {}, source="/bench")


@app.task(name="bench.bare", acks_late=True, shared=False)
def bare() -> dict[str, int]:
    """The baseline: a Celery task doing the same trivial work, same delivery guarantee."""
    return {"hits": 1}


@warm.task(pool="trivial", name="bench.pooled")
def pooled(agent: TrivialAgent) -> dict[str, int]:
    """A pool-aware task on a warm agent."""
    return dict(agent.handle(TOUCH).result)


@app.task(name="bench.spawn", acks_late=True, shared=False)
def spawn() -> dict[str, Any]:
    """Spawn-per-request: build and warm an agent for each call, then tear it down."""
    agent = CostlyAgent()
    agent.setup()
    try:
        return dict(agent.handle(TOUCH).result)
    finally:
        agent.teardown()


@app.task(name="bench.echo", acks_late=True, shared=False)
def echo(signal: dict[str, Any], reply: dict[str, Any]) -> list[dict[str, Any]]:
    """Bare Celery carrying what warm.call carries: a signal in, a reply of that size out."""
    return [reply]

