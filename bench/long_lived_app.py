"""The Celery app ``bench/long_lived.py`` runs in one threads node.

One pool, ``lived``, of agents with three actions: ``lived.echo`` gives its value back,
``lived.sleep`` sleeps (longer than a call's ``call_timeout``, for calls that time out,
or a little, for calls cancelled in flight) and ``lived.chunks`` streams ``count`` chunks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from pydantic import BaseModel

from bench.actions import Echo
from celery_warmpool import Action, ActionContext, Agent, AgentState, PoolSpec, Result, WarmPool


class Sleep(Action):
    name = "sleep"

    class Params(BaseModel):
        seconds: float

    def run(self, params: Any, context: ActionContext) -> Result:
        time.sleep(params.seconds)
        return Result(None)


class Chunks(Action):
    name = "chunks"

    class Params(BaseModel):
        count: int

    def run(self, params: Any, context: ActionContext) -> Iterator[int]:
        yield from range(params.count)


class LivedAgent(Agent[AgentState]):
    signal_routes = {"lived.echo": Echo, "lived.sleep": Sleep, "lived.chunks": Chunks}


app = Celery("bench_long_lived", broker=os.environ.get("WARMPOOL_BROKER_URL"),
             backend=os.environ.get("WARMPOOL_RESULT_BACKEND"), set_as_current=False)
app.conf.broker_connection_retry_on_startup = True
app.conf.result_expires = 600
warm = WarmPool(app, pools=[PoolSpec("lived", LivedAgent, size=8, max_overflow=4,
                                     reply_state=False)])
