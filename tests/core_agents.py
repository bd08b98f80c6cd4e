"""Agents, actions and helpers shared by the core tests (no Celery worker involved)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from celery_warmpool import Action, ActionContext, Agent, AgentPool, AgentState, resource
from celery_warmpool.telemetry import TelemetrySignal


class FakeClock:
    """A monotonic clock the test moves by hand (for max_age, overflow_ttl, health checks)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Client:
    """Stands for an expensive resource (a model, a keep-alive client)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False


class CounterState(AgentState):
    count: int = 0
    history: list[int] = Field(default_factory=list)
    client: Any = resource()


class Increment(Action):
    name = "increment"

    class Params(BaseModel):
        by: int = 1

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        count = context.state.count + params.by
        return {"count": count, "history": [*context.state.history, count]}


class Boom(Exception):
    """What a failing action raises."""


class Fail(Action):
    name = "fail"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        raise Boom("no luck")


class MutateThenFail(Action):
    """Changes the state it is given in place, then raises."""

    name = "mutate_then_fail"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        context.state.count = 999
        context.state.history.append(999)
        context.state.client.name = "mutated"
        raise Boom("changed things, then failed")


class BadUpdate(Action):
    name = "bad_update"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"count": "not a number"}


class UnknownField(Action):
    name = "unknown_field"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"count": 5, "nope": 1}


class SetClient(Action):
    name = "set_client"

    class Params(BaseModel):
        name: str

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"client": Client(params.name), "count": context.state.count + 1}


class CounterAgent(Agent[CounterState]):
    signal_routes: ClassVar[dict[str, Any]] = {
        "counter.increment": Increment,
        "counter.fail": Fail,
        "counter.mutate_then_fail": MutateThenFail,
        "counter.bad_update": BadUpdate,
        "counter.unknown_field": UnknownField,
        "counter.set_client": SetClient,
    }

    def setup(self) -> None:
        self.state.client = Client(self.id)


class Tracker:
    """Records what the pool does to the agents it builds, and steers their hooks.

    ``fail_setups``: how many ``setup()`` calls fail before they start to succeed.
    ``gate``: once ``ungated`` setups have run, later ones wait for ``gate`` to be set.
    ``unhealthy``: ids of agents whose ``check_health()`` says no.
    """

    def __init__(self, fail_setups: int = 0, ungated: int | None = None) -> None:
        self.lock = threading.Lock()
        self.built: list[TrackedAgent] = []
        self.setups: list[str] = []
        self.teardowns: list[str] = []
        self.resets: list[str] = []
        self.health_checks: list[str] = []
        self.unhealthy: set[str] = set()
        self.fail_setups = fail_setups
        self.ungated = ungated
        self.gate = threading.Event()
        self.gated = threading.Event()

    def factory(self) -> TrackedAgent:
        with self.lock:
            agent = TrackedAgent(agent_id=f"agent-{len(self.built)}")
            agent.tracker = self
            self.built.append(agent)
        return agent

    def setup(self, agent: TrackedAgent) -> None:
        with self.lock:
            number = len(self.setups)
            self.setups.append(agent.id)
            failing = self.fail_setups > 0
            if failing:
                self.fail_setups -= 1
        if failing:
            raise Boom(f"setup of {agent.id} failed")
        if self.ungated is not None and number >= self.ungated:
            self.gated.set()
            self.gate.wait(10)


class TrackedAgent(CounterAgent):
    tracker: Tracker

    def setup(self) -> None:
        super().setup()
        self.tracker.setup(self)

    def teardown(self) -> None:
        with self.tracker.lock:
            self.tracker.teardowns.append(self.id)

    def reset(self) -> None:
        with self.tracker.lock:
            self.tracker.resets.append(self.id)
        super().reset()

    def check_health(self) -> bool:
        with self.tracker.lock:
            self.tracker.health_checks.append(self.id)
        return self.id not in self.tracker.unhealthy


def tracked_pool(tracker: Tracker, **options: Any) -> AgentPool[TrackedAgent]:
    """A started pool of tracked agents (``start_timeout`` short unless given)."""
    options.setdefault("start_timeout", 10.0)
    return AgentPool(tracker.factory, name="test", **options).start()


def status_numbers(pool: AgentPool[Any]) -> dict[str, Any]:
    """The pool's status without its time stamp, for comparing before and after."""
    return pool.status().model_dump(exclude={"updated_at"})


class Received:
    """The keyword arguments of every send of one telemetry signal."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.event = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, **kwargs: Any) -> None:
        with self._lock:
            self.calls.append(kwargs)
        self.event.set()


@contextmanager
def receiving(signal: TelemetrySignal) -> Iterator[Received]:
    """Collect what ``signal`` sends inside the block; disconnect after it."""
    received = Received()
    signal.connect(received, weak=False)
    try:
        yield received
    finally:
        signal.disconnect(received)
