"""The app ``bench/gateway.py`` serves: an echo pool on a threads node, and the usual
hand-written gateway (a FastAPI endpoint calling the blocking ``warm.call`` in FastAPI's
thread pool) to compare ``celery warmpool serve`` with.

    celery -A bench.gateway_app warmpool serve --port 8000        # the gateway
    uvicorn bench.gateway_app:handwritten --port 8001             # the hand-written one
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from fastapi import Body, FastAPI
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, Result, WarmPool


class Echo(Action):
    """Return the signal's data: the node's work is as small as a call's can be."""

    name = "echo"

    class Params(BaseModel):
        text: str = ""

    def run(self, params: Any, context: ActionContext) -> Result:
        return Result(value={"text": params.text})


class Words(Action):
    """Stream ``count`` words: the first comes as soon as a unary call's reply would."""

    name = "words"

    class Params(BaseModel):
        count: int = 8

    def run(self, params: Any, context: ActionContext) -> Any:
        for index in range(params.count):
            yield f"word-{index}"
        return Result(value=params.count)


class EchoAgent(Agent[AgentState]):
    signal_routes = {"bench.echo": Echo, "bench.words": Words}


app = Celery("bench_gateway",
             broker=os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/12"),
             backend=os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/13"))
app.conf.broker_connection_retry_on_startup = True
app.conf.result_expires = 600
warm = WarmPool(app, pools=[("echo", EchoAgent, {"size": 8, "reply_state": False})])

handwritten = FastAPI(title="hand-written gateway")


@handwritten.post("/pools/{pool}/call")
def call(pool: str, signal: dict[str, Any] = Body(...), timeout: float = 5.0,  # noqa: B008
         call_timeout: float = 5.0) -> dict[str, Any]:
    """What users write today: a plain ``def`` endpoint, run in FastAPI's thread pool."""
    return warm.call(pool, signal, timeout=timeout, call_timeout=call_timeout).model_dump(
        mode="json")
