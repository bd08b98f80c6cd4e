"""The Celery app the integration tests run in real workers.

Pools come from ``WARMPOOL_TEST_SPECS`` (JSON list of pool specs, agents as
``"module:Class"`` strings, read through ``app.conf.warmpool_pools``); broker and backend
from ``WARMPOOL_BROKER_URL`` / ``WARMPOOL_RESULT_BACKEND``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentState,
    Result,
    WarmPool,
    resource,
)


class CounterState(AgentState):
    count: int = 0
    setups: int = 0
    warmed_at: float = 0.0
    connection: Any = resource()


class Increment(Action):
    name = "increment"

    class Params(BaseModel):
        by: int = 1

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"count": context.state.count + params.by}


class Fail(Action):
    name = "fail"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        context.state.count = -1000  # an in-place change must not stick
        raise ValueError("the action was asked to fail")


class Work(Action):
    """Sleep ``seconds``; report when it ran and where."""

    name = "work"

    class Params(BaseModel):
        seconds: float = 0.0

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        started = time.time()
        time.sleep(params.seconds)
        return {"count": context.state.count + 1, "last_start": started,
                "last_end": time.time()}


class Echo(Action):
    """Give ``value`` back (the state is left alone)."""

    name = "echo"

    class Params(BaseModel):
        value: Any = None

    def run(self, params: Any, context: ActionContext) -> Result:
        return Result(params.value)


class Touch(Action):
    """Sleep ``seconds``, then create the file ``path``: a side effect a test can see."""

    name = "touch"

    class Params(BaseModel):
        path: str
        seconds: float = 0.0

    def run(self, params: Any, context: ActionContext) -> Result:
        time.sleep(params.seconds)
        with open(params.path, "w") as file:
            file.write(str(os.getpid()))
        return Result(params.path)


class Chunks(Action):
    """Stream ``count`` chunks (0, 1, ...), ``delay`` seconds apart.

    With ``fail_after``, fail once that many chunks are out. With ``log``, append each
    chunk's index to that file as it is produced, and ``end`` when the generator ends,
    whichever way (its ``finally``), so a test sees how far it got.
    """

    name = "chunks"

    class Params(BaseModel):
        count: int = 10
        delay: float = 0.0
        fail_after: int | None = None
        log: str | None = None

    def run(self, params: Any, context: ActionContext) -> Any:
        try:
            for index in range(params.count):
                if index == params.fail_after:
                    raise ValueError(f"asked to fail after {index} chunks")
                if params.log:
                    _append(params.log, f"{index}\n")
                yield index
                time.sleep(params.delay)
            return {"count": context.state.count + 1}
        finally:
            if params.log:
                _append(params.log, "end\n")


class UntilCancelled(Action):
    """Work up to ``seconds``, stopping early once its caller cancelled; write to
    ``path`` whether it saw the cancellation."""

    name = "until_cancelled"

    class Params(BaseModel):
        path: str
        seconds: float = 10.0

    def run(self, params: Any, context: ActionContext) -> Result:
        deadline = time.monotonic() + params.seconds
        while not context.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        _append(params.path, "cancelled" if context.cancelled else "not cancelled")
        return Result(None)


class Hold(Action):
    """Hold the agent until the file ``path`` exists (at most ``seconds``): a test
    freezes a pool with it, and lets it go by creating the file."""

    name = "hold"

    class Params(BaseModel):
        path: str
        seconds: float = 60.0

    def run(self, params: Any, context: ActionContext) -> Result:
        deadline = time.monotonic() + params.seconds
        while not os.path.exists(params.path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return Result(os.path.exists(params.path))


def _append(path: str, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)


class WorkState(CounterState):
    last_start: float = 0.0
    last_end: float = 0.0


class CounterAgent(Agent[WorkState]):
    """Counts; warms up for ``WARMPOOL_TEST_SETUP_SECONDS`` (default 0)."""

    signal_routes = {
        "counter.increment": Increment,
        "counter.fail": Fail,
        "counter.work": Work,
        "counter.echo": Echo,
        "counter.touch": Touch,
        "counter.chunks": Chunks,
        "counter.until_cancelled": UntilCancelled,
        "counter.hold": Hold,
    }

    def teardown(self) -> None:
        folder = os.environ.get("WARMPOOL_TEST_TEARDOWN_DIR")
        if folder:  # lets tests see that every agent was torn down, and where
            with open(os.path.join(folder, f"{os.getpid()}-{self.id}"), "w"):
                pass

    def setup(self) -> None:
        time.sleep(float(os.environ.get("WARMPOOL_TEST_SETUP_SECONDS", "0")))
        self.state.connection = object()
        self.state.warmed_at = time.time()
        self.state.setups += 1


class BrokenAgent(CounterAgent):
    """Never warms up."""

    def setup(self) -> None:
        raise ConnectionError("model server unreachable")


class Spell(Action):
    """Stream ``count`` chunks (``"chunk-0"``, ...), for the HTTP gateway's tests.

    With ``hold``, wait after the first chunk until the Redis list ``hold`` of the result
    store gets an item (a barrier the test releases); with ``fail_after``, fail once that
    many chunks are out; with ``report``, push ``"<chunks out>:<finished|stopped>"`` to the
    Redis list ``report`` as the generator ends, whichever way.
    """

    name = "spell"

    class Params(BaseModel):
        count: int = 3
        hold: str | None = None
        fail_after: int | None = None
        report: str | None = None

    def run(self, params: Any, context: ActionContext) -> Any:
        out, ended = 0, "stopped"
        try:
            for index in range(params.count):
                if index == params.fail_after:
                    raise ValueError(f"asked to fail after {index} chunks")
                yield f"chunk-{index}"
                out += 1
                if index == 0 and params.hold:
                    _result_store().blpop([params.hold], timeout=30)
            ended = "finished"
            return {"count": context.state.count + out}
        finally:
            if params.report:
                _result_store().rpush(params.report, f"{out}:{ended}")


def _result_store() -> Any:
    import redis

    return redis.Redis.from_url(os.environ["WARMPOOL_RESULT_BACKEND"])


class SpellingAgent(CounterAgent):
    """A counter that also streams (the HTTP gateway's tests)."""

    signal_routes = {**CounterAgent.signal_routes, "words.spell": Spell}


DEFAULT_SPECS: list[dict[str, Any]] = [
    {"name": "counter", "agent": "tests.integration_app:CounterAgent", "size": 1},
]


def make_app(broker: str, backend: str,
             specs: list[dict[str, Any]] | None = None) -> tuple[Celery, WarmPool]:
    """The app and its warm pools; tests build the same app as callers."""
    app = Celery("integration_app", broker=broker, backend=backend, set_as_current=False)
    app.conf.warmpool_pools = specs or DEFAULT_SPECS
    app.conf.broker_connection_retry_on_startup = True
    app.conf.result_expires = 600
    warm = WarmPool(app)

    @warm.task(pool="counter", name="tests.peek")
    def peek(agent: CounterAgent, add: int = 0) -> dict[str, Any]:
        """A pool-aware task: returns the agent's id and count plus ``add``."""
        return {"agent": agent.id, "count": agent.state.count + add, "pid": os.getpid()}

    @warm.task(pool="counter", name="tests.slow")
    def slow(agent: CounterAgent, seconds: float) -> int:
        """A pool-aware task that takes ``seconds``; returns the pid that ran it."""
        time.sleep(seconds)
        return os.getpid()

    @warm.task(pool="counter", name="tests.explode")
    def explode(agent: CounterAgent) -> None:
        raise KeyError("boom")

    @warm.task(pool="counter", name="tests.nap", soft_time_limit=0.5)
    def nap(agent: CounterAgent, seconds: float) -> str:
        try:
            time.sleep(seconds)
        except SoftTimeLimitExceeded:
            return "soft limit"
        return "slept"

    @warm.task(pool="counter", name="tests.flaky", bind=True, max_retries=2,
               default_retry_delay=0.05)
    def flaky(task: Any, agent: CounterAgent) -> int:
        if task.request.retries < 2:
            raise task.retry()
        return int(task.request.retries)

    return app, warm


app, warm = make_app(
    os.environ.get("WARMPOOL_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("WARMPOOL_RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
    json.loads(os.environ.get("WARMPOOL_TEST_SPECS", "null")),
)
