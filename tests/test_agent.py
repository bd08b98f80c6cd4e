"""Agent: routing, state changes only on success, resources kept off the wire."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from celery_warmpool import (
    Action,
    ActionContext,
    ActionFailed,
    Agent,
    AgentState,
    ConfigurationError,
    InvalidSignal,
    Signal,
    UnknownSignal,
    resource,
)

from .core_agents import Boom, Client, CounterAgent, CounterState


class Named(Action):
    """Returns its own name as the update, to show which route ran."""

    def __init__(self, label: str) -> None:
        self.label = label

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"ran": self.label}


class RouteState(BaseModel):
    ran: str = ""


class Router(Agent[RouteState]):
    signal_routes: ClassVar[dict[str, Any]] = {
        "order.created": Named("exact"),
        "order.*": Named("order.*"),
        "order.**": Named("order.**"),
        "order.*.paid": Named("order.*.paid"),
        "**": Named("**"),
    }


def ran(agent: Agent[Any], signal_type: str) -> str:
    return agent.handle(Signal.new(signal_type)).state["ran"]  # type: ignore[no-any-return]


# -- routing ---------------------------------------------------------------------------


def test_exact_route_wins_over_patterns() -> None:
    assert ran(Router(), "order.created") == "exact"


def test_star_matches_exactly_one_segment() -> None:
    agent = Router()

    assert ran(agent, "order.shipped") == "order.*"
    assert ran(agent, "order.7.refunded") == "order.**"
    assert ran(agent, "invoice") == "**"


def test_double_star_matches_zero_or_more_segments() -> None:
    class Deep(Agent[RouteState]):
        signal_routes: ClassVar[dict[str, Any]] = {"order.**": Named("order.**")}

    agent = Deep()

    assert ran(agent, "order") == "order.**"
    assert ran(agent, "order.a") == "order.**"
    assert ran(agent, "order.a.b.c") == "order.**"
    with pytest.raises(UnknownSignal):
        agent.route("invoice.a")


def test_more_specific_pattern_wins() -> None:
    agent = Router()

    # order.*.paid (one wildcard, three segments) over order.** and **.
    assert ran(agent, "order.7.paid") == "order.*.paid"
    # order.* (no **) over order.** (a **) over ** (shorter).
    assert ran(agent, "order.cancelled") == "order.*"
    assert ran(agent, "order") == "order.**"


def test_unknown_signal_names_type_and_routes() -> None:
    with pytest.raises(UnknownSignal) as caught:
        CounterAgent().handle(Signal.new("counter.decrement"))

    assert caught.value.signal_type == "counter.decrement"
    assert str(caught.value) == (
        "CounterAgent has no route for signal type 'counter.decrement' (routes: "
        "counter.bad_update, counter.fail, counter.increment, counter.mutate_then_fail, "
        "counter.set_client, counter.unknown_field)")


def test_agent_without_routes_says_none() -> None:
    class Silent(Agent[RouteState]):
        pass

    with pytest.raises(UnknownSignal, match=r"\(routes: none\)$"):
        Silent().route("x")


# -- handling ----------------------------------------------------------------------------


def test_handle_merges_updates_and_replies() -> None:
    agent = CounterAgent(agent_id="counter-1")
    agent.pool_name, agent.node = "counters", "node-a"
    signal = Signal.new("counter.increment", {"by": 3})

    reply = agent.handle(signal)

    assert agent.state.count == 3
    assert agent.state.history == [3]
    assert reply.pool == "counters"
    assert reply.agent_id == "counter-1"
    assert reply.node == "node-a"
    assert reply.pid == os.getpid()
    assert reply.signal_id == signal.id
    assert reply.signal_type == "counter.increment"
    assert reply.action == "increment"
    assert reply.result == {"count": 3, "history": [3]}
    assert reply.state == {"count": 3, "history": [3]}
    assert reply.duration >= 0


def test_handle_accepts_mapping_and_json() -> None:
    agent = CounterAgent()

    agent.handle({"type": "counter.increment", "data": {"by": 2}})
    agent.handle(Signal.new("counter.increment", {"by": 5}).to_json())

    assert agent.state.count == 7


def test_action_raising_is_action_failed_with_cause_and_state_unchanged() -> None:
    agent = CounterAgent()
    agent.handle(Signal.new("counter.increment"))
    before = agent.state

    with pytest.raises(ActionFailed) as caught:
        agent.handle(Signal.new("counter.fail"))

    error = caught.value
    assert str(error) == "action 'fail' failed on signal 'counter.fail': Boom: no luck"
    assert error.action == "fail"
    assert error.signal_type == "counter.fail"
    assert error.cause == "Boom: no luck"
    assert isinstance(error.__cause__, Boom)
    assert agent.state is before
    assert agent.public_state() == {"count": 1, "history": [1]}


def test_action_mutating_state_in_place_then_failing_leaves_state_unchanged() -> None:
    agent = CounterAgent()
    agent.setup()
    agent.handle(Signal.new("counter.increment"))
    client = agent.state.client

    with pytest.raises(ActionFailed, match="changed things, then failed"):
        agent.handle(Signal.new("counter.mutate_then_fail"))

    assert agent.state.count == 1
    assert agent.state.history == [1]
    # Resources are the agent's own objects, shared with the action, not copies.
    assert agent.state.client is client
    assert client.name == "mutated"


def test_updates_failing_state_validation_are_action_failed_and_state_unchanged() -> None:
    agent = CounterAgent()
    before = agent.state

    with pytest.raises(ActionFailed) as caught:
        agent.handle(Signal.new("counter.bad_update"))

    assert caught.value.action == "bad_update"
    assert str(caught.value).startswith("action 'bad_update' produced an invalid state: ")
    assert "count: Input should be a valid integer" in str(caught.value)
    assert agent.state is before
    assert agent.state.count == 0


def test_updates_naming_unknown_fields_are_action_failed_and_state_unchanged() -> None:
    agent = CounterAgent()
    before = agent.state

    with pytest.raises(ActionFailed) as caught:
        agent.handle(Signal.new("counter.unknown_field"))

    assert str(caught.value) == (
        "action 'unknown_field' returned updates for unknown state fields ['nope'] of "
        "CounterState")
    assert caught.value.cause == "unknown state fields: ['nope']"
    assert agent.state is before
    assert agent.state.count == 0


def test_action_returning_no_dict_is_action_failed() -> None:
    class Wrong(Action):
        def run(self, params: Any, context: ActionContext) -> Any:
            return [1, 2]

    class WrongAgent(Agent[CounterState]):
        signal_routes: ClassVar[dict[str, Any]] = {"wrong": Wrong}

    agent = WrongAgent()
    with pytest.raises(ActionFailed) as caught:
        agent.handle(Signal.new("wrong"))

    assert str(caught.value) == (
        "action 'Wrong' returned list, expected a dict of state updates or a Result")
    assert agent.state.count == 0


def test_action_returning_none_changes_nothing() -> None:
    class Noop(Action):
        def run(self, params: Any, context: ActionContext) -> Any:
            return None

    class NoopAgent(Agent[CounterState]):
        signal_routes: ClassVar[dict[str, Any]] = {"noop": Noop}

    reply = NoopAgent({"count": 4}).handle(Signal.new("noop"))

    assert reply.result == {}
    assert reply.state == {"count": 4, "history": []}


def test_invalid_params_are_invalid_signal_and_state_unchanged() -> None:
    agent = CounterAgent()

    with pytest.raises(InvalidSignal) as caught:
        agent.handle(Signal.new("counter.increment", {"by": "lots"}))

    assert caught.value.signal_type == "counter.increment"
    assert agent.state.count == 0


def test_discard_on_exception_marks_agent_broken() -> None:
    agent = CounterAgent()
    agent.discard_on = (Boom,)

    with pytest.raises(ActionFailed):
        agent.handle(Signal.new("counter.fail"))

    assert isinstance(agent.broken, Boom)


def test_other_exceptions_leave_agent_unbroken() -> None:
    agent = CounterAgent()
    agent.discard_on = (KeyError,)

    with pytest.raises(ActionFailed):
        agent.handle(Signal.new("counter.fail"))

    assert agent.broken is None


# -- resources, reset and initial state --------------------------------------------------


def test_resource_fields_are_left_out_of_reply_state_and_result() -> None:
    agent = CounterAgent()
    agent.setup()

    reply = agent.handle(Signal.new("counter.set_client", {"name": "fresh"}))

    assert reply.result == {"count": 1}
    assert reply.state == {"count": 1, "history": []}
    assert agent.public_state() == {"count": 1, "history": []}
    assert agent.state.client.name == "fresh"


def test_resource_fields_are_found_from_the_state_model() -> None:
    assert CounterAgent._resource_fields == frozenset({"client"})


def test_reset_restores_initial_state_and_keeps_resources() -> None:
    agent = CounterAgent({"count": 10})
    agent.setup()
    client = agent.state.client
    agent.handle(Signal.new("counter.increment", {"by": 5}))

    agent.reset()

    assert agent.state.count == 10
    assert agent.state.history == []
    assert agent.state.client is client


def test_reset_works_on_a_frozen_state_model_with_resources() -> None:
    class FrozenState(AgentState):
        model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

        count: int = 0
        client: Any = resource()

    class Bump(Action):
        def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
            return {"count": context.state.count + 1}

    class FrozenAgent(Agent[FrozenState]):
        signal_routes: ClassVar[dict[str, Any]] = {"bump": Bump}

        def setup(self) -> None:
            self.state = self.state.model_copy(update={"client": Client("frozen")})

    agent = FrozenAgent()
    agent.setup()
    client = agent.state.client
    agent.handle(Signal.new("bump"))

    agent.reset()

    assert agent.state.count == 0
    assert agent.state.client is client


def test_each_agent_gets_its_own_deep_copy_of_initial_state() -> None:
    initial = {"count": 1, "history": [1]}
    first, second = CounterAgent(initial), CounterAgent(initial)

    first.state.history.append(2)
    first.reset()

    assert first.state.history == [1]
    assert second.state.history == [1]
    assert initial == {"count": 1, "history": [1]}
    assert first.state.history is not second.state.history


def test_options_are_deep_copied() -> None:
    options = {"endpoints": ["a"]}
    agent = CounterAgent(options=options)

    agent.options["endpoints"].append("b")

    assert options == {"endpoints": ["a"]}


def test_initial_state_may_be_a_model() -> None:
    agent = CounterAgent(CounterState(count=2, history=[2]))

    assert agent.public_state() == {"count": 2, "history": [2]}


def test_invalid_initial_state_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        CounterAgent({"count": "many"})

    assert caught.value.field == "initial_state"
    assert str(caught.value).startswith("initial state of CounterAgent is invalid: ")


def test_state_is_inferred_from_the_generic_parameter() -> None:
    class Other(AgentState):
        flag: bool = False

    class Explicit(Agent[CounterState]):
        State = Other

    class Inherited(CounterAgent):
        pass

    assert CounterAgent.State is CounterState
    assert isinstance(CounterAgent().state, CounterState)
    assert Explicit.State is Other
    assert Inherited.State is CounterState


def test_state_defaults_to_agent_state() -> None:
    class Plain(Agent[Any]):
        pass

    assert Plain.State is AgentState


def test_state_that_is_not_a_model_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        class Bad(Agent[Any]):
            State = dict  # type: ignore[assignment]

    assert caught.value.field == "State"


def test_ids_are_unique_and_readable() -> None:
    first, second = CounterAgent(), CounterAgent()

    assert first.id != second.id
    assert first.id.startswith("counteragent-")
    assert repr(CounterAgent(agent_id="c-1")) == "<CounterAgent c-1 pool=None>"


def test_setup_puts_a_client_in_state() -> None:
    agent = CounterAgent(agent_id="c-2")
    agent.setup()

    assert isinstance(agent.state.client, Client)
    assert agent.state.client.name == "c-2"


def test_a_state_that_cannot_be_serialized_fails_the_call_and_changes_nothing() -> None:
    class Opaque(AgentState):
        count: int = 0
        handle: Any = None  # an object, but not declared with resource()

    class Store(Action):
        name = "store"

        def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
            return {"count": context.state.count + 1, "handle": object()}

    class Holder(Agent[Opaque]):
        signal_routes = {"holder.store": Store}

    agent = Holder()
    with pytest.raises(ActionFailed, match=r"resource\(\)"):
        agent.handle(Signal.new("holder.store", {}))
    assert agent.state.count == 0
    assert agent.state.handle is None
