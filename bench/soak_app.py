"""The Celery app ``bench/soak.py`` runs in its two worker nodes.

One pool, ``soak``, of agents that warm up in 0.2 s and serve three signals:

- ``soak.work``: a short piece of work (1 ms), answered with the agent's pid;
- ``soak.fail``: an action that fails (the soak sends 5% of its calls as these);
- ``soak.record``: a cast's side effect the soak can count afterwards: a file named after
  the cast in ``WARMPOOL_SOAK_RECORDS``, one line (the pid) each time it runs, so that a
  cast done twice (casts are delivered at least once) shows as two lines;
- ``soak.count``: a stream of numbers, so that a chunk lost or repeated shows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, PoolSpec, Result, WarmPool

#: Seconds each agent's warm-up takes.
SETUP_SECONDS = 0.2


class Work(Action):
    name = "work"

    def run(self, params: Any, context: ActionContext) -> Result:
        time.sleep(0.001)
        return Result({"pid": os.getpid()})


class Fail(Action):
    name = "fail"

    def run(self, params: Any, context: ActionContext) -> Result:
        raise RuntimeError("this action fails on purpose")


class Record(Action):
    name = "record"

    class Params(BaseModel):
        cast: str

    def run(self, params: Any, context: ActionContext) -> Result:
        folder = Path(os.environ["WARMPOOL_SOAK_RECORDS"])
        with (folder / params.cast).open("a") as record:
            record.write(f"{os.getpid()}\n")
        return Result(None)


class Count(Action):
    """Stream 0, 1, ... ``n - 1``, one chunk every ``pause`` seconds."""

    name = "count"

    class Params(BaseModel):
        n: int = 20
        pause: float = 0.005

    def run(self, params: Any, context: ActionContext) -> Any:
        for number in range(params.n):
            yield number
            time.sleep(params.pause)
        return Result(params.n)


class SoakAgent(Agent[AgentState]):
    signal_routes = {"soak.work": Work, "soak.fail": Fail, "soak.record": Record,
                     "soak.count": Count}

    def setup(self) -> None:
        time.sleep(SETUP_SECONDS)


app = Celery("bench_soak", broker=os.environ.get("WARMPOOL_BROKER_URL"),
             backend=os.environ.get("WARMPOOL_RESULT_BACKEND"), set_as_current=False)
app.conf.broker_connection_retry_on_startup = True
app.conf.result_expires = 3600
warm = WarmPool(app, pools=[PoolSpec("soak", SoakAgent, size=2)])
