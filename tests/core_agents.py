"""Agents, actions and helpers shared by the core tests (no Celery worker involved)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from celery_warmpool import Action, ActionContext, Agent, AgentPool, AgentState, resource
from celery_warmpool.core.telemetry import TelemetrySignal


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

    Setups are numbered from 0 in the order they run. ``fail_first``: setups numbered
    below it fail; ``fail_from``: setups numbered from it on fail. ``ungated``: setups
    numbered from it on set ``gated`` and wait for ``gate``. ``unhealthy``: ids of agents
    whose ``check_health()`` says no.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.built: list[TrackedAgent] = []
        self.setups: list[str] = []
        self.teardowns: list[str] = []
        self.resets: list[str] = []
        self.health_checks: list[str] = []
        self.unhealthy: set[str] = set()
        self.fail_first = 0
        self.fail_from: int | None = None
        self.ungated: int | None = None
        self.gate = threading.Event()
        self.gated = threading.Event()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate`` holds (checked whenever an agent is torn down)."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

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
        if number < self.fail_first or (self.fail_from is not None and number >= self.fail_from):
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
        with self.tracker.changed:
            self.tracker.teardowns.append(self.id)
            self.tracker.changed.notify_all()

    def reset(self) -> None:
        with self.tracker.lock:
            self.tracker.resets.append(self.id)
        super().reset()

    def check_health(self) -> bool:
        with self.tracker.lock:
            self.tracker.health_checks.append(self.id)
        return self.id not in self.tracker.unhealthy


def tracked_pool(tracker: Tracker, **options: Any) -> AgentPool[TrackedAgent]:
    """A pool of tracked agents, not started (``start_timeout`` short unless given)."""
    options.setdefault("start_timeout", 10.0)
    return AgentPool(tracker.factory, name="test", **options)


def status_numbers(pool: AgentPool[Any]) -> dict[str, Any]:
    """The pool's status without its time stamp, for comparing before and after."""
    return pool.status().model_dump(exclude={"updated_at"})


class Received:
    """The keyword arguments of every send of one telemetry signal, and who sent them."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.threads: list[str] = []
        self._changed = threading.Condition()

    def __call__(self, **kwargs: Any) -> None:
        with self._changed:
            self.calls.append(kwargs)
            self.threads.append(threading.current_thread().name)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until the signal was sent ``count`` times in all."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.calls) >= count, timeout)


@contextmanager
def receiving(signal: TelemetrySignal, sender: Any = None) -> Iterator[Received]:
    """Collect what ``signal`` sends (from ``sender`` only, if given) inside the block."""
    received = Received()
    signal.connect(received, sender=sender, weak=False)
    try:
        yield received
    finally:
        signal.disconnect(received, sender=sender)
