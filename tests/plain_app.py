"""A user's Celery app with plain tasks beside its warm pools: what the extension must leave
as it is (``tests/test_user_app.py``).

Broker and result store from ``WARMPOOL_BROKER_URL`` / ``WARMPOOL_RESULT_BACKEND``; more
settings from ``PLAIN_APP_CONF`` (JSON); the extension is installed unless
``PLAIN_APP_WARMPOOL=0``. A worker of this app records every ``task_received`` request of
a plain task in the Redis list :data:`RECEIVED` of its result store, as JSON.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_received
from pydantic import BaseModel

from celery_warmpool import Action, ActionContext, Agent, AgentState, Result, WarmPool

#: The Redis list (in the result store) where a worker records what it received.
RECEIVED = "plain-app:received"
#: The pool this app has when the extension is installed.
SPECS: list[dict[str, Any]] = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 1},
    {"name": "gate", "agent": "tests.plain_app:GateAgent", "size": 1},
]


def pass_gate(started: str, release: str, within: float = 60.0) -> None:
    """Create the file ``started``, then wait until the file ``release`` exists: a barrier
    a test opens from outside the worker."""
    with open(started, "w"):
        pass
    deadline = time.monotonic() + within
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)


class Pass(Action):
    """Pass the gate (see :func:`pass_gate`)."""

    name = "pass"

    class Params(BaseModel):
        started: str
        release: str

    def run(self, params: Any, context: ActionContext) -> Result:
        pass_gate(params.started, params.release)
        return Result("passed")


class GateAgent(Agent[AgentState]):
    """An agent whose work waits at a gate the test opens."""

    signal_routes = {"gate.pass": Pass}


def make_app(broker: str, backend: str, *, warm_pool: bool = True,
             conf: dict[str, Any] | None = None) -> tuple[Celery, WarmPool | None]:
    """The app, with its extension unless ``warm_pool`` is false."""
    app = Celery("plain_app", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, result_expires=600,
                    **(conf or {}))
    warm = WarmPool(app, pools=SPECS) if warm_pool else None

    @app.task(name="plain.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="plain.gated_add", shared=False)
    def gated_add(started: str, release: str, x: int, y: int) -> int:
        pass_gate(started, release)
        return x + y

    @app.task(name="plain.store_settings", bind=True, shared=False)
    def store_settings(task: Any) -> dict[str, Any]:
        """How this task's result is stored in the worker: by which backend, retried how."""
        backend = task.backend
        return {"app_backend": backend is task.app.backend,
                "always_retry": backend.always_retry,
                "max_sleep_between_retries_ms": backend.max_sleep_between_retries_ms,
                "retry_policy": dict(backend.retry_policy)}

    if warm is not None:
        @warm.task(pool="counter", name="plain.peek")
        def peek(agent: Any) -> int:
            """A pool-aware task: the agent's count."""
            return int(agent.state.count)

    return app, warm


def record_received(request: Any) -> dict[str, Any]:
    """What a worker's ``task_received`` shows of a plain task's request."""
    return {
        "request_class": f"{type(request).__module__}.{type(request).__name__}",
        "id": request.id, "name": request.name, "args": list(request.args),
        "kwargs": request.kwargs, "root_id": request.root_id,
        "parent_id": request.parent_id, "group": request.group,
        "replaced_task_nesting": request.replaced_task_nesting,
        "retries": request.request_dict.get("retries"), "eta": request.eta,
        "expires": request.expires, "ignore_result": request.ignore_result,
        "time_limits": list(request.time_limits), "argsrepr": request.argsrepr,
        "kwargsrepr": request.kwargsrepr, "reply_to": request.reply_to,
        "correlation_id": request.correlation_id, "hostname": request.hostname,
        "acks_late": request.task.acks_late,
        "delivery_info": {key: request.delivery_info.get(key)
                          for key in ("exchange", "routing_key", "priority", "redelivered")},
        "headers": sorted(request.message.headers),
    }


@task_received.connect
def _on_received(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    if request is None or not str(request.name).startswith("plain."):
        return
    store = redis.Redis.from_url(os.environ["WARMPOOL_RESULT_BACKEND"])
    store.rpush(RECEIVED, json.dumps(record_received(request), default=str))


app, warm = make_app(
    os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
    warm_pool=os.environ.get("PLAIN_APP_WARMPOOL", "1") != "0",
    conf=json.loads(os.environ.get("PLAIN_APP_CONF", "{}")),
)
