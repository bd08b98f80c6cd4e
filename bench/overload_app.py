"""The Celery app ``bench/overload.py`` and ``bench/autoscale.py`` run in their nodes.

Two pools of the same agent, whose one action sleeps for the seconds it is given:
``bounded`` with ``max_queued`` (``OVERLOAD_MAX_QUEUED``, 20 by default) and ``unbounded``
without. Their queues carry ``OVERLOAD_RUN`` in their names (RabbitMQ keeps a queue's
arguments: each run declares its own). ``OVERLOAD_SETUP`` seconds of warm-up per agent.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, PoolSpec, Result, WarmPool


class Nothing(BaseModel):
    pass


class Work(Action):
    """Sleep ``seconds``: a call whose cost is known."""

    name = "work"

    class Params(BaseModel):
        seconds: float = 0.05

    def run(self, params: Any, context: ActionContext) -> Result:
        time.sleep(params.seconds)
        return Result(None)


class SleepyAgent(Agent[Nothing]):
    signal_routes = {"bench.work": Work}

    def setup(self) -> None:
        time.sleep(float(os.environ.get("OVERLOAD_SETUP", "0")))


RUN = os.environ.get("OVERLOAD_RUN", "0")
SIZE = int(os.environ.get("OVERLOAD_SIZE", "2"))

app = Celery(
    "bench_overload",
    broker=os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/15"),
    set_as_current=False,
)
app.conf.broker_connection_retry_on_startup = True
app.conf.result_expires = 600
warm = WarmPool(app, pools=[
    PoolSpec("bounded", SleepyAgent, size=SIZE, queue=f"bench.bounded.{RUN}",
             max_queued=int(os.environ.get("OVERLOAD_MAX_QUEUED", "20"))),
    PoolSpec("unbounded", SleepyAgent, size=SIZE, queue=f"bench.unbounded.{RUN}"),
])
