"""The app ``bench/streaming.py`` runs: a streaming action, and Celery's progress states.

    celery -A bench.streaming_app worker -P threads -c 8

The ``streaming`` pool streams ``count`` small chunks; a warm ``call`` of the same action
is the unary call it is compared with. ``bench.progress`` is a plain Celery task sending
the same chunks the way users do today: ``update_state`` with a custom state per chunk.
Broker and result store from ``WARMPOOL_BROKER_URL`` / ``WARMPOOL_RESULT_BACKEND``; the
pool's size (agents per node, one per child under prefork) from ``WARMPOOL_BENCH_SIZE``.
The pool's name and the task's queue (``bench.streaming``) are this bench's own, so other
apps' workers on the same databases take none of its messages.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import after_setup_logger
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, Result, WarmPool, resource

BROKER = os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/10")
BACKEND = os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/11")


class WordsState(AgentState):
    store: Any = resource()


class Words(Action):
    """Stream ``count`` chunks (``"word-0"``, ...), ``pause`` seconds apart.

    With ``report``, the generator records when it yielded each chunk and, in its
    ``finally`` (however it ends), pushes that and the time it ended as JSON to the Redis
    list ``report`` of the result store: the bench reads how soon a closed stream stopped.
    """

    name = "words"

    class Params(BaseModel):
        count: int = 8
        pause: float = 0.0
        report: str | None = None

    def run(self, params: Any, context: ActionContext) -> Any:
        yielded: list[float] = []
        try:
            for index in range(params.count):
                if params.pause:
                    time.sleep(params.pause)
                if params.report:
                    yielded.append(time.time())
                yield f"word-{index}"
        finally:
            if params.report:
                outcome = {"yielded": yielded, "ended": time.time()}
                context.state.store.rpush(params.report, json.dumps(outcome))
        return Result(value=params.count)


class WordsAgent(Agent[WordsState]):
    signal_routes = {"bench.words": Words}

    def setup(self) -> None:
        self.state.store = redis.Redis.from_url(BACKEND)

    def teardown(self) -> None:
        self.state.store.close()


app = Celery("bench_streaming", broker=BROKER, backend=BACKEND)
app.conf.broker_connection_retry_on_startup = True
app.conf.result_expires = 600
app.conf.task_default_queue = "bench.streaming"
warm = WarmPool(app, pools=[("streaming", WordsAgent, {
    "size": int(os.environ.get("WARMPOOL_BENCH_SIZE", "2")), "reply_state": False})])


@app.task(bind=True, name="bench.progress")
def progress(self: Task, count: int) -> int:  # type: ignore[type-arg]
    """The same chunks as custom progress states: each overwrites the one before."""
    for index in range(count):
        self.update_state(state="PROGRESS", meta={"i": index, "c": f"word-{index}"})
    return count


@after_setup_logger.connect
def quiet_task_lines(**_: Any) -> None:
    """No log line per task: the worker logs at INFO (its " ready." tells the bench it
    is up, with no ping, which would leave control connections in the bench's process)."""
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
