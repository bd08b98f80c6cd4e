"""The Celery app ``bench/callers.py`` runs in one threads worker."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from bench.actions import Echo
from celery_warmpool import Agent, AgentState, PoolSpec, WarmPool


class EchoAgent(Agent[AgentState]):
    signal_routes = {"bench.echo": Echo}


app = Celery(
    "bench_callers",
    broker=os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/10"),
    backend=os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/11"),
    set_as_current=False,
)
app.conf.broker_connection_retry_on_startup = True
warm = WarmPool(app, pools=[PoolSpec("echo", EchoAgent, size=8, reply_state=False)])


@app.task(name="bench.bare_echo", acks_late=True, shared=False)
def bare_echo(value: Any) -> Any:
    """The baseline: a plain Celery task returning its input, same delivery guarantee."""
    return value
